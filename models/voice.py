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
from pathlib import Path

from models.checks import check_choice, check_messages, check_model, check_number, check_text
from models.errors import InvalidRequest
from models.generation import MAX_NEW_TOKENS, GenerationParams

# Tried on smollm2-135m: mentioning a "voice" assistant made it answer "Le Grand Paris is the capital of France".
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Your answers are read aloud: keep them short and plain."
DEFAULT_MAX_NEW_TOKENS = 96
DEFAULT_TEMPERATURE = 0.3
DEFAULT_TOP_P = 0.95
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
        """The stages measured so far, in one line ("" before any): no zero-filled figures while waiting."""
        parts = []
        if self.first_audio_seconds:
            parts.append(f"**First audio** after {self.first_audio_seconds:.2f} s")
        if self.audio_in_seconds:
            parts.append(f"**ASR** {self.asr_seconds:.2f} s for {self.audio_in_seconds:.1f} s of audio")
        if self.llm_tokens:
            parts.append(f"**LLM** {self.llm_seconds:.2f} s, {self.llm_tokens} tokens "
                         f"({self.tokens_per_second:.1f} tok/s)")
        if self.audio_out_seconds:
            parts.append(f"**TTS** {self.tts_seconds:.2f} s for {self.audio_out_seconds:.1f} s of audio · "
                         f"**voice real-time factor** {self.real_time_factor:.2f}")
        return " · ".join(parts)


def _family(catalog, model_id: str):
    from models.families import family_module

    return family_module(catalog.get(model_id).family)


def _default(catalog, settings, model, task: str) -> str:
    return catalog.default_for(task, settings.offline) if model in (None, "") else model


@dataclasses.dataclass(frozen=True)
class Variation:
    """Piper's noise scales (None: the voice's own defaults); other voices ignore them."""

    noise_scale: float | None = None
    noise_w: float | None = None

    def kwargs(self, family_name: str) -> dict:
        if family_name != "piper":
            return {}
        return {"noise_scale": self.noise_scale, "noise_w": self.noise_w}


@dataclasses.dataclass(frozen=True)
class AsrOptions:
    """Which speech model hears the audio, and how."""

    model: str
    language: str = "auto"
    task: str = "transcribe"
    timestamps: str = "none"

    @classmethod
    def build(cls, catalog, settings, *, model=None, language="auto", task="transcribe",
              timestamps="none") -> AsrOptions:
        from models.families import asr

        model = check_model(catalog, _default(catalog, settings, model, "speech-to-text"), "speech-to-text").id
        language = check_text("language", language if language not in (None, "") else "auto", 40)
        return cls(model=model, language=language, task=check_choice("task", task, asr.TASKS),
                   timestamps=check_choice("timestamps", timestamps, asr.TIMESTAMPS))


@dataclasses.dataclass(frozen=True)
class ReplyOptions:
    """Which chat model answers, with which system prompt, sampling settings and adapter."""

    model: str
    system_prompt: str
    params: GenerationParams
    adapter_folder: Path | None = None

    @classmethod
    def build(cls, catalog, settings, *, model=None, system_prompt=DEFAULT_SYSTEM_PROMPT,
              max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=DEFAULT_TEMPERATURE, adapter="none",
              top_p=DEFAULT_TOP_P, seed=None) -> ReplyOptions:
        from models import adapters

        model = check_model(catalog, _default(catalog, settings, model, "chat"), "chat").id
        params = GenerationParams(
            max_new_tokens=check_number("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS, integer=True),
            temperature=check_number("temperature", temperature, 0.0, 2.0),
            top_p=check_number("top_p", top_p, 0.0, 1.0),
            seed=None if seed is None else check_number("seed", seed, 0, 2**32 - 1, integer=True))
        system_prompt = check_text("system_prompt", system_prompt, settings.limits.text_chars, required=False)
        return cls(model=model, system_prompt=system_prompt, params=params,
                   adapter_folder=adapters.resolve(settings.adapters_dir, adapter, model))


@dataclasses.dataclass(frozen=True)
class VoiceOptions:
    """Which voice speaks, and how (speaker, language, a reference to clone, speed, variation)."""

    model: str
    speaker: str = "default"
    language: str = "default"
    reference: str | None = None
    speed: float = 1.0
    variation: Variation = Variation()

    @classmethod
    def build(cls, catalog, settings, *, model=None, speaker="default", language="default", reference=None,
              speed=1.0, noise_scale=None, noise_w=None) -> VoiceOptions:
        model = check_model(catalog, _default(catalog, settings, model, "text-to-speech"), "text-to-speech").id
        speed = check_number("speed", speed, *_family(catalog, model).SPEED_RANGE)
        variation = Variation(
            noise_scale=None if noise_scale is None else check_number("noise_scale", noise_scale, 0.0, 1.5),
            noise_w=None if noise_w is None else check_number("noise_w", noise_w, 0.0, 1.5))
        if reference in ("", None):
            reference = None
        else:  # checked as audio now, for a clear message before the voice model reads it
            from models.audio import load_audio

            load_audio(reference, max_seconds=60, limits=settings.limits)
            reference = str(reference)
        return cls(model=model, speaker=check_text("speaker", speaker or "default", 200),
                   language=check_text("voice language", language or "default", 40), reference=reference,
                   speed=speed, variation=variation)

    def speak_kwargs(self, family) -> dict:
        return dict(speaker=self.speaker, language=self.language, reference_wav=self.reference, speed=self.speed,
                    **self.variation.kwargs(family.__name__.rsplit(".", 1)[-1]))


@dataclasses.dataclass(frozen=True)
class TranscribeRequest:
    """/transcribe: one audio file to text."""

    audio: str
    asr: AsrOptions

    @classmethod
    def build(cls, catalog, settings, *, audio, model=None, language="auto", task="transcribe",
              timestamps="none") -> TranscribeRequest:
        return cls(audio=audio, asr=AsrOptions.build(catalog, settings, model=model, language=language, task=task,
                                                     timestamps=timestamps))


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """/chat: a message after a conversation, to a chat model."""

    message: str
    history: tuple
    reply: ReplyOptions

    @classmethod
    def build(cls, catalog, settings, *, message, history=None, model=None, system_prompt=DEFAULT_SYSTEM_PROMPT,
              max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=DEFAULT_TEMPERATURE, adapter="none",
              top_p=DEFAULT_TOP_P, seed=None) -> ChatRequest:
        message = check_text("message", message, settings.limits.text_chars,
                             empty_message="Say or type a message first.")
        return cls(message=message, history=tuple(check_messages(history, settings.limits)),
                   reply=ReplyOptions.build(catalog, settings, model=model, system_prompt=system_prompt,
                                            max_new_tokens=max_new_tokens, temperature=temperature, adapter=adapter,
                                            top_p=top_p, seed=seed))

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.reply.system_prompt}] if self.reply.system_prompt else []
        return system + list(self.history) + [{"role": "user", "content": self.message}]


@dataclasses.dataclass(frozen=True)
class SpeakRequest:
    """/speak: text to a voice."""

    text: str
    voice: VoiceOptions

    @classmethod
    def build(cls, catalog, settings, *, text, model=None, speaker="default", language="default", reference=None,
              speed=1.0, noise_scale=None, noise_w=None) -> SpeakRequest:
        voice = VoiceOptions.build(catalog, settings, model=model, speaker=speaker, language=language,
                                   reference=reference, speed=speed, noise_scale=noise_scale, noise_w=noise_w)
        return cls(text=_family(catalog, voice.model).check_text(text), voice=voice)


@dataclasses.dataclass(frozen=True)
class VoiceTurnRequest:
    """One assistant turn: audio (or typed text) heard, answered and spoken; audio wins over text."""

    audio: str | None
    text: str
    history: tuple
    asr: AsrOptions
    reply: ReplyOptions
    voice: VoiceOptions
    image: object = None  # an image to ask about (RGB PIL image): the question then goes to ``vqa_model``
    vqa_model: str = ""

    @classmethod
    def build(cls, catalog, settings, *, audio=None, text="", history=None, asr_model=None, language="auto",
              task="transcribe", timestamps="none", chat_model=None, system_prompt=DEFAULT_SYSTEM_PROMPT,
              max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=DEFAULT_TEMPERATURE, adapter="none",
              tts_model=None, speaker="default", tts_language="default", reference=None, speed=1.0,
              noise_scale=None, noise_w=None, image=None, vqa_model=None) -> VoiceTurnRequest:
        audio = None if audio in (None, "") else audio
        text = check_text("text", text, settings.limits.text_chars, required=False)
        if audio is None and not text:
            raise InvalidRequest("No input: record with the microphone, upload an audio file, or type a message.")
        picture, vqa_id = None, ""
        if image not in (None, ""):  # asked about an image: checked now, before any model loads
            from models.images import load_image

            vqa_id = check_model(catalog, _default(catalog, settings, vqa_model, "vqa"), "vqa").id
            picture, _ = load_image(image, limits=settings.limits)
        return cls(
            image=picture, vqa_model=vqa_id,
            audio=audio, text=text, history=tuple(check_messages(history, settings.limits)),
            asr=AsrOptions.build(catalog, settings, model=asr_model, language=language, task=task,
                                 timestamps=timestamps),
            reply=ReplyOptions.build(catalog, settings, model=chat_model, system_prompt=system_prompt,
                                     max_new_tokens=max_new_tokens, temperature=temperature, adapter=adapter),
            voice=VoiceOptions.build(catalog, settings, model=tts_model, speaker=speaker, language=tts_language,
                                     reference=reference, speed=speed, noise_scale=noise_scale, noise_w=noise_w))


def transcribe_file(manager, settings, request: TranscribeRequest, progress=None):
    """Load, clean and transcribe an audio file; returns (Transcript, seconds spent)."""
    from models.audio import load_audio
    from models.families import asr

    clip = load_audio(request.audio, limits=settings.limits)
    options = request.asr
    started = time.perf_counter()
    with manager.use(options.model, progress=progress) as handle:
        transcript = asr.transcribe(handle, clip.samples, options.language, options.task, options.timestamps,
                                    progress=progress)
    return transcript, time.perf_counter() - started


def chat_reply(manager, request: ChatRequest, stats=None, progress=None, notices: list[str] | None = None
               ) -> Iterator[str]:
    """Stream the assistant's reply (accumulated text) to the request's message after its history.

    ``notices`` gets what the user should know: earlier turns left out to fit the context, a lowered
    max_new_tokens, a stop by the time cap.
    """
    options = request.reply
    family = _family(manager.catalog, options.model)  # chat, or remote for an engine served elsewhere
    with manager.use(options.model, progress=progress) as handle:
        yield from family.reply(handle, request.messages(), options.params, adapter_folder=options.adapter_folder,
                                stats=stats, notices=notices, limits=manager.settings.limits)


def speak_text(manager, request: SpeakRequest, progress=None):
    """Synthesize the request's text; returns ((sample_rate, int16 samples), seconds spent)."""
    from models.audio import to_int16

    family = _family(manager.catalog, request.voice.model)
    started = time.perf_counter()
    with manager.use(request.voice.model, progress=progress) as handle:
        samples, rate = family.speak(handle, request.text, progress=progress,
                                     **request.voice.speak_kwargs(family))
    return (rate, to_int16(samples)), time.perf_counter() - started


def voice_options(manager, model: str) -> dict:
    """Speakers, languages, whether a reference voice is used and the family, for a voice (loads it)."""
    model = check_model(manager.catalog, model, "text-to-speech").id
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

    def __init__(self, manager, options: VoiceOptions):
        self.manager, self.model = manager, options.model
        self.family = _family(manager.catalog, options.model)
        self.options = options.speak_kwargs(self.family)
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
        except InvalidRequest as exc:  # nothing pronounceable in this sentence: keep the text, skip its sound
            self.skipped.append(str(exc))
            return None
        finally:
            self.seconds += time.perf_counter() - started
        if not len(samples):  # the call was stopped before this sentence
            return None
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
    notices: list = dataclasses.field(default_factory=list)


def voice_turn(manager, settings, request: VoiceTurnRequest, progress=None,
               stream_speech: bool = True) -> Iterator[TurnUpdate]:
    """One assistant turn: yields after the transcript, as the reply streams, and with each spoken sentence.

    With ``stream_speech`` (the default) each sentence is spoken as soon as the chat model has
    finished it; without, the whole reply is spoken after the model is done (one stage after the other).
    """
    from models.families import asr
    from models.generation import StreamStats

    started = time.perf_counter()
    history = list(request.history)
    update = TurnUpdate(history=history)

    # 1. Speech to text (or the typed message)
    if request.audio is not None:
        update.stage = "transcribing"
        transcript, seconds = transcribe_file(manager, settings, TranscribeRequest(request.audio, request.asr),
                                              progress)
        if not transcript.text.strip():
            raise InvalidRequest("No speech was recognized in the recording; speak again or type the message.")
        update.transcript, update.segments = transcript.text, asr.format_segments(transcript.segments)
        update.timings.asr_seconds, update.timings.audio_in_seconds = seconds, transcript.audio_seconds
    else:
        update.transcript = request.text
    update.history = history + [{"role": "user", "content": update.transcript}]
    yield update

    # 2. The reply, streamed; each finished sentence is spoken while the next one is written
    update.stage = "replying"
    stats = StreamStats()
    voice = SentenceVoice(manager, request.voice)
    splitter = SentenceSplitter()
    chat = ChatRequest(message=update.transcript, history=request.history, reply=request.reply)
    replies = _image_answer(manager, request, update.transcript, stats, progress) if request.image is not None \
        else chat_reply(manager, chat, stats=stats, progress=progress, notices=update.notices)

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
        for partial in replies:
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
    _finish(update, voice, started)
    yield update


def _image_answer(manager, request: VoiceTurnRequest, question: str, stats, progress) -> Iterator[str]:
    """The VQA model's answer (accumulated text) to the spoken question about the turn's image."""
    from models import vqa

    ask = vqa.VqaRequest(image=request.image, question=question, model=request.vqa_model,
                         params=request.reply.params, system_prompt=request.reply.system_prompt,
                         history=request.history)
    for history, _, _ in vqa.chat_turn(manager, ask, progress=progress, stats=stats):
        yield history[-1]["content"]


def _finish(update: TurnUpdate, voice: SentenceVoice, started: float) -> None:
    """The whole reply's audio, the voice's timings and the final stage."""
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


def last(updates: Iterator[TurnUpdate]) -> TurnUpdate:
    """Run a turn to its end and return its final update."""
    final = None
    for final in updates:  # noqa: B007 - only the last one is wanted
        continue
    if final is None:
        raise RuntimeError("the turn produced no result")
    return final
