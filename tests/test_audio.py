"""models/audio.py: decoding every accepted format at any rate, cleaning, and each bad input."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from models import audio

FORMATS = [("WAV", "wav", "PCM_16"), ("FLAC", "flac", "PCM_16"), ("OGG", "ogg", "VORBIS"),
           ("MP3", "mp3", "MPEG_LAYER_III")]


def tone(rate: int, seconds: float = 1.0, channels: int = 1, level: float = 0.3, lead_silence: float = 0.0):
    t = np.arange(int(rate * seconds)) / rate
    signal = level * np.sin(2 * np.pi * 330 * t)
    signal = np.concatenate([np.zeros(int(rate * lead_silence)), signal, np.zeros(int(rate * lead_silence))])
    if channels == 2:
        return np.stack([signal, 0.5 * signal], axis=1).astype(np.float32)
    return signal.astype(np.float32)


def write(tmp_path, name, samples, rate, fmt="WAV", subtype=None):
    if fmt == "MP3" and "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile cannot write MP3 (needs libsndfile >= 1.1 built with mpg123/lame)")
    path = tmp_path / name
    sf.write(str(path), samples, rate, format=fmt, subtype=subtype)
    return path


@pytest.mark.parametrize("fmt,ext,subtype", FORMATS)
@pytest.mark.parametrize("rate,channels", [(8000, 1), (44100, 2), (48000, 2)])
def test_formats_and_rates_load_as_16k_mono(tmp_path, fmt, ext, subtype, rate, channels):
    path = write(tmp_path, f"tone.{ext}", tone(rate, 1.0, channels), rate, fmt, subtype)
    clip = audio.load_audio(path)
    assert clip.sample_rate == 16000 and clip.samples.ndim == 1 and clip.samples.dtype == np.float32
    assert clip.source_rate == rate and clip.source_channels == channels
    assert 0.9 < clip.seconds < 1.2
    assert np.max(np.abs(clip.samples)) == pytest.approx(audio.PEAK_LEVEL, rel=1e-3)


def test_silence_is_trimmed_and_level_normalized(tmp_path):
    path = write(tmp_path, "quiet.wav", tone(22050, 1.0, level=0.01, lead_silence=1.0), 22050)
    clip = audio.load_audio(path)
    assert clip.source_seconds == pytest.approx(3.0, abs=0.01)
    assert clip.seconds < 1.3  # two seconds of leading and trailing silence are gone
    assert np.max(np.abs(clip.samples)) == pytest.approx(audio.PEAK_LEVEL, rel=1e-3)


def test_bad_inputs_have_clear_messages(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio at all\n" * 20)
    good = write(tmp_path, "good.wav", tone(16000), 16000).read_bytes()
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\xff\xff\xff\xffWAVEfmt \x02\x00\x00\x00" + b"\x00" * 20 + good[44:])
    silent = write(tmp_path, "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    cases = {None: "No audio", "": "No audio", str(tmp_path / "missing.wav"): "does not exist",
             str(empty): r"empty \(0 bytes\)", str(text): "damaged or not audio", str(corrupt): "damaged",
             str(silent): "silent"}
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message):
            audio.load_audio(path)


def test_too_long_is_refused_before_decoding(tmp_path):
    path = write(tmp_path, "long.flac", tone(8000, 4.0), 8000, "FLAC")
    with pytest.raises(ValueError, match="limit is"):
        audio.load_audio(path, max_seconds=3.0)


def test_clean_rejects_nan_and_write_wav_round_trips(tmp_path):
    with pytest.raises(ValueError, match="invalid"):
        audio.clean(np.array([0.1, np.nan] * 1000), 16000)
    path = audio.write_wav(tmp_path / "out.wav", tone(22050), 22050)
    data, rate = sf.read(str(path), dtype="int16")
    assert rate == 22050 and data.dtype == np.int16 and len(data) == 22050
