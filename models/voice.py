"""The voice assistant's core: speech (or typed text) -> transcript -> streamed reply -> spoken reply.

The reply is spoken sentence by sentence while the chat model is still writing: generation runs in
its own thread (``models.generation``), so each finished sentence is synthesized while the next
one is being written, and its audio is handed out at once. Each stage takes its model from the
manager in a ``with manager.use(...)`` block, so a model is pinned only while it works.

No gradio here: the voice tab and the API call these functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

from models.checks import check_number
from models.errors import InvalidRequest

# Tried on smollm2-135m: mentioning a "voice" assistant made it answer "Le Grand Paris is the capital of France".
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Your answers are read aloud: keep them short and plain."
DEFAULT_MAX_NEW_TOKENS = 96
MAX_NEW_TOKENS = 1024
DEFAULT_TEMPERATURE = 0.3
LANGUAGE_CHOICES = ["auto", "english", "chinese", "german", "spanish", "russian", "korean", "french", "japanese",
                    "portuguese", "italian", "dutch", "arabic", "hindi", "turkish", "polish", "ukrainian",
                    "vietnamese"]
TTS_FAMILIES = ("tts", "piper")


@dataclasses.dataclass
class Timings:
    """Per-turn stage timings.

    ``first_audio_seconds`` runs from the start of the turn to the first audio the user can hear;
    the real-time factor is the voice's synthesis time over the seconds of audio it made.
    """

    asr_seconds: float = 0.0
    audio_in_seconds: float = 0.0
    llm_seconds: float = 0.0
    llm_tokens: int = 0
    tts_seconds: float = 0.0
    audio_out_seconds: float = 0.0
    first_audio_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.llm_tokens / self.llm_seconds if self.llm_seconds else 0.0

    @property
    def real_time_factor(self) -> float:
        return self.tts_seconds / self.audio_out_seconds if self.audio_out_seconds else 0.0

    def as_dict(self) -> dict:
        return {"asr_seconds": round(self.asr_seconds, 3), "audio_in_seconds": round(self.audio_in_seconds, 2),
                "llm_seconds": round(self.llm_seconds, 3), "llm_tokens": self.llm_tokens,
                "tokens_per_second": round(self.tokens_per_second, 1), "tts_seconds": round(self.tts_seconds, 3),
                "audio_out_seconds": round(self.audio_out_seconds, 2),
                "real_time_factor": round(self.real_time_factor, 3),
                "first_audio_seconds": round(self.first_audio_seconds, 3),
                "total_seconds": round(self.total_seconds, 3)}

    def markdown(self) -> str:
        asr = f"{self.asr_seconds:.2f} s for {self.audio_in_seconds:.1f} s of audio" if self.audio_in_seconds else "—"
        tts = f"{self.tts_seconds:.2f} s for {self.audio_out_seconds:.1f} s of audio" if self.audio_out_seconds else "—"
        first = f"{self.first_audio_seconds:.2f} s" if self.first_audio_seconds else "—"
        return (f"**First audio** after {first} · **ASR** {asr} · **LLM** {self.llm_seconds:.2f} s, "
                f"{self.llm_tokens} tokens ({self.tokens_per_second:.1f} tok/s) · **TTS** {tts} · "
                f"**voice real-time factor** {self.real_time_factor:.2f}")


def check_model(manager, model_id, task: str) -> str:
    spec = manager.catalog.get(model_id)
    if spec.task != task:
        raise InvalidRequest(f"{model_id} is a {spec.task} model; choose one of: {', '.join(manager.catalog.ids(task))}")
    return spec.id


def check_history(history) -> list[dict]:
    if history is None or history == "":
        return []
    if not isinstance(history, list):
        raise InvalidRequest("history must be a list of {role, content} messages")
    clean = []
    for index, message in enumerate(history):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant") \
                or not isinstance(message.get("content"), str):
            raise InvalidRequest(f"history message {index} must be {{'role': 'user'|'assistant', 'content': text}}")
        clean.append({"role": message["role"], "content": message["content"]})
    return clean


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise InvalidRequest(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _voice_family(manager, model_id: str):
    from models.families import family_module

    return family_module(manager.catalog.get(model_id).family)


@dataclasses.dataclass(frozen=True)
class Variation:
    """Piper's noise scales (None: the voice's own defaults); other voices ignore them."""

    noise_scale: float | None = None
    noise_w: float | None = None

    def kwargs(self, family_name: str) -> dict:
        if family_name != "piper":
            return {}
        return {"noise_scale": self.noise_scale, "noise_w": self.noise_w}


def transcribe_file(manager, audio, language: str = "auto", model: str = "whisper-tiny.en",
                    task: str = "transcribe", timestamps: str = "none", progress=None):
    """Load, clean and transcribe an audio file; returns (Transcript, seconds spent)."""
    from models.audio import load_audio
    from models.families import asr

    model = check_model(manager, model, "speech-to-text")
    task = check_choice("task", task, asr.TASKS)
    timestamps = check_choice("timestamps", timestamps, asr.TIMESTAMPS)
    clip = load_audio(audio)
    started = time.perf_counter()
    with manager.use(model, progress=progress) as handle:
        transcript = asr.transcribe(handle, clip.samples, language, task, timestamps, progress=progress)
    return transcript, time.perf_counter() - started


def chat_reply(manager, settings, message: str, history=None, model: str = "smollm2-135m",
               system_prompt: str = DEFAULT_SYSTEM_PROMPT, max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
               temperature=DEFAULT_TEMPERATURE, adapter: str = "none", stats=None, progress=None) -> Iterator[str]:
    """Stream the assistant's reply (accumulated text) to ``message`` after ``history``."""
    from models import adapters
    from models.families import chat
    from models.generation import GenerationParams

    model = check_model(manager, model, "chat")
    if not isinstance(message, str) or not message.strip():
        raise InvalidRequest("Say or type a message first.")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise InvalidRequest("system_prompt must be text")
    params = GenerationParams(
        max_new_tokens=check_number("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS, integer=True),
        temperature=check_number("temperature", temperature, 0.0, 2.0))
    system = [{"role": "system", "content": system_prompt.strip()}] if system_prompt and system_prompt.strip() else []
    messages = system + check_history(history) + [{"role": "user", "content": message.strip()}]
    folder = adapters.resolve(settings.adapters_dir, adapter, model)
    with manager.use(model, progress=progress) as handle:
        if folder is not None or getattr(handle.model, "_hf_peft_config_loaded", False):
            adapters.activate(handle.model, folder)
        yield from chat.reply(handle, messages, params, stats=stats)


def _check_speech_options(manager, model: str, speed, reference):
    """(model id, family module, speed) after checking them; the reference is validated as audio."""
    model = check_model(manager, model, "text-to-speech")
    family = _voice_family(manager, model)
    speed = check_number("speed", speed, *family.SPEED_RANGE)
    if reference is not None and reference != "":
        from models.audio import load_audio

        load_audio(reference, max_seconds=60)  # a clear message before the voice model reads it
    return model, family, speed


def speak_text(manager, text: str, model: str = "piper-joe", speaker: str = "default", language: str = "default",
               reference=None, speed=1.0, progress=None, variation: Variation = Variation()):
    """Synthesize ``text``; returns ((sample_rate, int16 samples), seconds spent)."""
    from models.audio import to_int16

    model, family, speed = _check_speech_options(manager, model, speed, reference)
    text = family.check_text(text)
    started = time.perf_counter()
    with manager.use(model, progress=progress) as handle:
        samples, rate = family.speak(handle, text, speaker=speaker, language=language,
                                     reference_wav=reference or None, speed=speed, progress=progress,
                                     **variation.kwargs(family.__name__.rsplit(".", 1)[-1]))
    return (rate, to_int16(samples)), time.perf_counter() - started


def voice_options(manager, model: str) -> dict:
    """Speakers, languages, whether a reference voice is used and the family, for a voice (loads it)."""
    model = check_model(manager, model, "text-to-speech")
    with manager.use(model) as handle:
        return {"speakers": handle.speakers, "languages": handle.languages, "cloning": handle.supports_cloning,
                "sample_rate": handle.sample_rate, "family": manager.catalog.get(model).family}


class SentenceSplitter:
    """Hands out each sentence of a growing text once it is complete (followed by more text)."""

    def __init__(self):
        self.done = 0

    def complete(self, text: str) -> list[str]:
        from models.families.tts import split_sentences

        pieces = split_sentences(text)[:-1]
        new, self.done = pieces[self.done:], max(self.done, len(pieces))
        return new

    def rest(self, text: str) -> list[str]:
        from models.families.tts import split_sentences

        pieces = split_sentences(text)
        new, self.done = pieces[self.done:], len(pieces)
        return new


class SentenceVoice:
    """Speaks one sentence at a time with one voice, pinned from its first sentence until ``close``."""

    def __init__(self, manager, model: str, speaker: str, language: str, reference, speed: float,
                 variation: Variation):
        self.manager, self.model = manager, model
        self.family = _voice_family(manager, model)
        self.options = dict(speaker=speaker, language=language, reference_wav=reference or None, speed=speed,
                            **variation.kwargs(self.family.__name__.rsplit(".", 1)[-1]))
        self._stack = contextlib.ExitStack()
        self._handle = None
        self.chunks: list = []
        self.rate = 0
        self.seconds = 0.0
        self.skipped: list[str] = []

    def say(self, sentence: str):
        """(rate, int16 samples) for ``sentence`` (a short pause first after the first one), or None."""
        import numpy as np

        from models.audio import to_int16

        started = time.perf_counter()
        if self._handle is None:
            self._handle = self._stack.enter_context(self.manager.use(self.model))
        try:
            samples, self.rate = self.family.speak(self._handle, sentence, **self.options)
        except ValueError as exc:  # nothing pronounceable in this sentence: keep the text, skip its sound
            self.skipped.append(str(exc))
            return None
        finally:
            self.seconds += time.perf_counter() - started
        if self.chunks:
            samples = np.concatenate([np.zeros(int(self.family.PAUSE_SECONDS * self.rate), np.float32), samples])
        chunk = (self.rate, to_int16(samples))
        self.chunks.append(chunk[1])
        return chunk

    def whole(self):
        import numpy as np

        return (self.rate, np.concatenate(self.chunks)) if self.chunks else None

    def close(self) -> None:
        self._stack.close()
        self._handle = None


@dataclasses.dataclass
class TurnUpdate:
    """What a turn has produced so far; ``audio_chunk`` is the audio new since the last update."""

    transcript: str = ""
    segments: str = ""
    reply: str = ""
    audio_chunk: tuple | None = None
    audio: tuple | None = None
    timings: Timings = dataclasses.field(default_factory=Timings)
    history: list = dataclasses.field(default_factory=list)
    stage: str = ""


def voice_turn(manager, settings, audio=None, text: str = "", history=None, asr_model: str = "whisper-tiny.en",
               language: str = "auto", task: str = "transcribe", timestamps: str = "none",
               chat_model: str = "smollm2-135m", system_prompt: str = DEFAULT_SYSTEM_PROMPT,
               max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=DEFAULT_TEMPERATURE, adapter: str = "none",
               tts_model: str = "piper-joe", speaker: str = "default", tts_language: str = "default",
               reference=None, speed=1.0, progress=None, variation: Variation = Variation(),
               stream_speech: bool = True) -> Iterator[TurnUpdate]:
    """One assistant turn: yields after the transcript, as the reply streams, and with each spoken sentence.

    Audio wins over typed text when both are given. With ``stream_speech`` (the default) each
    sentence is spoken as soon as the chat model has finished it; without, the whole reply is
    spoken after the model is done (one stage after the other).
    """
    from models.families import asr
    from models.generation import StreamStats

    started = time.perf_counter()
    # 0. Check every argument before any model loads, so a typo costs nothing
    history = check_history(history)
    for model_id, task_name in ((asr_model, "speech-to-text"), (chat_model, "chat"), (tts_model, "text-to-speech")):
        check_model(manager, model_id, task_name)
    check_choice("task", task, asr.TASKS)
    check_choice("timestamps", timestamps, asr.TIMESTAMPS)
    _, _, speed = _check_speech_options(manager, tts_model, speed, reference)
    update = TurnUpdate(history=history)

    # 1. Speech to text (or the typed message)
    if audio is not None and audio != "":
        update.stage = "transcribing"
        transcript, seconds = transcribe_file(manager, audio, language, asr_model, task, timestamps, progress)
        if not transcript.text.strip():
            raise InvalidRequest("No speech was recognized in the recording; speak again or type the message.")
        update.transcript, update.segments = transcript.text, asr.format_segments(transcript.segments)
        update.timings.asr_seconds, update.timings.audio_in_seconds = seconds, transcript.audio_seconds
    elif isinstance(text, str) and text.strip():
        update.transcript = text.strip()
    else:
        raise InvalidRequest("No input: record with the microphone, upload an audio file, or type a message.")
    update.history = history + [{"role": "user", "content": update.transcript}]
    yield update

    # 2. The reply, streamed; each finished sentence is spoken while the next one is written
    update.stage = "replying"
    stats = StreamStats()
    voice = SentenceVoice(manager, tts_model, speaker, tts_language, reference, speed, variation)
    splitter = SentenceSplitter()

    def spoken(sentences: list[str]) -> Iterator[TurnUpdate]:
        for sentence in sentences:
            chunk = voice.say(sentence)
            if chunk is None:
                continue
            if not update.timings.first_audio_seconds:
                update.timings.first_audio_seconds = time.perf_counter() - started
            update.audio_chunk = chunk
            yield update
            update.audio_chunk = None

    try:
        for partial in chat_reply(manager, settings, update.transcript, history, chat_model, system_prompt,
                                  max_new_tokens, temperature, adapter, stats=stats, progress=progress):
            update.reply = partial
            update.history = history + [{"role": "user", "content": update.transcript},
                                        {"role": "assistant", "content": partial}]
            yield update
            if stream_speech:
                yield from spoken(splitter.complete(partial))
        update.timings.llm_seconds, update.timings.llm_tokens = stats.seconds, stats.new_tokens
        # 3. Whatever is left of the reply; without streaming, the whole reply in one piece
        if update.reply.strip():
            update.stage = "speaking"
            yield from spoken(splitter.rest(update.reply) if stream_speech else [update.reply])
    finally:
        voice.close()
    update.audio = voice.whole()
    update.timings.tts_seconds = voice.seconds
    update.timings.audio_out_seconds = len(update.audio[1]) / update.audio[0] if update.audio else 0.0
    update.timings.total_seconds = time.perf_counter() - started
    if not update.reply.strip():
        update.stage = "done (empty reply, nothing to speak)"
    elif update.audio is None:
        update.stage = f"done (not spoken: {voice.skipped[0] if voice.skipped else 'nothing to say'})"
    else:
        update.stage = "done"
    yield update


def last(updates: Iterator[TurnUpdate]) -> TurnUpdate:
    """Run a turn to its end and return its final update."""
    final = None
    for final in updates:  # noqa: B007 - only the last one is wanted
        continue
    if final is None:
        raise RuntimeError("the turn produced no result")
    return final
