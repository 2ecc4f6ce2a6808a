"""models/audio.py: decoding every accepted format at any rate, cleaning, each bad input, and the limits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from models import audio
from models.errors import TooLarge
from models.limits import Limits

ROOT = Path(__file__).resolve().parents[1]

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


def constant_flac(path, rate: int, channels: int, seconds: float, level: float = 0.25) -> Path:
    """A FLAC of a constant signal, written a second at a time: it encodes fast and compresses to almost
    nothing (10 minutes at 192 kHz with 8 channels is under 1 MB) yet decodes to every one of its samples."""
    second = np.full((rate, channels), round(level * 32767), np.int16)
    with sf.SoundFile(str(path), "w", rate, channels, format="FLAC", subtype="PCM_16") as file:
        for _ in range(int(seconds)):
            file.write(second)
        file.write(second[: round(seconds % 1 * rate)])
    return Path(path)


def reference_clean(path) -> np.ndarray:
    """What load_audio gave when it decoded the whole file at once (the code before issue #15)."""
    import librosa

    samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = librosa.resample(samples.mean(axis=1), orig_sr=rate, target_sr=16000)
    trimmed, _ = librosa.effects.trim(mono, top_db=audio.TRIM_TOP_DB)
    return (trimmed * (audio.PEAK_LEVEL / float(np.max(np.abs(trimmed))))).astype(np.float32)


PROBE = """
import json, resource, sys, time
from models import audio
from models.errors import TooLarge

audio.load_audio(sys.argv[1])  # warm up: imports and librosa's first calls are not what is measured
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    outcome = f"{audio.load_audio(sys.argv[2]).source_seconds:.1f} s"
except TooLarge as exc:
    outcome = str(exc)
growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - start, "growth_mb": growth_mb}))
"""


def measure_load(tmp_path, path) -> dict:
    """load_audio(path) in a fresh interpreter: its outcome, wall time and peak RSS growth."""
    warm = write(tmp_path, "warm.wav", tone(48000, 0.5, channels=2), 48000)
    done = subprocess.run([sys.executable, "-c", PROBE, str(warm), str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def hostile_flac(tmp_path_factory):
    # the /transcribe report: 950 KB, 9 min 58 s at 192 kHz with 8 channels, 3.7 GB once decoded to float32
    return constant_flac(tmp_path_factory.mktemp("hostile") / "hostile.flac", 192_000, 8, 598)


def test_audio_that_decodes_huge_is_refused_from_the_header(tmp_path, hostile_flac):
    assert hostile_flac.stat().st_size < 1_500_000
    result = measure_load(tmp_path, hostile_flac)
    assert result["outcome"] == (
        "The audio is 9 min 58 s at 192 kHz, 8 channels: 919 million samples to decode; the limit is 60 million "
        "(10 min 25 s of 48 kHz stereo). Save it at a lower rate or with fewer channels (speech recognition uses "
        "16 kHz mono), or cut it shorter.")
    assert result["seconds"] < 1.0 and result["growth_mb"] < 200, result


def test_long_file_decodes_in_blocks_with_bounded_memory(tmp_path):
    # 9 min 50 s of 48 kHz stereo is within the limits: 226 MB as float32, 38 MB once 16 kHz mono
    path = constant_flac(tmp_path / "long.flac", 48_000, 2, 590)
    result = measure_load(tmp_path, path)
    assert result["outcome"] == "590.0 s"
    assert result["growth_mb"] < 150, result  # decoding the whole file took over 400 MB


@pytest.mark.parametrize("fmt,ext,subtype,rate,channels", [
    (*fmt, rate, channels) for fmt in FORMATS for rate, channels in [(8000, 1), (44100, 2), (48000, 2), (192000, 8)]
    if rate <= 48000 or fmt[0] in ("WAV", "FLAC")])
def test_block_decoding_gives_the_samples_of_whole_file_decoding(tmp_path, monkeypatch, fmt, ext, subtype, rate,
                                                                 channels):
    # MP3 also checks that blocks are read forward only: libsndfile's MP3 decoder corrupts samples after a seek
    monkeypatch.setattr(audio, "BLOCK_FRAMES", 1000)  # many blocks, and many resampler calls
    noise = np.random.default_rng(0).normal(0, 0.02, (int(rate * 1.5), channels)).astype(np.float32)
    samples = noise + (tone(rate, 1.5, 2) if channels == 2 else tone(rate, 1.5)[:, None])[:, :channels]
    samples[: rate // 4] *= 0.001  # a quiet start for trimming to cut
    path = write(tmp_path, f"speech.{ext}", samples, rate, fmt, subtype)
    clip = audio.load_audio(path)
    expected = reference_clean(path)
    assert clip.samples.shape == expected.shape
    assert np.max(np.abs(clip.samples - expected)) < 1e-3


def test_too_long_is_refused_before_decoding(tmp_path):
    path = constant_flac(tmp_path / "long.flac", 8000, 1, 601)  # 10 min 01 s
    for kwargs in ({}, {"max_seconds": 10_000}):  # max_seconds cannot raise the limit
        with pytest.raises(TooLarge, match=r"^The audio is 10 min 01 s long; the limit is 10 min 00 s\. Cut it"):
            audio.load_audio(path, **kwargs)
    with pytest.raises(TooLarge, match=r"is 10 min 01 s long; the limit is 1 min 00 s"):
        audio.load_audio(path, max_seconds=60)
    with pytest.raises(TooLarge, match=r"is 10 min 01 s long; the limit is 5 min 00 s"):
        audio.load_audio(path, limits=Limits(audio_seconds=300))
    short = write(tmp_path, "short.flac", tone(8000, 3.2), 8000, "FLAC")
    with pytest.raises(TooLarge, match=r"is 3.2 s long; the limit is 3.0 s"):
        audio.load_audio(short, max_seconds=3.0)
    assert audio.load_audio(path, limits=Limits(audio_seconds=700)).source_seconds == pytest.approx(601)


def test_sample_limit_counts_rate_and_channels(tmp_path):
    path = write(tmp_path, "wide.wav", tone(48000, 1.0, channels=2), 48000)
    with pytest.raises(TooLarge, match=r"is 1.0 s at 48 kHz, stereo: 0.096 million samples to decode; the limit is "
                                       r"0.05 million \(0.5 s of 48 kHz stereo\)"):
        audio.load_audio(path, limits=Limits(audio_samples=50_000))
    assert audio.load_audio(path, limits=Limits(audio_samples=96_000)).source_channels == 2


def test_a_header_that_lies_cannot_make_decoding_unbounded():
    def endless():  # what a stream without a length (or with a wrong one) decodes to
        while True:
            yield np.full((1000, 2), 0.1, np.float32)

    for limits, message in [(Limits(), "longer than the limit of 1.0 s"),
                            (Limits(audio_samples=10_000), "at 16 kHz, stereo, is more than 0.012 million samples")]:
        source = audio._Source(rate=16000, channels=2, frames=None, blocks=endless())
        with pytest.raises(TooLarge, match=message):
            for _ in audio._capped(source, max_seconds=1.0, limits=limits):
                pass


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="audioread decodes AAC through ffmpeg")
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # librosa.load's audioread notices
def test_audioread_fallback_is_bounded_too(tmp_path):
    import librosa

    path = tmp_path / "surround.m4a"  # AAC, which libsndfile cannot read; 6 channels, so frames span buffers
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=330:duration=2.5:sample_rate=48000",
                    "-ac", "6", "-c:a", "aac", str(path)], check=True, timeout=60)
    with pytest.raises(sf.LibsndfileError):
        sf.info(str(path))
    clip = audio.load_audio(path)
    assert clip.source_rate == 48000 and clip.source_channels == 6 and clip.source_seconds == pytest.approx(2.5, 0.05)
    whole, _ = librosa.load(str(path), sr=None, mono=False)  # the whole file at once, as before issue #15
    expected = audio.clean(whole.T, 48000)
    assert clip.samples.shape == expected.shape and np.max(np.abs(clip.samples - expected)) < 1e-3
    with pytest.raises(TooLarge, match=r"2.5 s at 48 kHz, 6 channels: 0.72 million samples"):
        audio.load_audio(path, limits=Limits(audio_samples=200_000))
    with pytest.raises(TooLarge, match=r"is 2.5 s long; the limit is 2.0 s"):
        audio.load_audio(path, max_seconds=2)


def test_clean_rejects_nan_and_write_wav_round_trips(tmp_path):
    with pytest.raises(ValueError, match="invalid"):
        audio.clean(np.array([0.1, np.nan] * 1000), 16000)
    path = audio.write_wav(tmp_path / "out.wav", tone(22050), 22050)
    data, rate = sf.read(str(path), dtype="int16")
    assert rate == 22050 and data.dtype == np.int16 and len(data) == 22050
