"""Audio loading and validation for the voice assistant: any common file in, clean 16 kHz mono out.

``load_audio`` decodes WAV, FLAC, MP3 and OGG (libsndfile through soundfile; other containers
through audioread and the system's decoders), mixes to mono, resamples to 16 kHz, trims leading
and trailing silence and normalizes the peak level. Bad input raises ``InvalidRequest``
(``TooLarge`` for the limits) with a message a user can act on. numpy, soundfile, soxr, audioread
and librosa are imported inside the functions.

Memory is bounded by the output, never by the file. A 950 KB FLAC of 10 minutes at 192 kHz with
8 channels decodes to 3.7 GB of float32, so the length and the number of samples a file decodes
to (rate x channels x seconds) are checked from its header before decoding, and decoding runs one
block at a time, each block mixed to mono and resampled as it arrives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

from models.errors import InvalidRequest, TooLarge
from models.limits import Limits, format_seconds

log = logging.getLogger(__name__)

TARGET_RATE = 16_000
BLOCK_FRAMES = 65_536  # frames decoded per step: 2 MB of float32 even at 192 kHz with 8 channels
MIN_SPEECH_SECONDS = 0.1
SILENCE_PEAK = 10 ** (-60 / 20)  # below -60 dBFS at its loudest, a recording holds nothing to transcribe
TRIM_TOP_DB = 40  # anything 40 dB under the peak at the edges counts as silence
TRIM_FRAME, TRIM_HOP = 2048, 512  # librosa.effects.trim's frames, which these bounds reproduce
TRIM_BLOCK = 1024  # frames measured per step: 8 MB of framed float32
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


@dataclasses.dataclass(frozen=True)
class _Source:
    """An opened file: its header, and its float32 ``[frames, channels]`` blocks (decoded when iterated)."""

    rate: int
    channels: int
    frames: int | None  # None: the header does not say
    blocks: Iterator


def load_audio(path, max_seconds: float | None = None, target_rate: int = TARGET_RATE,
               limits: Limits | None = None) -> AudioClip:
    """Decode and clean an audio file for speech recognition.

    Args:
        path: a file path (what gr.Audio(type="filepath") gives).
        max_seconds: longest accepted duration before trimming; never more than
            ``limits.audio_seconds``, which is the default.
        target_rate: output sample rate.
        limits: the request limits (default ``Limits()``; the app passes ``settings.limits``).

    Raises:
        InvalidRequest: no file, empty file, not audio, damaged, or silent.
        TooLarge: longer than ``max_seconds``, or more samples to decode than ``limits.audio_samples``.
    """
    limits = limits or Limits()
    max_seconds = limits.audio_seconds if max_seconds is None else min(float(max_seconds), limits.audio_seconds)
    file = _checked_path(path)
    with _open(file) as source:
        # 1. Refuse from the header, before decoding anything.
        if source.rate <= 0 or source.frames == 0 or source.channels <= 0:
            raise InvalidRequest(f"Audio file {file.name!r} holds no samples; record or upload again.")
        if source.frames is not None:
            _check_size(source.frames, source.rate, source.channels, max_seconds, limits)
        # 2. Decode one block at a time, mixed to mono and resampled as it arrives.
        blocks = _capped(source, max_seconds, limits)
        samples, frames = _to_mono(blocks, source.rate, target_rate, "The recording")
    # 3. Trim and normalize at the target rate.
    cleaned = _trim_and_normalize(samples, target_rate, "The recording")
    return AudioClip(samples=cleaned, sample_rate=target_rate, source_rate=source.rate,
                     source_channels=source.channels, source_seconds=frames / source.rate)


def clean(samples, rate: int, target_rate: int = TARGET_RATE, what: str = "The recording"):
    """Mono, resampled, trimmed and peak-normalized float32 samples from an array already in memory.

    Raises:
        InvalidRequest: empty, NaN or infinite samples, silent, or too little sound once trimmed.
    """
    import numpy as np

    samples = np.asarray(samples, dtype=np.float32)
    mono, _ = _to_mono(iter([samples if samples.ndim == 2 else samples[:, None]]), rate, target_rate, what)
    return _trim_and_normalize(mono, target_rate, what)


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


def _check_size(frames: int, rate: int, channels: int, max_seconds: float, limits: Limits,
                exact: bool = True) -> None:
    """Refuse ``frames`` over the length limit or over ``limits.audio_samples`` once decoded.

    ``exact=False`` when decoding has stopped at the limit, so the real length is unknown.
    """
    seconds = frames / rate
    if seconds > max_seconds:
        # rounded up, so a length just over the limit never reads the same as the limit
        length = format_seconds(math.ceil(seconds) if seconds >= 60 else math.ceil(seconds * 10) / 10)
        said = f"is {length} long; the limit is" if exact else "is longer than the limit of"
        raise TooLarge(f"The audio {said} {format_seconds(max_seconds)}. Cut it into shorter parts.")
    samples = frames * channels
    if samples > limits.audio_samples:
        layout = {1: "mono", 2: "stereo"}.get(channels, f"{channels} channels")
        said = f"is {format_seconds(seconds)} at {rate / 1000:g} kHz, {layout}:" if exact else \
            f"at {rate / 1000:g} kHz, {layout}, is more than"
        raise TooLarge(f"The audio {said} {_millions(samples)} million samples to decode; the limit is "
                       f"{_millions(limits.audio_samples)} million ({format_seconds(limits.audio_samples / 96_000)} "
                       "of 48 kHz stereo). Save it at a lower rate or with fewer channels (speech recognition "
                       "uses 16 kHz mono), or cut it shorter.")


def _capped(source: _Source, max_seconds: float, limits: Limits) -> Iterator:
    """``source.blocks``, refused as soon as they pass a limit (for headers that are missing or wrong)."""
    max_frames = min(math.floor(max_seconds * source.rate), limits.audio_samples // source.channels)
    decoded = 0
    for block in source.blocks:
        decoded += len(block)
        if decoded > max_frames:
            _check_size(decoded, source.rate, source.channels, max_seconds, limits, exact=False)
        yield block


def _millions(count: int) -> str:
    return f"{count / 1e6:,.0f}" if count >= 10_000_000 else f"{count / 1e6:.2g}"


@contextlib.contextmanager
def _open(file: Path) -> Iterator[_Source]:
    """The file opened through libsndfile, else audioread; only the header is read here."""
    import soundfile as sf

    try:
        handle = sf.SoundFile(str(file))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        log.debug("libsndfile cannot read %s (%s); trying audioread", file.name, exc)
    else:
        with handle:
            yield _Source(handle.samplerate, handle.channels, handle.frames, _soundfile_blocks(handle, file.name))
        return
    with _audioread_open(file) as source:
        yield source


def _soundfile_blocks(handle, name: str) -> Iterator:
    import soundfile as sf

    # soundfile seeks to where it already is after every read, and libsndfile's MP3 decoder
    # restarts on any seek, corrupting the next few thousand samples; these reads go forward only.
    handle.seekable = lambda: False
    try:
        while len(block := handle.read(BLOCK_FRAMES, dtype="float32", always_2d=True)):
            yield block
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise InvalidRequest(f"Audio file {name!r} is damaged and cannot be decoded ({exc}).") from exc


def _not_audio(name: str) -> InvalidRequest:
    return InvalidRequest(f"{name!r} cannot be decoded: it is damaged or not audio. Use {FORMATS_HINT}.")


@contextlib.contextmanager
def _audioread_open(file: Path) -> Iterator[_Source]:
    """audioread: whatever the system decoders (ffmpeg, gstreamer) handle, as 16-bit PCM buffers."""
    import audioread

    try:
        reader = audioread.audio_open(str(file))
    except Exception as exc:  # noqa: BLE001 - audioread raises many unrelated types for non-audio input
        raise _not_audio(file.name) from exc
    with reader:
        frames = round(reader.duration * reader.samplerate) if reader.duration else None
        yield _Source(reader.samplerate, reader.channels, frames, _audioread_blocks(reader, file.name))


def _audioread_blocks(reader, name: str) -> Iterator:
    """float32 ``[frames, channels]`` blocks of about BLOCK_FRAMES from audioread's small byte buffers."""
    frame_bytes = 2 * reader.channels
    pending = bytearray()
    try:
        for buffer in reader:
            pending += buffer
            if len(pending) >= BLOCK_FRAMES * frame_bytes:
                yield _pcm16(pending, reader.channels)
    except Exception as exc:  # noqa: BLE001 - as above, decoders fail with their own types
        raise _not_audio(name) from exc
    if len(pending) >= frame_bytes:
        yield _pcm16(pending, reader.channels)


def _pcm16(pending: bytearray, channels: int):
    """The whole frames in ``pending`` as float32 (as librosa scales them), removed from it."""
    import numpy as np

    whole = len(pending) - len(pending) % (2 * channels)  # a buffer may end inside a frame
    block = np.frombuffer(bytes(pending[:whole]), "<i2").reshape(-1, channels).astype(np.float32)
    del pending[:whole]
    return block * np.float32(1 / 32768)


def _to_mono(blocks: Iterator, rate: int, target_rate: int, what: str):
    """``(samples, frames)``: mono float32 at ``target_rate``, and the number of source frames.

    Each block is checked, mixed to mono and resampled (soxr, librosa's default resampler) as it
    arrives, so memory holds the output and one block, never the decoded file.
    """
    import numpy as np
    import soxr

    stream = soxr.ResampleStream(rate, target_rate, 1, dtype="float32", quality="HQ") \
        if rate != target_rate else None
    pieces, frames, peak = [], 0, 0.0
    for block in blocks:
        mono = block.mean(axis=1)
        if not np.all(np.isfinite(mono)):
            raise InvalidRequest(f"{what} contains invalid (NaN or infinite) samples.")
        if mono.size:
            peak = max(peak, float(np.max(np.abs(mono))))
        frames += len(mono)
        pieces.append(stream.resample_chunk(mono) if stream else mono)
    if frames == 0:
        raise InvalidRequest(f"{what} is empty; record or upload again.")
    if peak < SILENCE_PEAK:
        raise InvalidRequest(f"{what} is silent; check the microphone and speak closer to it.")
    if stream:
        pieces.append(stream.resample_chunk(np.zeros(0, np.float32), last=True))
    # the length librosa.resample gives (it pads or cuts the last sample)
    expected = math.ceil(frames * target_rate / rate)
    produced = sum(len(piece) for piece in pieces)
    if produced < expected:
        pieces.append(np.zeros(expected - produced, np.float32))
    return np.concatenate(pieces)[:expected], frames


def _trim_and_normalize(samples, rate: int, what: str):
    import numpy as np

    start, end = _trim_bounds(samples)
    if end - start < MIN_SPEECH_SECONDS * rate:
        raise InvalidRequest(f"{what} has less than {MIN_SPEECH_SECONDS} s of sound once silence is trimmed.")
    trimmed = samples[start:end]
    return trimmed * np.float32(PEAK_LEVEL / float(np.max(np.abs(trimmed))))


def _trim_bounds(samples) -> tuple[int, int]:
    """The bounds ``librosa.effects.trim(samples, top_db=TRIM_TOP_DB)`` gives, measured in blocks of frames.

    librosa frames the whole signal at once, a copy four times its size; this needs one block.
    """
    import librosa
    import numpy as np

    half = TRIM_FRAME // 2
    count = 1 + len(samples) // TRIM_HOP  # frames centred on every hop, the signal padded with zeros
    rms = []
    for first in range(0, count, TRIM_BLOCK):
        last = min(first + TRIM_BLOCK, count)
        start, stop = first * TRIM_HOP - half, (last - 1) * TRIM_HOP + half
        piece = np.pad(samples[max(start, 0):max(stop, 0)], (max(0, -start), max(0, stop - len(samples))))
        rms.append(librosa.feature.rms(y=piece, frame_length=TRIM_FRAME, hop_length=TRIM_HOP, center=False)[0])
    loud = np.flatnonzero(librosa.amplitude_to_db(np.concatenate(rms), ref=np.max, top_db=None) > -TRIM_TOP_DB)
    if loud.size == 0:
        return 0, 0
    return int(loud[0]) * TRIM_HOP, min(len(samples), (int(loud[-1]) + 1) * TRIM_HOP)


def to_int16(samples):
    """float samples in [-1, 1] as int16 PCM (what gr.Audio writes to WAV without a warning)."""
    import numpy as np

    return (np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767).astype(np.int16)


def write_wav(path, samples, sample_rate: int) -> Path:
    """Write 16-bit PCM WAV; returns the path."""
    import soundfile as sf

    sf.write(str(path), to_int16(samples), int(sample_rate), subtype="PCM_16")
    return Path(path)
