"""Audio loading and validation for the voice assistant: any common file in, clean 16 kHz mono out.

``load_audio`` decodes WAV, FLAC, MP3 and OGG (libsndfile through soundfile; other containers
through librosa's audioread fallback), mixes to mono, resamples to 16 kHz, trims leading and
trailing silence and normalizes the peak level. Bad input raises ``ValueError`` with a message a
user can act on. numpy, soundfile and librosa are imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path

from models.errors import InvalidRequest

log = logging.getLogger(__name__)

TARGET_RATE = 16_000
MAX_AUDIO_SECONDS = 600.0  # 10 minutes: 20 Whisper chunks, still minutes of CPU time with a real model
MIN_SPEECH_SECONDS = 0.1
SILENCE_PEAK = 10 ** (-60 / 20)  # below -60 dBFS at its loudest, a recording holds nothing to transcribe
TRIM_TOP_DB = 40  # anything 40 dB under the peak at the edges counts as silence
PEAK_LEVEL = 10 ** (-1 / 20)  # normalize the peak to -1 dBFS
FORMATS_HINT = "WAV, FLAC, MP3 or OGG"


@dataclasses.dataclass(frozen=True)
class AudioClip:
    """Decoded, cleaned audio.

    Attributes:
        samples: float32 mono samples in [-1, 1] at ``sample_rate``.
        sample_rate: always TARGET_RATE after ``load_audio``.
        source_rate: the file's own sample rate.
        source_channels: the file's channel count.
        source_seconds: the file's duration before trimming.
    """

    samples: object
    sample_rate: int
    source_rate: int
    source_channels: int
    source_seconds: float

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def _checked_path(path) -> Path:
    if path is None or (isinstance(path, str) and not path.strip()):
        raise InvalidRequest("No audio: record with the microphone, upload a file, or type a message.")
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidRequest(f"audio must be a file path, got {type(path).__name__}")
    file = Path(path)
    if not file.is_file():
        raise InvalidRequest(f"Audio file {file.name!r} does not exist.")
    if file.stat().st_size == 0:
        raise InvalidRequest(f"Audio file {file.name!r} is empty (0 bytes); record or upload again.")
    return file


def _too_long(seconds: float, max_seconds: float) -> ValueError:
    return ValueError(f"The audio is {seconds / 60:.1f} minutes long; the limit is {max_seconds / 60:.0f} minutes. "
                      "Cut it into shorter parts.")


def _decode(file: Path, max_seconds: float):
    """(samples [frames, channels] float32, rate) through libsndfile, else librosa/audioread."""
    import numpy as np
    import soundfile as sf

    try:
        info = sf.info(str(file))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        log.debug("libsndfile cannot read %s (%s); trying audioread", file.name, exc)
        info = None
    if info is not None:
        if info.samplerate <= 0 or info.frames <= 0:
            raise InvalidRequest(f"Audio file {file.name!r} holds no samples; record or upload again.")
        if info.frames / info.samplerate > max_seconds:
            raise _too_long(info.frames / info.samplerate, max_seconds)
        try:
            samples, rate = sf.read(str(file), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise InvalidRequest(f"Audio file {file.name!r} is damaged and cannot be decoded ({exc}).") from exc
        return samples, int(rate)
    import librosa

    try:  # audioread: whatever the system decoders (ffmpeg, gstreamer) handle; capped at the limit
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # librosa warns that audioread is deprecated on every fallback
            samples, rate = librosa.load(str(file), sr=None, mono=False, duration=max_seconds + 1.0,
                                         dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - audioread raises many unrelated types for non-audio input
        raise InvalidRequest(f"{file.name!r} cannot be decoded: it is damaged or not audio. "
                         f"Use {FORMATS_HINT}.") from exc
    samples = np.atleast_2d(samples).T if samples.ndim == 1 else samples.T
    if len(samples) / rate > max_seconds:
        raise _too_long(len(samples) / rate, max_seconds)
    return samples.astype(np.float32), int(rate)


def clean(samples, rate: int, target_rate: int = TARGET_RATE, what: str = "The recording"):
    """Mono, resampled, trimmed and peak-normalized float32 samples; ValueError when silent."""
    import librosa
    import numpy as np

    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if samples.size == 0:
        raise InvalidRequest(f"{what} is empty; record or upload again.")
    if not np.all(np.isfinite(samples)):
        raise InvalidRequest(f"{what} contains invalid (NaN or infinite) samples.")
    peak = float(np.max(np.abs(samples)))
    if peak < SILENCE_PEAK:
        raise InvalidRequest(f"{what} is silent; check the microphone and speak closer to it.")
    if rate != target_rate:
        samples = librosa.resample(samples, orig_sr=rate, target_sr=target_rate)
    trimmed, _ = librosa.effects.trim(samples, top_db=TRIM_TOP_DB)
    if len(trimmed) < MIN_SPEECH_SECONDS * target_rate:
        raise InvalidRequest(f"{what} has less than {MIN_SPEECH_SECONDS} s of sound once silence is trimmed.")
    trimmed = trimmed * (PEAK_LEVEL / float(np.max(np.abs(trimmed))))
    return trimmed.astype(np.float32)


def load_audio(path, max_seconds: float = MAX_AUDIO_SECONDS, target_rate: int = TARGET_RATE) -> AudioClip:
    """Decode and clean an audio file for speech recognition.

    Args:
        path: a file path (what gr.Audio(type="filepath") gives).
        max_seconds: longest accepted duration before trimming.
        target_rate: output sample rate.

    Raises:
        ValueError: no file, empty file, not audio, damaged, too long, or silent.
    """
    file = _checked_path(path)
    samples, rate = _decode(file, max_seconds)
    source_seconds = len(samples) / rate
    cleaned = clean(samples, rate, target_rate)
    return AudioClip(samples=cleaned, sample_rate=target_rate, source_rate=rate,
                     source_channels=int(samples.shape[1]), source_seconds=source_seconds)


def to_int16(samples):
    """float samples in [-1, 1] as int16 PCM (what gr.Audio writes to WAV without a warning)."""
    import numpy as np

    return (np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767).astype(np.int16)


def write_wav(path, samples, sample_rate: int) -> Path:
    """Write 16-bit PCM WAV; returns the path."""
    import soundfile as sf

    sf.write(str(path), to_int16(samples), int(sample_rate), subtype="PCM_16")
    return Path(path)
