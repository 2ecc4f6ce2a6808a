"""Voice assistant tab: speech (or typed text) -> transcript -> streamed chat reply -> spoken reply.

Each stage takes its model from the manager in its own ``with manager.use(...)`` block, so a model
is pinned only while its stage runs and the three share the memory budget. The plain functions
here (transcribe_file, chat_reply, speak_text, voice_turn) are what the endpoints and tests call.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import gradio as gr

from models.checks import check_number
from tabs.common import GPU_QUEUE, adapter_choices, default_model, gpu, model_choices, user_errors

DEFAULT_SYSTEM_PROMPT = ("You are a friendly voice assistant. Your replies are read aloud, so answer in one to three "
                         "short, plain sentences, without lists, markdown, code or emoji.")
LANGUAGE_CHOICES = ["auto", "english", "chinese", "german", "spanish", "russian", "korean", "french", "japanese",
                    "portuguese", "italian", "dutch", "arabic", "hindi", "turkish", "polish", "ukrainian",
                    "vietnamese"]
TIMESTAMP_CHOICES = ["none", "segment", "word"]
DEFAULT_MAX_NEW_TOKENS = 96
DEFAULT_TEMPERATURE = 0.3


@dataclasses.dataclass
class Timings:
    """Per-turn stage timings; the real-time factor is processing time over seconds of reply audio."""

    asr_seconds: float = 0.0
    audio_in_seconds: float = 0.0
    llm_seconds: float = 0.0
    llm_tokens: int = 0
    tts_seconds: float = 0.0
    audio_out_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.llm_tokens / self.llm_seconds if self.llm_seconds else 0.0

    @property
    def real_time_factor(self) -> float:
        total = self.asr_seconds + self.llm_seconds + self.tts_seconds
        return total / self.audio_out_seconds if self.audio_out_seconds else 0.0

    def as_dict(self) -> dict:
        return {"asr_seconds": round(self.asr_seconds, 3), "audio_in_seconds": round(self.audio_in_seconds, 2),
                "llm_seconds": round(self.llm_seconds, 3), "llm_tokens": self.llm_tokens,
                "tokens_per_second": round(self.tokens_per_second, 1), "tts_seconds": round(self.tts_seconds, 3),
                "audio_out_seconds": round(self.audio_out_seconds, 2),
                "real_time_factor": round(self.real_time_factor, 3)}

    def markdown(self) -> str:
        asr = f"{self.asr_seconds:.2f} s for {self.audio_in_seconds:.1f} s of audio" if self.audio_in_seconds else "—"
        tts = f"{self.tts_seconds:.2f} s for {self.audio_out_seconds:.1f} s of audio" if self.audio_out_seconds else "—"
        return (f"**ASR** {asr} · **LLM** {self.llm_seconds:.2f} s, {self.llm_tokens} tokens "
                f"({self.tokens_per_second:.1f} tok/s) · **TTS** {tts} · "
                f"**real-time factor** {self.real_time_factor:.2f}")


def _check_model(manager, model_id, task: str) -> str:
    spec = manager.catalog.get(model_id)
    if spec.task != task:
        raise ValueError(f"{model_id} is a {spec.task} model; choose one of: {', '.join(manager.catalog.ids(task))}")
    return spec.id


def _check_history(history) -> list[dict]:
    if history is None or history == "":
        return []
    if not isinstance(history, list):
        raise ValueError("history must be a list of {role, content} messages")
    clean = []
    for index, message in enumerate(history):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant") \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"history message {index} must be {{'role': 'user'|'assistant', 'content': text}}")
        clean.append({"role": message["role"], "content": message["content"]})
    return clean


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def transcribe_file(manager, audio, language: str = "auto", model: str = "tiny-whisper", task: str = "transcribe",
                    timestamps: str = "none", progress=None):
    """Load, clean and transcribe an audio file; returns (Transcript, seconds spent)."""
    from models.audio import load_audio
    from models.families import asr

    model = _check_model(manager, model, "speech-to-text")
    task = _check_choice("task", task, asr.TASKS)
    timestamps = _check_choice("timestamps", timestamps, asr.TIMESTAMPS)
    clip = load_audio(audio)
    started = time.perf_counter()
    with manager.use(model) as handle:
        transcript = asr.transcribe(handle, clip.samples, language, task, timestamps, progress=progress)
    return transcript, time.perf_counter() - started


def chat_reply(manager, settings, message: str, history=None, model: str = "tiny-chat",
               system_prompt: str = DEFAULT_SYSTEM_PROMPT, max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
               temperature=DEFAULT_TEMPERATURE, adapter: str = "none", stats=None) -> Iterator[str]:
    """Stream the assistant's reply (accumulated text) to ``message`` after ``history``."""
    from models import adapters
    from models.families import chat
    from models.generation import GenerationParams

    model = _check_model(manager, model, "chat")
    if not isinstance(message, str) or not message.strip():
        raise ValueError("Say or type a message first.")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise ValueError("system_prompt must be text")
    params = GenerationParams(max_new_tokens=check_number("max_new_tokens", max_new_tokens, 1, 1024, integer=True),
                              temperature=check_number("temperature", temperature, 0.0, 2.0))
    system = [{"role": "system", "content": system_prompt.strip()}] if system_prompt and system_prompt.strip() else []
    messages = system + _check_history(history) + [{"role": "user", "content": message.strip()}]
    folder = adapters.resolve(settings.adapters_dir, adapter, model)
    with manager.use(model) as handle:
        if folder is not None or getattr(handle.model, "_hf_peft_config_loaded", False):
            adapters.activate(handle.model, folder)
        yield from chat.reply(handle, messages, params, stats=stats)


def speak_text(manager, text: str, model: str = "tiny-tts", speaker: str = "default", language: str = "default",
               reference=None, speed=1.0, progress=None):
    """Synthesize ``text``; returns ((sample_rate, int16 samples), seconds spent)."""
    from models.audio import to_int16
    from models.families import tts

    model = _check_model(manager, model, "text-to-speech")
    text = tts.check_text(text)
    speed = check_number("speed", speed, *tts.SPEED_RANGE)
    if reference is not None:  # validate it as audio here, for a clear message, before Coqui reads it
        from models.audio import load_audio

        load_audio(reference, max_seconds=60)
    started = time.perf_counter()
    with manager.use(model) as handle:
        samples, rate = tts.speak(handle, text, speaker=speaker, language=language, reference_wav=reference,
                                  speed=speed, progress=progress)
    return (rate, to_int16(samples)), time.perf_counter() - started


def voice_options(manager, model: str) -> dict:
    """Speakers, languages and whether a reference voice is used, for a TTS model (loads it)."""
    model = _check_model(manager, model, "text-to-speech")
    with manager.use(model) as handle:
        return {"speakers": handle.speakers, "languages": handle.languages, "cloning": handle.supports_cloning,
                "sample_rate": handle.sample_rate}


@dataclasses.dataclass
class TurnUpdate:
    transcript: str = ""
    segments: str = ""
    reply: str = ""
    audio: tuple | None = None
    timings: Timings = dataclasses.field(default_factory=Timings)
    history: list = dataclasses.field(default_factory=list)
    stage: str = ""


def voice_turn(manager, settings, audio=None, text: str = "", history=None, asr_model: str = "tiny-whisper",
               language: str = "auto", task: str = "transcribe", timestamps: str = "none",
               chat_model: str = "tiny-chat", system_prompt: str = DEFAULT_SYSTEM_PROMPT,
               max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=DEFAULT_TEMPERATURE, adapter: str = "none",
               tts_model: str = "tiny-tts", speaker: str = "default", tts_language: str = "default",
               reference=None, speed=1.0, progress=None) -> Iterator[TurnUpdate]:
    """One assistant turn: yields after the transcript, while the reply streams, and with the audio.

    Audio wins over typed text when both are given.
    """
    from models.families import asr, tts
    from models.generation import StreamStats

    # 0. Check every argument before any model loads, so a typo costs nothing
    history = _check_history(history)
    for model_id, task_name in ((asr_model, "speech-to-text"), (chat_model, "chat"), (tts_model, "text-to-speech")):
        _check_model(manager, model_id, task_name)
    _check_choice("task", task, asr.TASKS)
    _check_choice("timestamps", timestamps, asr.TIMESTAMPS)
    speed = check_number("speed", speed, *tts.SPEED_RANGE)
    update = TurnUpdate(history=history)
    # 1. Speech to text (or the typed message)
    if audio is not None and audio != "":
        update.stage = "transcribing"
        transcript, seconds = transcribe_file(manager, audio, language, asr_model, task, timestamps, progress)
        if not transcript.text.strip():
            raise ValueError("No speech was recognized in the recording; speak again or type the message.")
        update.transcript, update.segments = transcript.text, asr.format_segments(transcript.segments)
        update.timings.asr_seconds, update.timings.audio_in_seconds = seconds, transcript.audio_seconds
    elif isinstance(text, str) and text.strip():
        update.transcript = text.strip()
    else:
        raise ValueError("No input: record with the microphone, upload an audio file, or type a message.")
    update.history = history + [{"role": "user", "content": update.transcript}]
    yield update

    # 2. The reply, streamed
    update.stage = "replying"
    stats = StreamStats()
    for partial in chat_reply(manager, settings, update.transcript, history, chat_model, system_prompt,
                              max_new_tokens, temperature, adapter, stats=stats):
        update.reply = partial
        update.history = history + [{"role": "user", "content": update.transcript},
                                    {"role": "assistant", "content": partial}]
        yield update
    update.timings.llm_seconds, update.timings.llm_tokens = stats.seconds, stats.new_tokens
    if not update.reply.strip():
        update.stage = "done (empty reply, nothing to speak)"
        yield update
        return

    # 3. Text to speech; a reply the voice cannot pronounce (no letters, unknown script) keeps the text
    update.stage = "speaking"
    try:
        update.audio, update.timings.tts_seconds = speak_text(manager, update.reply, tts_model, speaker,
                                                               tts_language, reference, speed, progress)
    except ValueError as exc:
        update.stage = f"done (not spoken: {exc})"
        yield update
        return
    update.timings.audio_out_seconds = len(update.audio[1]) / update.audio[0]
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


def _progress_callback(progress):
    if progress is None:
        return None
    return lambda fraction, description: progress(fraction, desc=description)


def build(manager, settings) -> None:
    asr_default = default_model(manager, settings, "speech-to-text")
    chat_default = default_model(manager, settings, "chat")
    tts_default = default_model(manager, settings, "text-to-speech")

    # Custom values are allowed so that API callers get the catalog's message listing known models.
    with gr.Row():
        asr_model = gr.Dropdown(model_choices(manager, "speech-to-text"), value=asr_default, label="Speech model",
                                allow_custom_value=True)
        chat_model = gr.Dropdown(model_choices(manager, "chat"), value=chat_default, label="Chat model",
                                 allow_custom_value=True)
        tts_model = gr.Dropdown(model_choices(manager, "text-to-speech"), value=tts_default, label="Voice model",
                                allow_custom_value=True)
    with gr.Row():
        with gr.Column(scale=1):
            audio_in = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Speak or upload audio")
            text_in = gr.Textbox("", label="…or type a message", lines=2, placeholder="What is the capital of France?")
            with gr.Row():
                send = gr.Button("Send", variant="primary")
                transcribe_only = gr.Button("Transcribe only")
                clear = gr.Button("Clear conversation", variant="stop")
            with gr.Accordion("Speech recognition", open=False):
                language = gr.Dropdown(LANGUAGE_CHOICES, value="auto", label="Language", allow_custom_value=True,
                                       info="or a Whisper language code")
                task = gr.Radio(["transcribe", "translate"], value="transcribe", label="Task",
                                info="translate: speech in any language to English text")
                timestamps = gr.Radio(TIMESTAMP_CHOICES, value="none", label="Timestamps")
            with gr.Accordion("Reply", open=False):
                system_prompt = gr.Textbox(DEFAULT_SYSTEM_PROMPT, label="System prompt", lines=3)
                max_new_tokens = gr.Slider(8, 1024, value=DEFAULT_MAX_NEW_TOKENS, step=8, label="Max new tokens")
                temperature = gr.Slider(0.0, 2.0, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature")
                adapter = gr.Dropdown(adapter_choices(settings), value="none", label="LoRA adapter",
                                      allow_custom_value=True)
            with gr.Accordion("Voice", open=False):
                speaker = gr.Dropdown(["default"], value="default", label="Speaker", allow_custom_value=True)
                tts_language = gr.Dropdown(["default"], value="default", label="Voice language",
                                           allow_custom_value=True)
                reference = gr.Audio(sources=["upload"], type="filepath", label="Reference voice (XTTS cloning)")
                speed = gr.Slider(0.5, 2.0, value=1.0, step=0.05, label="Speed")
        with gr.Column(scale=1):
            transcript = gr.Textbox(label="Transcript", interactive=False, elem_id="voice-transcript")
            segments = gr.Textbox(label="Timestamps", interactive=False, lines=3)
            chatbot = gr.Chatbot(label="Conversation", height=320, elem_id="voice-chat")
            reply_audio = gr.Audio(label="Spoken reply", type="numpy", autoplay=True, interactive=False,
                                   elem_id="voice-reply-audio")
            timings = gr.Markdown(elem_id="voice-timings")
    history = gr.State([])

    turn_inputs = [audio_in, text_in, history, asr_model, language, task, timestamps, chat_model, system_prompt,
                   max_new_tokens, temperature, adapter, tts_model, speaker, tts_language, reference, speed]

    @gpu
    @user_errors
    def run_turn(*values, progress=gr.Progress()):
        for update in voice_turn(manager, settings, *values, progress=_progress_callback(progress)):
            yield (update.transcript, update.segments, update.history, update.audio,
                   f"{update.timings.markdown()}  \n*{update.stage}*", update.history)

    send.click(run_turn, inputs=turn_inputs, outputs=[transcript, segments, chatbot, reply_audio, timings, history],
               api_visibility="private", **GPU_QUEUE).success(
        lambda: (None, ""), outputs=[audio_in, text_in], api_visibility="private", queue=False)

    @gpu
    @user_errors
    def run_transcribe_only(audio, language, model, task, timestamps, progress=gr.Progress()):
        result, seconds = transcribe_file(manager, audio, language, model, task, timestamps,
                                          _progress_callback(progress))
        return (result.text, format_segments(result.segments),
                Timings(asr_seconds=seconds, audio_in_seconds=result.audio_seconds).markdown())

    transcribe_only.click(run_transcribe_only, inputs=[audio_in, language, asr_model, task, timestamps],
                          outputs=[transcript, segments, timings], api_visibility="private", **GPU_QUEUE)

    clear.click(lambda: ([], [], "", "", None, ""), outputs=[history, chatbot, transcript, segments, reply_audio,
                                                            timings], api_visibility="private", queue=False)

    @gpu
    @user_errors
    def refresh_voice(model):
        options = voice_options(manager, model)
        speakers, languages = ["default"] + options["speakers"], ["default"] + options["languages"]
        return (gr.update(choices=speakers, value="default", visible=len(speakers) > 1),
                gr.update(choices=languages, value="default", visible=len(languages) > 1),
                gr.update(visible=options["cloning"]))

    tts_model.change(refresh_voice, inputs=tts_model, outputs=[speaker, tts_language, reference],
                     api_visibility="private", **GPU_QUEUE)

    # ---- named API endpoints: hidden triggers whose inputs reuse the visible controls' defaults
    with gr.Group(visible=False):
        api_text = gr.Textbox(visible=False)
        api_history = gr.JSON([], visible=False)
        api_reply = gr.Textbox(visible=False)
        api_audio = gr.Audio(type="numpy", visible=False)
        api_timings = gr.JSON(visible=False)
        trigger = gr.Button(visible=False)

    @gpu
    @user_errors
    def transcribe(audio, language, model, task, timestamps, progress=gr.Progress()):
        """Transcribe an audio file (WAV, FLAC, MP3, OGG; up to 10 minutes); returns the text."""
        result, _ = transcribe_file(manager, audio, language, model, task, timestamps, _progress_callback(progress))
        return result.text

    trigger.click(transcribe, inputs=[audio_in, language, asr_model, task, timestamps], outputs=api_text,
                  api_name="transcribe", **GPU_QUEUE)

    @gpu
    @user_errors
    def chat(message, history, model, system_prompt, max_new_tokens, temperature, adapter):
        """Reply to ``message`` after ``history`` (messages format); streams, returns the reply."""
        yield from chat_reply(manager, settings, message, history, model, system_prompt, max_new_tokens,
                              temperature, adapter)

    trigger.click(chat, inputs=[text_in, api_history, chat_model, system_prompt, max_new_tokens, temperature,
                                adapter], outputs=api_reply, api_name="chat", **GPU_QUEUE)

    @gpu
    @user_errors
    def speak(text, model, speaker, language, reference=None, speed=1.0):
        """Speak ``text``; returns a WAV file at the model's sample rate."""
        audio, _ = speak_text(manager, text, model, speaker, language, reference, speed)
        return audio

    trigger.click(speak, inputs=[text_in, tts_model, speaker, tts_language, reference, speed], outputs=api_audio,
                  api_name="speak", **GPU_QUEUE)

    @gpu
    @user_errors
    def voice(audio=None, text="", history=None, asr_model=asr_default, language="auto", chat_model=chat_default,
              system_prompt=DEFAULT_SYSTEM_PROMPT, tts_model=tts_default, max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
              temperature=DEFAULT_TEMPERATURE):
        """One turn: audio (or text) -> transcript, reply, spoken reply (WAV) and stage timings."""
        final = last(voice_turn(manager, settings, audio, text, history, asr_model, language, "transcribe", "none",
                                chat_model, system_prompt, max_new_tokens, temperature, tts_model=tts_model))
        return final.transcript, final.reply, final.audio, final.timings.as_dict()

    trigger.click(voice, inputs=[audio_in, text_in, api_history, asr_model, language, chat_model, system_prompt,
                                 tts_model, max_new_tokens, temperature],
                  outputs=[api_text, api_reply, api_audio, api_timings],
                  api_name="voice", **GPU_QUEUE)


def format_segments(segments) -> str:
    from models.families.asr import format_segments as fmt

    return fmt(segments)
