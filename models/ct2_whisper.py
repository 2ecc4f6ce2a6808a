"""Read CTranslate2 Whisper checkpoints (``model.bin``) and convert them to transformers Whisper folders.

Packages on the index ship real Whisper weights only in CTranslate2's format (see ENVIRONMENT.md). This module
reads that format with numpy alone (no ``ctranslate2`` dependency) and writes an ordinary folder that
``AutoModelForSpeechSeq2Seq``, ``AutoTokenizer``, ``AutoFeatureExtractor`` and the transformers ASR pipeline load.

Layout of ``model.bin`` (little-endian; binary versions 4 to 6, which is every Whisper model CTranslate2 wrote):
``uint32`` version, spec name, ``uint32`` spec revision, ``uint32`` variable count, then per variable: name,
``uint8`` rank, rank x ``uint32`` dims, ``uint8`` dtype code, ``uint32`` byte count, raw bytes; then ``uint32``
alias count and (alias, target) name pairs. Strings are a ``uint16`` byte length and NUL-terminated bytes.

Language detection is the ASR family's (``models.families.asr.detect_language``), for hub and converted models
alike.

Generation: the multilingual model's generation config sets ``task="transcribe"`` so that a bare ``generate()``
(language auto-detected) still gets a task token; without one the prompt is out of distribution and base drops
words or loops. The English-only model has no
``lang_to_id``/``task_to_id`` and ``is_multilingual=False``: transformers refuses ``language=``/``task=`` for it,
so call it without them.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from models.errors import InvalidRequest

if TYPE_CHECKING:
    import numpy as np

# CTranslate2's DataType enum -> numpy dtype string. bfloat16 (5) has no numpy dtype: it is widened to float32.
_DTYPES = {0: "<f4", 1: "i1", 2: "<i2", 3: "<i4", 4: "<f2", 5: "<u2"}
_DTYPE_NAMES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_SUPPORTED_VERSIONS = range(4, 7)
_MAX_RANK = 8
# The smallest possible variable record: name length (2) + rank (1) + dtype (1) + byte count (4).
_MIN_VARIABLE_BYTES = 8
_CHUNK = 16 << 20
SAMPLE_RATE = 16_000
# CTranslate2's ActivationType::GELU; Whisper uses exact GELU.
_GELU = 3


class Ct2FormatError(InvalidRequest):
    """A CTranslate2 ``model.bin`` is truncated, corrupt, or not a Whisper model this reader knows."""


class _PartsReader(io.RawIOBase):
    """Several files read as one seekable stream, so that split checkpoints need no joined copy on disk."""

    def __init__(self, paths):
        super().__init__()
        self._files = []
        try:
            for path in paths:
                self._files.append(open(path, "rb"))  # closed in close()
        except OSError:
            self.close()
            raise
        self._sizes = [os.fstat(handle.fileno()).st_size for handle in self._files]
        self._size = sum(self._sizes)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done, start = 0, 0
        for handle, size in zip(self._files, self._sizes, strict=True):
            if done < len(view) and start <= self._pos < start + size:
                handle.seek(self._pos - start)
                count = handle.readinto(view[done:done + start + size - self._pos]) or 0
                done += count
                self._pos += count
            start += size
        return done

    def close(self) -> None:
        for handle in self._files:
            handle.close()
        super().close()


class _Reader:
    """Little-endian primitives over a binary stream, with the bytes left known where the stream can tell."""

    def __init__(self, stream):
        self._stream = stream
        self._end = None
        self._lookahead = b""  # one byte read ahead by at_end() on streams of unknown size
        try:
            if stream.seekable():
                here = stream.tell()
                self._end = stream.seek(0, io.SEEK_END)
                stream.seek(here)
        except (AttributeError, OSError):
            self._end = None
        self.position = stream.tell() if self._end is not None else 0

    @property
    def remaining(self) -> int | None:
        return None if self._end is None else self._end - self.position

    def read(self, count: int, what: str) -> bytearray:
        """Exactly ``count`` bytes; Ct2FormatError if the stream ends first or cannot hold them."""
        left = self.remaining
        if left is not None and count > left:
            raise Ct2FormatError(f"truncated file: {what} needs {count} bytes at offset {self.position}, "
                                 f"only {left} left")
        if left is not None:
            # The bytes are known to exist, so preallocating is bounded by the file size.
            buffer = bytearray(count)
            got = 0
            while got < count:
                n = self._stream.readinto(memoryview(buffer)[got:])
                if not n:
                    break
                got += n
        else:
            # Unknown size: grow only as bytes really arrive, so a corrupt count cannot allocate gigabytes.
            buffer = bytearray(self._lookahead[:count])
            self._lookahead = self._lookahead[count:]
            while len(buffer) < count:
                chunk = self._stream.read(min(_CHUNK, count - len(buffer)))
                if not chunk:
                    break
                buffer += chunk
            got = len(buffer)
        if got < count:
            raise Ct2FormatError(f"truncated file: {what} needs {count} bytes at offset {self.position}, "
                                 f"the file ends after {got}")
        self.position += count
        return buffer

    def at_end(self) -> bool:
        if self.remaining is not None:
            return self.remaining == 0
        if not self._lookahead:
            self._lookahead = self._stream.read(1) or b""
        return not self._lookahead

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.uint("<H", f"length of {what}")
        raw = bytes(self.read(length, what))
        # CTranslate2 writes C strings: the stored length counts the NUL terminator.
        try:
            return raw.split(b"\0", 1)[0].decode("utf-8")
        except UnicodeDecodeError as error:
            raise Ct2FormatError(f"{what} at offset {self.position - length} is not UTF-8") from error


def read_variables(path_or_fileobj) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a CTranslate2 ``model.bin``.

    Args:
        path_or_fileobj: a path, a list of paths (parts concatenated in order), or a binary file object.

    Returns:
        ``(variables, aliases)``: numpy arrays by variable name (bfloat16 widened to float32; rank-0 arrays for
        scalars), and alias name -> variable name.

    Raises:
        Ct2FormatError: truncated or trailing data, unknown version or dtype code, or sizes that disagree.
    """
    if isinstance(path_or_fileobj, (str, os.PathLike)):
        with open(path_or_fileobj, "rb") as handle:
            return _parse(_Reader(handle))
    if isinstance(path_or_fileobj, (list, tuple)):
        with io.BufferedReader(_PartsReader(path_or_fileobj), buffer_size=1 << 20) as handle:
            return _parse(_Reader(handle))
    return _parse(_Reader(path_or_fileobj))


def _parse(reader: _Reader):
    import numpy as np

    version = reader.uint("<I", "format version")
    if version not in _SUPPORTED_VERSIONS:
        raise Ct2FormatError(f"unsupported CTranslate2 binary version {version} (this reader knows 4 to 6)")
    reader.string("spec name")
    reader.uint("<I", "spec revision")
    count = reader.uint("<I", "variable count")
    if reader.remaining is not None and count * _MIN_VARIABLE_BYTES > reader.remaining:
        raise Ct2FormatError(f"truncated or corrupt file: {count} variables cannot fit in the {reader.remaining} "
                             "bytes left")

    variables = {}
    for index in range(count):
        name = reader.string(f"name of variable {index}")
        rank = reader.uint("<B", f"rank of {name!r}")
        if rank > _MAX_RANK:
            raise Ct2FormatError(f"variable {name!r} has rank {rank} (more than {_MAX_RANK}): corrupt file")
        shape = struct.unpack(f"<{rank}I", reader.read(4 * rank, f"shape of {name!r}"))
        code = reader.uint("<B", f"dtype of {name!r}")
        if code not in _DTYPES:
            raise Ct2FormatError(f"variable {name!r} has unknown dtype code {code} "
                                 f"(known: {', '.join(f'{k} {v}' for k, v in _DTYPE_NAMES.items())})")
        size = reader.uint("<I", f"byte count of {name!r}")
        dtype = np.dtype(_DTYPES[code])
        expected = math.prod(shape) * dtype.itemsize
        if size != expected:
            raise Ct2FormatError(f"variable {name!r} declares {size} bytes but shape {shape} of "
                                 f"{_DTYPE_NAMES[code]} needs {expected}")
        array = np.frombuffer(reader.read(size, f"data of {name!r}"), dtype=dtype).reshape(shape)
        if code == 5:
            # bfloat16 is the top half of a float32: widening is exact.
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array

    aliases = {}
    # CTranslate2 always writes the alias table (binary version >= 3); a file that ends right after the
    # variables is still accepted, as having none.
    if not reader.at_end():
        for index in range(reader.uint("<I", "alias count")):
            alias = reader.string(f"alias {index}")
            aliases[alias] = reader.string(f"target of alias {alias!r}")
    if not reader.at_end():
        left = reader.remaining
        raise Ct2FormatError(f"unexpected {left if left is not None else 'extra'} bytes after the alias table "
                             f"at offset {reader.position}: wrong file or parts in the wrong order")
    return variables, aliases


def _scalar(variables, name, default=None):
    value = variables.get(name)
    if value is None:
        return default
    if value.size != 1:
        raise Ct2FormatError(f"variable {name!r} should be a scalar, has shape {value.shape}")
    return int(value.reshape(-1)[0])


def _layer_count(variables, prefix: str) -> int:
    count = 0
    while f"{prefix}/layer_{count}/ffn/linear_0/weight" in variables:
        count += 1
    if count == 0:
        raise Ct2FormatError(f"no {prefix} layers found: is this a WhisperSpec model.bin?")
    return count


def _require(variables, name):
    try:
        return variables[name]
    except KeyError:
        raise Ct2FormatError(f"missing variable {name!r}: not a complete Whisper model.bin") from None


def _state_dict(variables) -> tuple[dict, dict]:
    """transformers state dict (float32 numpy arrays) and WhisperConfig dimensions from CT2 variables."""
    import numpy as np

    def get(name):
        array = _require(variables, name)
        if array.dtype.kind != "f":
            raise Ct2FormatError(f"variable {name!r} is {array.dtype} (a quantized model); convert a float16 or "
                                 "float32 CTranslate2 model instead")
        return np.ascontiguousarray(array, dtype=np.float32)

    state = {}

    def linear(targets, source):
        """Split a (possibly fused) CT2 linear layer along its output rows into ``targets``."""
        weight = get(f"{source}/weight")
        bias = get(f"{source}/bias") if f"{source}/bias" in variables else None
        rows = weight.shape[0] // len(targets)
        for i, target in enumerate(targets):
            # Copies: safetensors refuses tensors that share memory.
            state[f"{target}.weight"] = weight[i * rows:(i + 1) * rows].copy()
            # transformers' k_proj has no bias (CTranslate2 stores zeros there).
            if bias is not None and not target.endswith("k_proj"):
                state[f"{target}.bias"] = bias[i * rows:(i + 1) * rows].copy()

    def norm(target, source):
        state[f"{target}.weight"] = get(f"{source}/gamma")
        state[f"{target}.bias"] = get(f"{source}/beta")

    def attention_names(prefix, names):
        return [f"{prefix}.{name}_proj" for name in names]

    activation = _scalar(variables, "decoder/activation", _GELU)
    if activation != _GELU:
        raise Ct2FormatError(f"unexpected activation code {activation} (Whisper uses GELU, code {_GELU})")
    for side in ("encoder", "decoder"):
        src, dst = side, f"model.{side}"
        for i in range(_layer_count(variables, side)):
            layer, out = f"{src}/layer_{i}", f"{dst}.layers.{i}"
            linear(attention_names(f"{out}.self_attn", "qkv"), f"{layer}/self_attention/linear_0")
            linear([f"{out}.self_attn.out_proj"], f"{layer}/self_attention/linear_1")
            norm(f"{out}.self_attn_layer_norm", f"{layer}/self_attention/layer_norm")
            if side == "decoder":
                linear([f"{out}.encoder_attn.q_proj"], f"{layer}/attention/linear_0")
                linear(attention_names(f"{out}.encoder_attn", "kv"), f"{layer}/attention/linear_1")
                linear([f"{out}.encoder_attn.out_proj"], f"{layer}/attention/linear_2")
                norm(f"{out}.encoder_attn_layer_norm", f"{layer}/attention/layer_norm")
            linear([f"{out}.fc1"], f"{layer}/ffn/linear_0")
            linear([f"{out}.fc2"], f"{layer}/ffn/linear_1")
            norm(f"{out}.final_layer_norm", f"{layer}/ffn/layer_norm")
        norm(f"{dst}.layer_norm", f"{src}/layer_norm")
        state[f"{dst}.embed_positions.weight"] = get(f"{src}/position_encodings/encodings")
    for conv in ("conv1", "conv2"):
        state[f"model.encoder.{conv}.weight"] = get(f"encoder/{conv}/weight")
        state[f"model.encoder.{conv}.bias"] = get(f"encoder/{conv}/bias")
    # The output projection is tied to this embedding (CTranslate2 stores it as an alias).
    state["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")

    d_model = state["model.encoder.conv1.weight"].shape[0]
    encoder_heads = _scalar(variables, "encoder/num_heads")
    if encoder_heads is None:
        raise Ct2FormatError("missing variable 'encoder/num_heads'")
    dims = dict(
        vocab_size=state["model.decoder.embed_tokens.weight"].shape[0],
        num_mel_bins=state["model.encoder.conv1.weight"].shape[1],
        d_model=d_model,
        encoder_layers=_layer_count(variables, "encoder"),
        decoder_layers=_layer_count(variables, "decoder"),
        encoder_attention_heads=encoder_heads,
        decoder_attention_heads=_scalar(variables, "decoder/num_heads", encoder_heads),
        encoder_ffn_dim=state["model.encoder.layers.0.fc1.weight"].shape[0],
        decoder_ffn_dim=state["model.decoder.layers.0.fc1.weight"].shape[0],
        max_source_positions=state["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=state["model.decoder.embed_positions.weight"].shape[0],
    )
    if d_model % encoder_heads or d_model % dims["decoder_attention_heads"]:
        raise Ct2FormatError(f"d_model {d_model} is not divisible by the head count")
    return state, dims


def _tokenizer(tokenizer_json: Path, max_length: int):
    """WhisperTokenizerFast from the packaged tokenizer.json, with the 1501 timestamp tokens the hub's have."""
    from transformers import WhisperTokenizerFast

    added = [token["content"] for token in json.loads(Path(tokenizer_json).read_text())["added_tokens"]]
    if "<|notimestamps|>" not in added or "<|startoftranscript|>" not in added:
        raise Ct2FormatError(f"{tokenizer_json} lacks Whisper's special tokens")
    # Registering the added tokens as special makes decode(skip_special_tokens=True) drop them, and
    # transformers takes the last special id (<|notimestamps|>) + 1 as the first timestamp token.
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(tokenizer_json), unk_token="<|endoftext|>", bos_token="<|endoftext|>",
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=max_length,
        additional_special_tokens=[token for token in added if token != "<|endoftext|>"])
    tokenizer.add_tokens([f"<|{step * 0.02:.2f}|>" for step in range(1501)])
    return tokenizer


def convert(model_bin_parts: list[Path], ct2_config: Path, tokenizer_json: Path, folder: Path, *,
            multilingual: bool) -> None:
    """Write a transformers Whisper model converted from a CTranslate2 one into ``folder``.

    Args:
        model_bin_parts: the ``model.bin`` file, or its parts in order (they are streamed, not joined on disk).
        ct2_config: CTranslate2's ``config.json`` (alignment heads, suppressed tokens, language ids).
        tokenizer_json: the packaged ``tokenizer.json``.
        folder: an existing empty folder; receives config, float32 safetensors weights, generation config,
            tokenizer and feature extractor files.
        multilingual: False for English-only (``.en``) models.

    Raises:
        Ct2FormatError: the checkpoint is corrupt or not Whisper, or does not match the tokenizer.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    variables, _aliases = read_variables([Path(part) for part in model_bin_parts])
    state, dims = _state_dict(variables)
    del variables
    extra = json.loads(Path(ct2_config).read_text())
    tokenizer = _tokenizer(tokenizer_json, dims["max_target_positions"])
    if len(tokenizer) != dims["vocab_size"]:
        raise Ct2FormatError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                             f"{dims['vocab_size']}: tokenizer.json from another model?")

    def token_id(token: str) -> int:
        value = tokenizer.convert_tokens_to_ids(token)
        if value is None or (value == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise Ct2FormatError(f"tokenizer has no {token}")
        return value

    end = token_id("<|endoftext|>")
    start = token_id("<|startoftranscript|>")
    suppress = [int(i) for i in extra.get("suppress_ids", [])]
    begin_suppress = [int(i) for i in extra.get("suppress_ids_begin", [220, end])]
    config = WhisperConfig(**dims, pad_token_id=end, bos_token_id=end, eos_token_id=end,
                           decoder_start_token_id=start, suppress_tokens=suppress,
                           begin_suppress_tokens=begin_suppress, tie_word_embeddings=True)
    config.dtype = torch.float32

    # Check the names against the real module tree (built on the meta device: no memory, no init time).
    with torch.device("meta"):
        expected = set(WhisperForConditionalGeneration(config).state_dict())
    expected.discard("proj_out.weight")  # tied to model.decoder.embed_tokens.weight
    if expected != set(state):
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise Ct2FormatError(f"variable mapping mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")

    generation = dict(
        decoder_start_token_id=start, bos_token_id=end, eos_token_id=end, pad_token_id=end, max_length=448,
        no_timestamps_token_id=token_id("<|notimestamps|>"), prev_sot_token_id=token_id("<|startofprev|>"),
        alignment_heads=[[int(layer), int(head)] for layer, head in extra.get("alignment_heads", [])],
        suppress_tokens=suppress, begin_suppress_tokens=begin_suppress, max_initial_timestamp_index=50,
        return_timestamps=False, is_multilingual=multilingual)
    if multilingual:
        lang_ids = [int(i) for i in extra.get("lang_ids", [])]
        generation["lang_to_id"] = {tokenizer.convert_ids_to_tokens(i): i for i in lang_ids}
        if not lang_ids or not all(isinstance(token, str) and token.startswith("<|")
                                   for token in generation["lang_to_id"]):
            raise Ct2FormatError("config.json's lang_ids do not name language tokens in tokenizer.json")
        generation["task_to_id"] = {"transcribe": token_id("<|transcribe|>"), "translate": token_id("<|translate|>")}
        # Default task, so that a bare generate() (language auto-detected) still prompts a task token.
        generation["task"] = "transcribe"

    save_file({name: torch.from_numpy(array) for name, array in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(folder)
    GenerationConfig(**generation).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=dims["num_mel_bins"], sampling_rate=SAMPLE_RATE).save_pretrained(folder)
