"""Unit tests of the bundled WAV annotator, on WAV files generated in a temporary directory.

The request here is a stand-in with only what the service may use; the end-to-end flow
through the gateway and a worker is tested elsewhere.
"""

import json
import logging
import struct
import uuid
import wave

import numpy as np
import pytest

from services.annotator import analyse, annotate
from worker import UnsupportedDocument

RATE = 8000


class Request:
    """What the worker hands a service: a document path, the client's misc, a version, a logger."""

    def __init__(self, document, misc=None):
        self.document = str(document)
        self.misc = misc or {}
        self.version = '1.2.3'
        self.logger = logging.getLogger('test_annotator')
        self.progress = []

    def set_progress(self, percent):
        self.progress.append(percent)


def tone(seconds, amplitude=1.0, rate=RATE, frequency=440.0):
    """A sine of ``amplitude`` times full scale, as floats in [-1, 1]."""
    return amplitude * np.sin(2 * np.pi * frequency * np.arange(round(seconds * rate)) / rate)


def silence(seconds, rate=RATE):
    return np.zeros(round(seconds * rate))


def write_wav(path, signal, rate=RATE, width=2):
    """Write ``signal`` (floats in [-1, 1], one column per channel) as a PCM WAV file."""
    signal = np.asarray(signal, dtype=np.float64)
    frames = signal if signal.ndim == 2 else signal[:, np.newaxis]
    top = 2 ** (8 * width - 1) - 1
    samples = np.round(frames * top).astype('<i4')
    if width == 1:
        data = (samples + 128).astype(np.uint8).tobytes()
    else:  # the low ``width`` bytes of each little-endian int32
        data = samples.view(np.uint8).reshape(-1, 4)[:, :width].tobytes()
    with wave.open(str(path), 'wb') as wav:
        wav.setnchannels(frames.shape[1])
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(data)
    return path


def wav_header(format_tag=1, channels=1, rate=RATE, bits=16, data_size=0):
    """A RIFF/WAVE header written by hand, for formats the ``wave`` module will not write."""
    block_align = channels * bits // 8
    fmt = struct.pack('<HHLLHH', format_tag, channels, rate, rate * block_align, block_align, bits)
    return (b'RIFF' + struct.pack('<L', 4 + 8 + len(fmt) + 8 + data_size) + b'WAVE'
            + b'fmt ' + struct.pack('<L', len(fmt)) + fmt + b'data' + struct.pack('<L', data_size))


def segments_of(annotations):
    return [a for a in annotations if a['type'] != 'audio']


@pytest.fixture
def tone_silence_tone(tmp_path):
    signal = np.concatenate([tone(0.73), silence(1.11), tone(0.5, amplitude=0.5)])
    return write_wav(tmp_path / 'tone_silence_tone.wav', signal)


def test_tone_silence_tone_gives_sound_silence_sound(tone_silence_tone):
    segments = segments_of(annotate(Request(tone_silence_tone)))
    assert [s['type'] for s in segments] == ['sound', 'silence', 'sound']
    assert segments[0]['end'] == pytest.approx(0.73, abs=0.05)
    assert segments[2]['start'] == pytest.approx(0.73 + 1.11, abs=0.05)


def test_segments_cover_the_file_without_gaps_and_end_at_the_duration(tone_silence_tone):
    audio, *segments = annotate(Request(tone_silence_tone))
    assert segments[0]['start'] == 0.0
    assert all(a['end'] == b['start'] for a, b in zip(segments, segments[1:]))
    assert segments[-1]['end'] == audio['duration'] == 2.34


def test_full_scale_sine_is_about_minus_3_dbfs(tmp_path):
    path = write_wav(tmp_path / 'sine.wav', tone(1.0))
    assert segments_of(annotate(Request(path)))[0]['level'] == pytest.approx(-3.0, abs=0.1)


def test_segment_level_is_the_rms_of_the_whole_segment(tmp_path):
    path = write_wav(tmp_path / 'louder_quieter.wav',
                     np.concatenate([tone(1.0, amplitude=0.5), tone(1.0, amplitude=0.25)]))
    segment, = segments_of(annotate(Request(path)))
    mean_square = (0.5 ** 2 / 2 + 0.25 ** 2 / 2) / 2  # not the mean of the two levels in dB
    assert segment['level'] == pytest.approx(10 * np.log10(mean_square), abs=0.1)


def test_digital_silence_is_reported_at_minus_120_dbfs(tone_silence_tone):
    assert segments_of(annotate(Request(tone_silence_tone)))[1]['level'] == -120.0


def test_audio_annotation_gives_duration_rate_channels_and_width(tmp_path):
    path = write_wav(tmp_path / 'audio.wav', tone(1.5, rate=44100), rate=44100)
    audio = annotate(Request(path))[0]
    assert {k: v for k, v in audio.items() if not k.startswith('@')} == {
        'type': 'audio', 'duration': 1.5, 'sample_rate': 44100, 'channels': 1, 'sample_width': 2}


def test_every_annotation_has_a_fresh_uuid_and_the_service_version(tone_silence_tone):
    annotations = annotate(Request(tone_silence_tone))
    assert len({uuid.UUID(a['@id']) for a in annotations}) == len(annotations) == 4
    assert {a['@version'] for a in annotations} == {'1.2.3'}


def test_annotations_are_plain_python_values(tone_silence_tone):
    annotations = annotate(Request(tone_silence_tone))
    assert all(type(value) in (str, int, float) for a in annotations for value in a.values())
    assert json.loads(json.dumps(annotations)) == annotations


@pytest.mark.parametrize('width', [1, 2, 3, 4])
def test_sample_width_in_bytes_is_read(tmp_path, width):
    signal = np.concatenate([silence(0.5), tone(1.0, amplitude=0.5)])
    path = write_wav(tmp_path / f'{8 * width}bit.wav', signal, width=width)
    audio, *segments = annotate(Request(path))
    assert audio['sample_width'] == width
    assert [(s['type'], s['start']) for s in segments] == [('silence', 0.0), ('sound', 0.5)]
    assert segments[1]['level'] == pytest.approx(-9.0, abs=0.1)


def test_24_bit_samples_keep_their_sign(tmp_path):
    path = write_wav(tmp_path / 'negative.wav', np.full(RATE, -0.5), width=3)
    assert analyse(str(path))[1][0]['level'] == pytest.approx(-6.0, abs=0.1)


def test_stereo_level_is_over_both_channels(tmp_path):
    path = write_wav(tmp_path / 'stereo.wav', np.column_stack([tone(1.0), silence(1.0)]))
    audio, segment = annotate(Request(path))
    assert audio['channels'] == 2
    assert segment['level'] == pytest.approx(-6.0, abs=0.1)  # -3 dBFS on half the samples


def test_any_channel_count_is_read(tmp_path):
    path = write_wav(tmp_path / 'six.wav', np.column_stack([tone(1.0)] * 6))
    audio, segment = annotate(Request(path))
    assert (audio['channels'], segment['level']) == (6, pytest.approx(-3.0, abs=0.1))


def test_progress_is_increasing_ints_from_0_to_100(tmp_path):
    request = Request(write_wav(tmp_path / 'long.wav', tone(5.0)))
    annotate(request)
    assert all(type(p) is int for p in request.progress)
    assert request.progress[0] == 0 and request.progress[-1] == 100
    assert request.progress == sorted(set(request.progress))
    assert len(request.progress) > 2


def test_threshold_db_from_misc_is_honoured(tmp_path):
    path = write_wav(tmp_path / 'quiet.wav', tone(1.0, amplitude=10 ** (-47 / 20)))  # -50 dBFS
    assert segments_of(annotate(Request(path)))[0]['type'] == 'silence'
    assert segments_of(annotate(Request(path, {'threshold_db': '-60'})))[0]['type'] == 'sound'


def test_window_from_misc_is_honoured(tmp_path):
    signal = np.concatenate([silence(1.2), tone(0.1), silence(0.7)])
    path = write_wav(tmp_path / 'click.wav', signal)
    segments = segments_of(annotate(Request(path, {'window': '0.5'})))
    assert [(s['type'], s['start'], s['end']) for s in segments] == [
        ('silence', 0.0, 1.0), ('sound', 1.0, 1.5), ('silence', 1.5, 2.0)]


def test_misc_may_give_json_numbers(tmp_path):
    path = write_wav(tmp_path / 'quiet.wav', tone(1.0, amplitude=10 ** (-47 / 20)))
    segments = segments_of(annotate(Request(path, {'threshold_db': -60, 'window': 1})))
    assert segments[0]['type'] == 'sound'


@pytest.mark.parametrize('name, value', [
    ('threshold_db', 'loud'), ('threshold_db', ''), ('threshold_db', '3'), ('threshold_db', 'nan'),
    ('threshold_db', '-inf'), ('threshold_db', None), ('threshold_db', True),
    ('window', '0'), ('window', '0.005'), ('window', '-0.1'), ('window', '10.5'), ('window', 'abc'), ('window', 'inf'),
    ('window', [1]),
])
def test_bad_misc_value_raises_value_error_naming_it(tone_silence_tone, name, value):
    with pytest.raises(ValueError, match=name):
        annotate(Request(tone_silence_tone, {name: value}))


def test_zero_frame_wav_gives_only_the_audio_annotation(tmp_path):
    request = Request(write_wav(tmp_path / 'empty.wav', np.zeros((0, 1))))
    annotations = annotate(request)
    assert [(a['type'], a['duration']) for a in annotations] == [('audio', 0.0)]
    assert request.progress == [0, 100]


@pytest.mark.parametrize('content', [
    pytest.param(b'this is not a wav file\n' * 10, id='text'),
    pytest.param(b'', id='empty'),
    pytest.param(wav_header(data_size=1000)[:30], id='truncated header'),
    pytest.param(wav_header(data_size=1000) + bytes(500), id='truncated data'),
    pytest.param(wav_header(format_tag=3, bits=32, data_size=400) + bytes(400),
                 id='32-bit float'),
    pytest.param(wav_header(bits=64, data_size=800) + bytes(800), id='64-bit PCM'),
    pytest.param(wav_header(rate=0, data_size=200) + bytes(200), id='zero sample rate'),
])
def test_not_a_readable_pcm_wav_raises_unsupported_document(tmp_path, content):
    path = tmp_path / 'document'
    path.write_bytes(content)
    with pytest.raises(UnsupportedDocument, match='WAV'):
        annotate(Request(path))
