"""Speech-to-text family: Whisper through the transformers ASR pipeline.

Audio longer than 30 s is cut into 30 s chunks that are transcribed one after the other, so the
caller can show progress per chunk; timestamps are shifted by each chunk's start.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from models.catalog import ModelSpec
from models.quantization import Precision, transformers_kwargs

SAMPLE_RATE = 16_000
CHUNK_SECONDS = 30
TASKS = ("transcribe", "translate")
TIMESTAMPS = ("none", "segment", "word")
AUTO = "auto"
# Names shown in the UI -> Whisper language codes (a subset of Whisper's 99; any code also works).
LANGUAGES = {
    "english": "en", "chinese": "zh", "german": "de", "spanish": "es", "russian": "ru", "korean": "ko",
    "french": "fr", "japanese": "ja", "portuguese": "pt", "italian": "it", "dutch": "nl", "arabic": "ar",
    "hindi": "hi", "turkish": "tr", "polish": "pl", "ukrainian": "uk", "vietnamese": "vi",
}
TINY_LANGUAGES = ("en", "zh", "de", "es", "fr", "ja")

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


@dataclasses.dataclass
class Transcript:
    text: str
    segments: list[tuple[float, float, str]]
    language: str
    audio_seconds: float
    chunks: int


def load(spec: ModelSpec, location: str, precision: Precision) -> AsrHandle:
    from transformers import AutoFeatureExtractor, AutoModelForSpeechSeq2Seq, AutoTokenizer, pipeline

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


def build_tiny(folder: Path) -> None:
    """A 1-layer Whisper (d_model 32, 80 mel bins) with a BPE tokenizer and Whisper's special tokens."""
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    from models.offline import seeded, train_tokenizer

    bpe = json.loads(train_tokenizer().backend_tokenizer.to_str())["model"]
    tokenizer = WhisperTokenizerFast(vocab=bpe["vocab"], merges=[tuple(pair) for pair in bpe["merges"]])
    language_tokens = [f"<|{code}|>" for code in TINY_LANGUAGES]
    specials = (["<|endoftext|>", "<|startoftranscript|>"] + language_tokens
                + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
                   "<|notimestamps|>"])
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    # Timestamp tokens follow the last special token, as in Whisper's vocabulary (0.02 s steps).
    tokenizer.add_tokens([f"<|{step * 0.02:.2f}|>" for step in range(1501)])
    ids = tokenizer.convert_tokens_to_ids
    end, start = ids("<|endoftext|>"), ids("<|startoftranscript|>")

    seeded()
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=80, d_model=32, encoder_layers=1,
                           decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
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
        is_multilingual=True, alignment_heads=[[0, 0]], begin_suppress_tokens=[end], suppress_tokens=[])
    tokenizer.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE).save_pretrained(folder)
    model.save_pretrained(folder, safe_serialization=True)


def language_code(handle: AsrHandle, language: str | None) -> str | None:
    """None for auto-detection, else the Whisper code; ValueError if the model does not know it."""
    if language is None or language == "" or language == AUTO:
        return None
    if not isinstance(language, str):
        raise ValueError(f"language must be a name such as 'english', got {type(language).__name__}")
    code = LANGUAGES.get(language.strip().lower(), language.strip().lower())
    supported = handle.languages
    if supported and code not in supported:
        names = {c: n for n, c in LANGUAGES.items()}
        listed = ", ".join(names.get(c, c) for c in supported)
        raise ValueError(f"{handle.spec_id} does not support the language {language!r}. "
                         f"Choose 'auto' or one of: {listed}.")
    return code


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
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if timestamps not in TIMESTAMPS:
        raise ValueError(f"timestamps must be one of {TIMESTAMPS}, got {timestamps!r}")
    code = language_code(handle, language)
    if len(samples) == 0:
        raise ValueError("No audio to transcribe.")

    # 2. Cut into 30 s chunks and run the pipeline on each
    step = CHUNK_SECONDS * SAMPLE_RATE
    starts = list(range(0, len(samples), step))
    generate_kwargs = {"task": task, "language": code}
    return_timestamps = {"none": False, "segment": True, "word": "word"}[timestamps]
    texts: list[str] = []
    segments: list[tuple[float, float, str]] = []
    for index, begin in enumerate(starts):
        if progress is not None:
            progress(index / len(starts), f"transcribing chunk {index + 1} of {len(starts)}")
        chunk = samples[begin:begin + step]
        offset = begin / SAMPLE_RATE
        output = handle.pipeline({"raw": chunk, "sampling_rate": SAMPLE_RATE}, return_timestamps=return_timestamps,
                                 generate_kwargs=dict(generate_kwargs))
        texts.append(output["text"].strip())
        chunk_end = offset + len(chunk) / SAMPLE_RATE
        for part in output.get("chunks", []) if return_timestamps else []:
            start, end = part["timestamp"]
            # Whisper may place the last timestamp past a short final chunk, or leave it open (None)
            start = min(offset + (start or 0.0), chunk_end)
            end = chunk_end if end is None else min(max(offset + end, start), chunk_end)
            segments.append((round(start, 2), round(end, 2), part["text"].strip()))
    if progress is not None:
        progress(1.0, "transcribed")

    # 3. Join
    return Transcript(text=" ".join(t for t in texts if t), segments=segments, language=code or AUTO,
                      audio_seconds=len(samples) / SAMPLE_RATE, chunks=len(starts))


def format_segments(segments: list[tuple[float, float, str]]) -> str:
    """One ``[start - end] text`` line per segment or word."""
    return "\n".join(f"[{start:7.2f} - {end:7.2f}] {text}" for start, end, text in segments)
