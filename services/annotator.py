"""The bundled WAV audio annotator: where a PCM WAV file has sound and where silence.

``annotate`` is the service function the worker calls (``function =
services.annotator.annotate``); ``analyse`` is the analysis on its own, a plain
function of a file path that the tests and other programs can call directly.

The file is read about one second at a time, so a long recording needs no more
memory than a short one. Each window of ``window`` seconds is "sound" when its
RMS level over all channels reaches ``threshold_db`` dBFS, else "silence";
consecutive windows of one kind make one segment.

The RIFF/WAVE header is read here rather than by the ``wave`` module: Python 3.11's
``wave`` refuses the WAVE_FORMAT_EXTENSIBLE header that many tools (SoX, ffmpeg, DAWs)
write for 24-bit samples or more than two channels, even when the samples are plain PCM.
"""

import math
import os
import struct
import uuid
from dataclasses import dataclass

import numpy as np

from worker import UnsupportedDocument

WINDOW = 0.05  # seconds
THRESHOLD_DB = -40.0  # dBFS
FLOOR_DB = -120.0  # level reported for digital silence, and the lowest level reported

PCM, EXTENSIBLE = 0x0001, 0xFFFE  # the format tags read
# KSDATAFORMAT_SUBTYPE_PCM: the SubFormat of an extensible header whose samples are integer PCM.
PCM_SUBFORMAT = uuid.UUID('00000001-0000-0010-8000-00aa00389b71')
_SUBFORMAT_NAMES = {uuid.UUID('00000003-0000-0010-8000-00aa00389b71'): ' (IEEE floating point)'}
# The data size a writer that cannot seek back leaves in the header: ffmpeg writing to a pipe.
UNKNOWN_SIZE = 0xFFFFFFFF


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
    with open(path, 'rb') as file:
        rate, channels, width, total = _read_header(file)
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
            data = file.read(wanted * channels * width)
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


def _read_header(file):
    """Read the RIFF/WAVE header of ``file``, open in binary, and leave it at the first frame.

    Return the sample rate, the channels, the sample width in bytes and the number of frames
    the header announces (the file may hold fewer: the caller finds out as it reads). A header
    that is not one of integer PCM samples in whole bytes raises UnsupportedDocument.
    """
    riff = file.read(12)
    if riff[:4] != b'RIFF':
        raise _not_pcm('file does not start with RIFF id')
    if riff[8:] != b'WAVE':
        raise _not_pcm('not a WAVE file')
    file_size = os.fstat(file.fileno()).st_size
    fmt = None
    # The chunks that matter are fmt and data; skip others (LIST, fact, bext, ...). The walk
    # stops at data, whose size may be unknown, so fmt must come first, as RIFF requires.
    while True:
        header = file.read(8)
        if len(header) < 8:
            raise _not_pcm('the file ends too early' if header else
                           'no data chunk' if fmt else 'no fmt chunk and no data chunk')
        name, size = header[:4], struct.unpack('<L', header[4:])[0]
        start = file.tell()
        if name == b'data':
            break
        if start + size > file_size:
            raise _not_pcm('the file ends too early')
        if name == b'fmt ':
            fmt = file.read(min(size, 40))  # all an extensible fmt holds; more is not read
        file.seek(start + size + size % 2)  # chunks are word-aligned: an odd one has a pad byte
    if fmt is None:
        raise _not_pcm('no fmt chunk before the data chunk')
    if len(fmt) < 16:
        raise _not_pcm('its fmt chunk is too short')
    tag, channels, rate, _, block_align, bits = struct.unpack_from('<HHLLHH', fmt)
    if tag == EXTENSIBLE:
        if len(fmt) < 40 or struct.unpack_from('<H', fmt, 16)[0] < 22:
            raise _not_pcm('its WAVE_FORMAT_EXTENSIBLE fmt chunk is too short')
        valid_bits = struct.unpack_from('<H', fmt, 18)[0]
        subformat = uuid.UUID(bytes_le=fmt[24:40])
        if subformat != PCM_SUBFORMAT:
            raise _not_pcm(f'WAVE_FORMAT_EXTENSIBLE of sub-format {subformat}'
                           f'{_SUBFORMAT_NAMES.get(subformat, "")}, only PCM is read')
        if valid_bits != bits:
            # Read at full width, such samples would be right only if the writer zeroed the
            # spare low bits: refuse rather than measure bits the file says are not audio.
            raise UnsupportedDocument(f'unsupported WAV file: {valid_bits}-bit samples in'
                                      f' {bits}-bit containers, only samples that fill their'
                                      ' container are read')
    elif tag != PCM:
        raise _not_pcm(f'unknown format: {tag}')
    width = (bits + 7) // 8  # as the wave module did for plain PCM of, say, 12 bits
    if not channels:
        raise _not_pcm('it has 0 channels')
    if width not in _DECODERS:
        raise UnsupportedDocument(f'unsupported WAV file: {8 * width}-bit samples,'
                                  ' only 8, 16, 24 and 32-bit PCM are read')
    if not rate:
        raise UnsupportedDocument('unsupported WAV file: its sample rate is 0')
    if block_align != channels * width:
        raise _not_pcm(f'its block align is {block_align} bytes, not {channels} channels'
                       f' of {width} bytes')
    if size == UNKNOWN_SIZE:
        # A writer streaming through a pipe cannot seek back to write the sizes once it knows
        # them, and leaves this placeholder (ffmpeg does): the data runs to the end of the
        # file, and a partial frame there is left out. Any other size that overruns the file
        # is taken at its word, and the file reported truncated as it is read: a download cut
        # short looks just the same, and its analysis would silently miss the end.
        size = file_size - file.tell()
    return rate, channels, width, size // block_align


def _not_pcm(reason):
    """The error for a file that is not a readable PCM WAV file, saying why."""
    return UnsupportedDocument(f'not a PCM WAV file: {reason}')


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
