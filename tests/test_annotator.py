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


def pcm_frames(signal, width):
    """``signal`` (floats in [-1, 1], one column per channel) as PCM frames, and its channels."""
    signal = np.asarray(signal, dtype=np.float64)
    frames = signal if signal.ndim == 2 else signal[:, np.newaxis]
    top = 2 ** (8 * width - 1) - 1
    samples = np.round(frames * top).astype('<i4')
    if width == 1:
        return (samples + 128).astype(np.uint8).tobytes(), frames.shape[1]
    # the low ``width`` bytes of each little-endian int32
    return samples.view(np.uint8).reshape(-1, 4)[:, :width].tobytes(), frames.shape[1]


def write_wav(path, signal, rate=RATE, width=2):
    """Write ``signal`` (floats in [-1, 1], one column per channel) as a PCM WAV file."""
    data, channels = pcm_frames(signal, width)
    with wave.open(str(path), 'wb') as wav:
        wav.setnchannels(channels)
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


PCM_SUBFORMAT = uuid.UUID('00000001-0000-0010-8000-00aa00389b71')
FLOAT_SUBFORMAT = uuid.UUID('00000003-0000-0010-8000-00aa00389b71')


def chunk(name, body, size=None):
    """A RIFF chunk: name, size (``body``'s unless given) and body, padded to an even length."""
    size = len(body) if size is None else size
    return name + struct.pack('<L', size) + body + bytes(len(body) % 2)


def riff_wave(*chunks, size=None):
    """A RIFF/WAVE file of ``chunks``, its RIFF size that of its content unless given."""
    return chunk(b'RIFF', b'WAVE' + b''.join(chunks), size)


def fmt_chunk(channels, width, rate=RATE, valid_bits=None, subformat=PCM_SUBFORMAT,
              extensible=True, block_align=None):
    """A fmt chunk, WAVE_FORMAT_EXTENSIBLE (cbSize 22) unless ``extensible`` is false."""
    block_align = block_align or channels * width
    body = struct.pack('<HHLLHH', 0xFFFE if extensible else 1, channels, rate,
                       rate * block_align, block_align, 8 * width)
    if extensible:
        mask = (1 << channels) - 1  # the first speaker positions, as SoX sets them
        body += struct.pack('<HHL', 22, valid_bits or 8 * width, mask) + subformat.bytes_le
    return chunk(b'fmt ', body)


def without_ids(annotations):
    return [{k: v for k, v in a.items() if k != '@id'} for a in annotations]


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


def several_channels(channels, seconds=2.0):
    """Each channel a tone between silences, at its own time and level, so that they differ."""
    return np.column_stack([
        np.concatenate([silence(0.2 * c), tone(0.6, amplitude=0.8 / (c + 1)),
                        silence(seconds - 0.6 - 0.2 * c)]) for c in range(channels)])


@pytest.mark.parametrize('width, channels', [(3, 1), (2, 4), (4, 2)],
                         ids=['24-bit mono', '16-bit 4 channels', '32-bit stereo'])
def test_extensible_pcm_gives_the_annotations_of_plain_pcm(tmp_path, width, channels):
    signal = several_channels(channels)
    plain = write_wav(tmp_path / 'plain.wav', signal, width=width)
    frames, _ = pcm_frames(signal, width)
    extensible = tmp_path / 'extensible.wav'
    extensible.write_bytes(riff_wave(fmt_chunk(channels, width), chunk(b'data', frames)))
    assert struct.unpack_from('<H', extensible.read_bytes(), 20) == (0xFFFE,)  # the format tag
    expected = without_ids(annotate(Request(plain)))
    assert expected[0]['channels'] == channels and len(expected) > 2
    assert without_ids(annotate(Request(extensible))) == expected


def test_extensible_float_subformat_is_refused(tmp_path):
    path = tmp_path / 'float.wav'
    path.write_bytes(riff_wave(fmt_chunk(1, 4, subformat=FLOAT_SUBFORMAT),
                               chunk(b'data', np.zeros(RATE, '<f4').tobytes())))
    with pytest.raises(UnsupportedDocument, match=r'not a PCM WAV file: .*sub-format '
                       r'00000003-0000-0010-8000-00aa00389b71 \(IEEE floating point\)'):
        annotate(Request(path))


def test_valid_bits_fewer_than_the_container_width_are_refused(tmp_path):
    path = tmp_path / '20_in_24.wav'
    path.write_bytes(riff_wave(fmt_chunk(1, 3, valid_bits=20), chunk(b'data', bytes(3 * RATE))))
    with pytest.raises(UnsupportedDocument, match='20-bit samples in 24-bit containers'):
        annotate(Request(path))


@pytest.mark.parametrize('extensible', [False, True], ids=['plain', 'extensible'])
def test_odd_sized_chunks_are_skipped_with_their_pad_byte(tmp_path, extensible):
    signal = np.concatenate([tone(0.5), silence(0.5)])
    plain = write_wav(tmp_path / 'plain.wav', signal)
    frames, _ = pcm_frames(signal, 2)
    path = tmp_path / 'odd_chunks.wav'
    # Odd-sized chunks before fmt and before data, and one after data that is not audio.
    path.write_bytes(riff_wave(chunk(b'junk', b'abc'), fmt_chunk(1, 2, extensible=extensible),
                               chunk(b'LIST', b'INFOx'), chunk(b'data', frames),
                               chunk(b'LIST', b'\xff\x7f' * 4001)))
    assert without_ids(annotate(Request(path))) == without_ids(annotate(Request(plain)))


@pytest.mark.parametrize('extensible', [False, True], ids=['plain', 'extensible'])
def test_unknown_data_size_is_read_to_the_end_of_the_file(tmp_path, extensible):
    signal = np.concatenate([tone(0.7), silence(0.6)])
    plain = write_wav(tmp_path / 'plain.wav', signal, width=3)
    frames, _ = pcm_frames(signal, 3)
    path = tmp_path / 'streamed.wav'
    # As ffmpeg writes to a pipe: both sizes 0xFFFFFFFF. The stream stopped within a frame.
    path.write_bytes(riff_wave(fmt_chunk(1, 3, extensible=extensible),
                               chunk(b'data', b'', size=0xFFFFFFFF), size=0xFFFFFFFF)
                     + frames + b'\x01\x02')
    request = Request(path)
    assert without_ids(annotate(request)) == without_ids(annotate(Request(plain)))
    assert request.progress[-1] == 100


def test_data_size_beyond_the_end_of_the_file_is_truncation(tmp_path):
    frames, _ = pcm_frames(tone(1.0), 2)
    path = tmp_path / 'cut.wav'
    path.write_bytes(riff_wave(fmt_chunk(1, 2), chunk(b'data', frames, size=2 * len(frames))))
    with pytest.raises(UnsupportedDocument, match=f'announces {2 * RATE} frames, it holds {RATE}'):
        annotate(Request(path))


@pytest.mark.parametrize('content, message', [
    pytest.param(b'RIFF\x04\x00\x00\x00AVI ', 'not a WAVE file', id='not WAVE'),
    pytest.param(riff_wave(chunk(b'data', bytes(100))), 'no fmt chunk before the data chunk',
                 id='no fmt'),
    pytest.param(riff_wave(fmt_chunk(1, 2)), 'no data chunk', id='no data'),
    pytest.param(riff_wave(fmt_chunk(1, 2), chunk(b'LIST', b'', size=1000)),
                 'ends too early', id='chunk past the end'),
    pytest.param(riff_wave(chunk(b'fmt ', fmt_chunk(1, 2)[8:8 + 18]), chunk(b'data', bytes(100))),
                 'WAVE_FORMAT_EXTENSIBLE fmt chunk is too short', id='short extensible fmt'),
    pytest.param(riff_wave(fmt_chunk(1, 2, subformat=uuid.UUID(int=7)), chunk(b'data', bytes(2))),
                 'sub-format 00000000-0000-0000-0000-000000000007, only PCM', id='other subformat'),
    pytest.param(riff_wave(fmt_chunk(2, 2, block_align=6), chunk(b'data', bytes(600))),
                 'block align is 6 bytes, not 2 channels of 2 bytes', id='block align'),
    pytest.param(riff_wave(fmt_chunk(0, 2, block_align=2), chunk(b'data', bytes(600))),
                 '0 channels', id='no channels'),
    pytest.param(riff_wave(fmt_chunk(1, 8), chunk(b'data', bytes(800))),
                 'unsupported WAV file: 64-bit samples', id='extensible 64-bit'),
    # The messages the annotator's documentation gives as examples.
    pytest.param(b'this is not a wav file\n',
                 'not a PCM WAV file: file does not start with RIFF id', id='text'),
    pytest.param(wav_header(format_tag=3, bits=32, data_size=4) + bytes(4),
                 'not a PCM WAV file: unknown format: 3', id='float'),
    pytest.param(wav_header(data_size=1000) + bytes(500),
                 'truncated WAV file: its header announces 500 frames, it holds 250',
                 id='truncated'),
])
def test_refusal_says_why(tmp_path, content, message):
    path = tmp_path / 'document'
    path.write_bytes(content)
    with pytest.raises(UnsupportedDocument, match=message):
        analyse(str(path))
