"""Speech-to-text family: Whisper through the transformers ASR pipeline.

Audio longer than 30 s is cut into 30 s chunks that are transcribed one after the other, so the
caller can show progress per chunk; timestamps are shifted by each chunk's start.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from models import limits
from models.catalog import ModelSpec
from models.errors import InvalidRequest
from models.families.loading import folder_config
from models.quantization import Precision, transformers_kwargs
from models.sources import ModelUnavailableError

SAMPLE_RATE = 16_000
CHUNK_SECONDS = 30
TASKS = ("transcribe", "translate")
TIMESTAMPS = ("none", "segment", "word")
AUTO = "auto"
# Names shown in the UI -> Whisper language codes (a subset of Whisper's 100; any code also works).
# Cantonese is large-v3's 100th language (<|yue|>); older Whisper models refuse it by name.
LANGUAGES = {
    "english": "en", "chinese": "zh", "german": "de", "spanish": "es", "russian": "ru", "korean": "ko",
    "french": "fr", "japanese": "ja", "portuguese": "pt", "italian": "it", "dutch": "nl", "arabic": "ar",
    "hindi": "hi", "turkish": "tr", "polish": "pl", "ukrainian": "uk", "vietnamese": "vi", "cantonese": "yue",
}
TINY_LANGUAGES = ("en", "zh", "de", "es", "fr", "ja")
# Guards against decoding loops (values from Whisper's own transcribe()): a bound on tokens per
# second of audio, the compression ratio above which text is a repetition, and the mean token
# log-probability below which an English-only model is not hearing English.
TOKENS_PER_SECOND = 10
MAX_CHUNK_TOKENS = 440
MAX_COMPRESSION_RATIO = 2.4
MIN_MEAN_LOG_PROB = -1.0
# Transcription decodes greedily (half the time of a beam search on CPU, which a voice turn waits
# for); translation, which small Whisper models get wrong far more often, uses Whisper's own beam of 5.
TRANSLATE_BEAMS = 5
FALLBACK = {"temperature": (0.2, 0.4, 0.6, 0.8, 1.0), "compression_ratio_threshold": 1.35, "logprob_threshold": -1.0}

Progress = Callable[[float, str], None]


@dataclasses.dataclass(eq=False)
class AsrHandle:
    model: object
    tokenizer: object
    feature_extractor: object
    pipeline: object
    spec_id: str
    device: str

    @property
    def languages(self) -> list[str]:
        """Language codes the model's generation config knows (``<|en|>`` -> ``en``)."""
        lang_to_id = getattr(self.model.generation_config, "lang_to_id", None) or {}
        return [token.strip("<|>") for token in lang_to_id]

    @property
    def multilingual(self) -> bool:
        """False for English-only models (``*.en``), which take no language or task."""
        config = self.model.generation_config
        return bool(getattr(config, "is_multilingual", True) and getattr(config, "lang_to_id", None))


@dataclasses.dataclass
class Transcript:
    text: str
    segments: list[tuple[float, float, str]]
    language: str
    audio_seconds: float
    chunks: int
    notices: list[str] = dataclasses.field(default_factory=list)


def check_folder(spec: ModelSpec, location: str) -> None:
    """Refuse a local folder that holds no Whisper model with its tokenizer and feature extractor, saying what
    it holds; before anything is read with transformers. Hub ids are left to transformers."""
    config = folder_config(spec, location, "a Whisper model")
    if config is None:
        return
    folder = Path(location)
    kind = config.get("model_type")
    if kind != "whisper":
        architecture = ", ".join(config.get("architectures") or [])
        raise ModelUnavailableError(f"{spec.id}: {folder} holds a {kind!r} model"
                                    f"{f' ({architecture})' if architecture else ''}; the speech-to-text family "
                                    "runs Whisper models (model_type 'whisper').")
    missing = []
    if not (folder / "preprocessor_config.json").is_file():
        missing.append("preprocessor_config.json (the feature extractor)")
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        missing.append("tokenizer.json or vocab.json + merges.txt")
    if missing:
        raise ModelUnavailableError(f"{spec.id}: {folder} lacks {' and '.join(missing)}; copy them from the "
                                    "model's repository next to config.json.")


def load(spec: ModelSpec, location: str, precision: Precision) -> AsrHandle:
    from transformers import AutoFeatureExtractor, AutoModelForSpeechSeq2Seq, AutoTokenizer, pipeline

    check_folder(spec, location)
    kwargs = transformers_kwargs(precision)
    model = AutoModelForSpeechSeq2Seq.from_pretrained(location, **kwargs)
    model.to(precision.device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(location)
    feature_extractor = AutoFeatureExtractor.from_pretrained(location)
    asr = pipeline("automatic-speech-recognition", model=model, tokenizer=tokenizer,
                   feature_extractor=feature_extractor, device=precision.device, dtype=kwargs["dtype"])
    return AsrHandle(model=model, tokenizer=tokenizer, feature_extractor=feature_extractor, pipeline=asr,
                     spec_id=spec.id, device=precision.device)


def release(handle: AsrHandle) -> None:
    handle.pipeline = None


@dataclasses.dataclass(frozen=True)
class TinyWhisper:
    """What differs between the Whisper generations the tiny builds stand in for."""

    mel_bins: int = 80
    languages: tuple[str, ...] = TINY_LANGUAGES
    no_speech_token: str = "<|nocaptions|>"
    decoder_layers: int = 1
    alignment_heads: tuple[tuple[int, int], ...] = ((0, 0),)


# tiny-whisper: whisper-tiny/small (80 mel bins). whisper-v3: large-v3 and its turbo (128 mel bins,
# <|yue|> after the 99 older languages so every later special token's id is one higher,
# <|nospeech|> for <|nocaptions|>, and turbo's 4 decoder layers, whose heads align words).
TINY_WHISPERS = {
    "": TinyWhisper(),
    "whisper-v3": TinyWhisper(mel_bins=128, languages=TINY_LANGUAGES + ("yue",), no_speech_token="<|nospeech|>",
                              decoder_layers=4, alignment_heads=((2, 0), (3, 1))),
}


def build_tiny(folder: Path, arch: str = "") -> None:
    """A tiny Whisper (d_model 32) with a BPE tokenizer and Whisper's special tokens.

    ``arch`` "" builds tiny-whisper (80 mel bins, 1 decoder layer); "whisper-v3" the twin of
    large-v3-turbo (see ``TINY_WHISPERS``).
    """
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    from models.offline import seeded, train_tokenizer

    if arch not in TINY_WHISPERS:
        raise ModelUnavailableError(f"the asr family builds no tiny {arch!r} model; it builds: "
                                    f"{', '.join(name for name in TINY_WHISPERS if name)}")
    kind = TINY_WHISPERS[arch]
    bpe = json.loads(train_tokenizer().backend_tokenizer.to_str())["model"]
    tokenizer = WhisperTokenizerFast(vocab=bpe["vocab"], merges=[tuple(pair) for pair in bpe["merges"]])
    language_tokens = [f"<|{code}|>" for code in kind.languages]
    specials = (["<|endoftext|>", "<|startoftranscript|>"] + language_tokens
                + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", kind.no_speech_token,
                   "<|notimestamps|>"])
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    # Timestamp tokens follow the last special token, as in Whisper's vocabulary (0.02 s steps).
    tokenizer.add_tokens([f"<|{step * 0.02:.2f}|>" for step in range(1501)])
    ids = tokenizer.convert_tokens_to_ids
    end, start = ids("<|endoftext|>"), ids("<|startoftranscript|>")

    seeded()
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=kind.mel_bins, d_model=32, encoder_layers=1,
                           decoder_layers=kind.decoder_layers, encoder_attention_heads=2, decoder_attention_heads=2,
                           encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=1500,
                           max_target_positions=448, pad_token_id=end, bos_token_id=end, eos_token_id=end,
                           decoder_start_token_id=start)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start, bos_token_id=end, eos_token_id=end, pad_token_id=end,
        max_length=48,  # random weights never stop on their own: keep their noise short
        lang_to_id={token: ids(token) for token in language_tokens},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"), prev_sot_token_id=ids("<|startofprev|>"),
        is_multilingual=True, alignment_heads=[list(pair) for pair in kind.alignment_heads],
        begin_suppress_tokens=[end], suppress_tokens=[])
    tokenizer.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=kind.mel_bins, sampling_rate=SAMPLE_RATE).save_pretrained(folder)
    model.save_pretrained(folder, safe_serialization=True)


def language_code(handle: AsrHandle, language: str | None) -> str | None:
    """None for auto-detection, else the Whisper code; ValueError if the model does not know it."""
    if language is None or language == "" or language == AUTO:
        return None
    if not isinstance(language, str):
        raise InvalidRequest(f"language must be a name such as 'english', got {type(language).__name__}")
    code = LANGUAGES.get(language.strip().lower(), language.strip().lower())
    if not handle.multilingual:
        if code != "en":
            raise InvalidRequest(f"{handle.spec_id} knows only English, not {language!r}. Choose 'auto' or "
                             "'english', or a multilingual model such as whisper-base.")
        return None
    supported = handle.languages
    if supported and code not in supported:
        names = {c: n for n, c in LANGUAGES.items()}
        listed = ", ".join(names.get(c, c) for c in supported)
        raise InvalidRequest(f"{handle.spec_id} does not support the language {language!r}. "
                         f"Choose 'auto' or one of: {listed}.")
    return code


def detect_language(handle: AsrHandle, samples) -> str:
    """The Whisper code of the language spoken in the first 30 s of 16 kHz ``samples`` ("en" for ``*.en``)."""
    if not handle.multilingual:
        return "en"
    import torch

    extractor = handle.feature_extractor
    features = extractor(samples[:CHUNK_SECONDS * SAMPLE_RATE], sampling_rate=SAMPLE_RATE, return_tensors="pt")
    with torch.inference_mode():
        ids = handle.model.detect_language(
            input_features=features.input_features.to(handle.model.device, handle.model.dtype))
    return handle.tokenizer.convert_ids_to_tokens(int(ids[0])).strip("<|>")


def compression_ratio(text: str) -> float:
    """Bytes over zlib-compressed bytes; Whisper treats above 2.4 as a repetition loop."""
    import zlib

    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def mean_log_prob(handle: AsrHandle, samples, text: str) -> float:
    """Average log-probability of ``text``'s tokens for ``samples``, scored by the model (teacher forcing)."""
    import torch

    ids = handle.tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        return 0.0
    config = handle.model.generation_config
    prompt = [config.decoder_start_token_id, config.no_timestamps_token_id]
    features = handle.feature_extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    decoder_ids = torch.tensor([prompt + ids], device=handle.model.device)
    with torch.inference_mode():
        logits = handle.model(input_features=features.to(handle.model.device, handle.model.dtype),
                              decoder_input_ids=decoder_ids).logits[0, len(prompt) - 1:-1].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    return float(log_probs[torch.arange(len(ids)), torch.tensor(ids)].mean())


def transcribe(handle: AsrHandle, samples, language: str | None = AUTO, task: str = "transcribe",
               timestamps: str = "none", progress: Progress | None = None) -> Transcript:
    """Transcribe (or translate to English) 16 kHz mono float samples, 30 s at a time.

    Args:
        handle: a loaded ASR handle.
        samples: 1-D float32 samples at 16 kHz (from ``models.audio.load_audio``).
        language: 'auto', a name from LANGUAGES, or a Whisper code.
        task: 'transcribe' or 'translate' (to English).
        timestamps: 'none', 'segment' or 'word'.
        progress: called with (fraction done, description) before each chunk and at the end.
    """
    # 1. Check inputs
    if task not in TASKS:
        raise InvalidRequest(f"task must be one of {TASKS}, got {task!r}")
    if timestamps not in TIMESTAMPS:
        raise InvalidRequest(f"timestamps must be one of {TIMESTAMPS}, got {timestamps!r}")
    code = language_code(handle, language)
    if not handle.multilingual and task == "translate":
        raise InvalidRequest(f"{handle.spec_id} knows only English and cannot translate; choose a multilingual "
                         "model such as whisper-base.")
    if len(samples) == 0:
        raise InvalidRequest("No audio to transcribe.")

    # 2. The language: given, or detected once on the first 30 s and then used for every chunk
    if code is None and handle.multilingual:
        code = detect_language(handle, samples)

    # 3. Cut into 30 s chunks and run the pipeline on each
    step = CHUNK_SECONDS * SAMPLE_RATE
    starts = list(range(0, len(samples), step))
    texts: list[str] = []
    segments: list[tuple[float, float, str]] = []
    notices: list[str] = []
    stop = limits.StopFlag()  # the call's: a closed connection or the time cap ends it between chunks
    for index, begin in enumerate(starts):
        if stop.is_set():
            notices.append(limits.timeout_notice() or f"Stopped after {index} of {len(starts)} chunks of 30 s.")
            break
        if progress is not None:
            progress(index / len(starts), f"transcribing chunk {index + 1} of {len(starts)}")
        chunk = samples[begin:begin + step]
        offset = begin / SAMPLE_RATE
        output = _transcribe_chunk(handle, chunk, code, task, timestamps)
        texts.append(output["text"].strip())
        chunk_end = offset + len(chunk) / SAMPLE_RATE
        for part in output.get("chunks", []) if timestamps != "none" else []:
            start, end = part["timestamp"]
            # Whisper may place the last timestamp past a short final chunk, or leave it open (None)
            start = min(offset + (start or 0.0), chunk_end)
            end = chunk_end if end is None else min(max(offset + end, start), chunk_end)
            segments.append((round(start, 2), round(end, 2), part["text"].strip()))
    if progress is not None:
        progress(1.0, "transcribed")

    # 4. Join
    return Transcript(text=" ".join(t for t in texts if t), segments=segments,
                      language=code or ("en" if not handle.multilingual else AUTO),
                      audio_seconds=len(samples) / SAMPLE_RATE, chunks=len(starts), notices=notices)


def _transcribe_chunk(handle: AsrHandle, chunk, code: str | None, task: str, timestamps: str) -> dict:
    """One chunk, bounded in tokens, with Whisper's guard against repetition loops.

    Speech holds well under ``TOKENS_PER_SECOND``; a decoder that goes past it or repeats itself
    (compression ratio above 2.4) is looping. A multilingual model then tries again with
    Whisper's temperature fallback; an English-only model was most likely given another language.
    """
    seconds = len(chunk) / SAMPLE_RATE
    model_limit = (getattr(handle.model.generation_config, "max_length", None) or MAX_CHUNK_TOKENS + 8) - 4
    kwargs = {"max_new_tokens": min(MAX_CHUNK_TOKENS, model_limit, int(seconds * TOKENS_PER_SECOND) + 24),
              "num_beams": TRANSLATE_BEAMS if task == "translate" else 1}
    if handle.multilingual:
        kwargs.update(task=task, language=code)
    output, log_prob = _decode(handle, chunk, kwargs, timestamps)
    looping = compression_ratio(output["text"]) > MAX_COMPRESSION_RATIO
    if handle.multilingual and looping:
        output, _ = _decode(handle, chunk, {**kwargs, **FALLBACK}, timestamps)
    elif not handle.multilingual and output["text"].strip():
        if log_prob is None and not looping:
            log_prob = mean_log_prob(handle, chunk, output["text"])
        if looping or log_prob < MIN_MEAN_LOG_PROB:
            raise InvalidRequest(f"{handle.spec_id} could not make out English speech in this audio; it knows only "
                             "English. For speech in another language choose a multilingual model such as "
                             "whisper-base.")
    return output


def _decode(handle: AsrHandle, chunk, kwargs: dict, timestamps: str) -> tuple[dict, float | None]:
    """({"text", "chunks"}, mean token log-probability or None) for one chunk.

    Without timestamps the model's ``generate`` is called directly, which also gives the token
    scores; timestamps go through the ASR pipeline, which turns timestamp tokens and
    cross-attention alignments into segments and words.
    """
    if timestamps != "none":
        return_timestamps = {"segment": True, "word": "word"}[timestamps]
        return handle.pipeline({"raw": chunk, "sampling_rate": SAMPLE_RATE}, return_timestamps=return_timestamps,
                               generate_kwargs=dict(kwargs)), None
    import torch

    model = handle.model
    features = handle.feature_extractor(chunk, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    with torch.inference_mode():
        out = model.generate(features.to(model.device, model.dtype), **kwargs, return_dict_in_generate=True,
                             output_scores=True)
    sequence = out.sequences[0]
    log_prob = None
    if out.scores:
        chosen = sequence[-len(out.scores):]
        steps = torch.stack([score[0].float() for score in out.scores])
        log_prob = float(torch.log_softmax(steps, dim=-1)[torch.arange(len(chosen)), chosen].mean())
    return {"text": handle.tokenizer.decode(sequence, skip_special_tokens=True)}, log_prob


def format_segments(segments: list[tuple[float, float, str]]) -> str:
    """One ``[start - end] text`` line per segment or word."""
    return "\n".join(f"[{start:7.2f} - {end:7.2f}] {text}" for start, end, text in segments)
