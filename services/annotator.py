"""The bundled WAV audio annotator: where a PCM WAV file has sound and where silence.

``annotate`` is the service function the worker calls (``function =
services.annotator.annotate``); ``analyse`` is the analysis on its own, a plain
function of a file path that the tests and other programs can call directly.

The file is read about one second at a time, so a long recording needs no more
memory than a short one. Each window of ``window`` seconds is "sound" when its
RMS level over all channels reaches ``threshold_db`` dBFS, else "silence";
consecutive windows of one kind make one segment.
"""

import math
import uuid
import wave
from dataclasses import dataclass

import numpy as np

from worker import UnsupportedDocument

WINDOW = 0.05  # seconds
THRESHOLD_DB = -40.0  # dBFS
FLOOR_DB = -120.0  # level reported for digital silence, and the lowest level reported


@dataclass
class _Segment:
    """A run of windows of one kind, in frames, with the energy summed over its samples."""

    sound: bool
    start: int
    end: int
    energy: float


def annotate(request):
    """Annotate ``request.document``: its audio properties, then its sound and silence segments.

    ``request.misc`` may set ``threshold_db`` and ``window``; a bad value raises ValueError.
    """
    # At least 10 ms: a smaller window on a noisy file yields millions of segments.
    window = _parameter(request.misc, 'window', WINDOW, lambda w: 0.01 <= w <= 10,
                        'a number of seconds from 0.01 to 10')
    threshold_db = _parameter(request.misc, 'threshold_db', THRESHOLD_DB, lambda t: t <= 0,
                              'a number of dBFS at most 0')
    audio, segments = analyse(request.document, window, threshold_db, request.set_progress)
    request.logger.info('%s s of audio: %d segments (window %s s, threshold %s dBFS)',
                        audio['duration'], len(segments), window, threshold_db)
    return [{'@id': str(uuid.uuid4()), '@version': request.version, **annotation}
            for annotation in [audio, *segments]]


def analyse(path, window=WINDOW, threshold_db=THRESHOLD_DB, on_progress=lambda percent: None):
    """Return the audio properties of the PCM WAV file at ``path`` and its segments, in time order.

    ``on_progress`` receives the percentage of frames read, an int from 0 to 100, each time it
    changes. A file that is not a readable PCM WAV file raises UnsupportedDocument.
    """
    try:
        wav = wave.open(path, 'rb')
    except (wave.Error, EOFError) as error:
        reason = str(error) or 'the file ends too early'
        raise UnsupportedDocument(f'not a PCM WAV file: {reason}') from None
    with wav:
        rate, channels, width, total = (wav.getframerate(), wav.getnchannels(),
                                        wav.getsampwidth(), wav.getnframes())
        if width not in _DECODERS:
            raise UnsupportedDocument(f'unsupported WAV file: {8 * width}-bit samples,'
                                      ' only 8, 16, 24 and 32-bit PCM are read')
        if not rate:
            raise UnsupportedDocument('unsupported WAV file: its sample rate is 0')
        window_frames = max(1, round(window * rate))
        # Whole windows per block, so that no window straddles two blocks.
        block_frames = window_frames * max(1, rate // window_frames)
        full_scale = 2.0 ** (8 * width - 1)
        # The mean square of a window whose level is exactly threshold_db.
        threshold_power = full_scale ** 2 * 10 ** (threshold_db / 10)
        segments = []
        read = reported = 0
        on_progress(0)
        while read < total:
            wanted = min(block_frames, total - read)
            data = wav.readframes(wanted)
            if len(data) < wanted * channels * width:
                held = read + len(data) // (channels * width)
                raise UnsupportedDocument(
                    f'truncated WAV file: its header announces {total} frames, it holds {held}')
            squares = np.square(_DECODERS[width](data))
            starts = np.arange(0, squares.size, window_frames * channels)
            energies = np.add.reduceat(squares, starts)
            sizes = np.diff(starts, append=squares.size)  # the file's last window may be short
            sound = energies >= threshold_power * sizes
            # Runs of windows of one kind, as [first, last + 1) window indexes.
            bounds = [0, *(np.flatnonzero(sound[1:] != sound[:-1]) + 1).tolist(), sound.size]
            for first, end in zip(bounds, bounds[1:]):
                _extend(segments, bool(sound[first]), read + first * window_frames,
                        min(read + end * window_frames, read + wanted), energies[first:end].sum())
            read += wanted
            if read * 100 // total != reported:
                reported = read * 100 // total
                on_progress(reported)
        if reported != 100:
            on_progress(100)
    audio = {'type': 'audio', 'duration': round(total / rate, 3), 'sample_rate': rate,
             'channels': channels, 'sample_width': width}
    return audio, [{'type': 'sound' if segment.sound else 'silence',
                    'start': round(segment.start / rate, 3), 'end': round(segment.end / rate, 3),
                    'level': _level(segment.energy / ((segment.end - segment.start) * channels),
                                    full_scale)}
                   for segment in segments]


def _extend(segments, sound, start, end, energy):
    """Add a run of windows to the last segment if it is of the same kind, else start one."""
    if segments and segments[-1].sound == sound:
        segments[-1].end = end
        segments[-1].energy += float(energy)
    else:
        segments.append(_Segment(sound, start, end, float(energy)))


def _level(mean_square, full_scale):
    """The RMS level in dBFS, to one decimal, no lower than FLOOR_DB."""
    if not mean_square:
        return FLOOR_DB
    return max(FLOOR_DB, round(10 * math.log10(mean_square / full_scale ** 2), 1))


def _parameter(misc, name, default, valid, expected):
    """Read the number ``misc[name]`` (a string from a form, or a JSON number), else ``default``."""
    value = misc.get(name, default)
    try:
        if isinstance(value, bool):  # float(True) would pass for 1.0
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and valid(number)):
        raise ValueError(f'{name} must be {expected}, not {value!r}')
    return number


def _int24(data):
    """Decode little-endian signed 24-bit samples: put each in the high bytes of an int32."""
    padded = np.zeros((len(data) // 3, 4), dtype=np.uint8)
    padded[:, 1:] = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3)
    return (padded.view('<i4').ravel() >> 8).astype(np.float64)


# Sample width in bytes: decoder of raw little-endian frames into float samples centred on 0.
_DECODERS = {
    1: lambda data: np.frombuffer(data, dtype=np.uint8).astype(np.float64) - 128,
    2: lambda data: np.frombuffer(data, dtype='<i2').astype(np.float64),
    3: _int24,
    4: lambda data: np.frombuffer(data, dtype='<i4').astype(np.float64),
}
