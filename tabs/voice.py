"""Voice assistant tab: speech (or typed text) -> transcript -> streamed reply -> spoken reply.

The logic is ``models.voice`` (no gradio); this module lays out the tab (``_layout``) and wires its
events (``_wire_turn``, ``_wire_tools``, ``_wire_api``). The reply is spoken sentence by sentence
while it is written: the first sentence plays as soon as it is synthesized (a streamed audio
output, which Gradio encodes with ffmpeg), and the whole reply is also offered as one WAV.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import gradio as gr

from models.families.asr import LANGUAGES, TIMESTAMPS, format_segments
from models.generation import MAX_NEW_TOKENS
from models.voice import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_TEMPERATURE,
    ChatRequest,
    SpeakRequest,
    Timings,
    TranscribeRequest,
    VoiceTurnRequest,
    chat_reply,
    last,
    speak_text,
    transcribe_file,
    voice_options,
    voice_turn,
)
from models.vqa import adapters_for
from tabs.common import (
    GPU_QUEUE,
    Form,
    StopRegistry,
    checked_image,
    default_model,
    inputs_for,
    model_call,
    model_choices,
    progress_callback,
    refresh_model_menus,
    session_of,
)

LANGUAGE_CHOICES = ["auto", *LANGUAGES]
STAGE_WORDS = {"transcribing": "Transcribing…", "replying": "Replying (spoken as it is written)…",
               "speaking": "Speaking the rest…"}


def streaming_audio_available() -> bool:
    """Gradio encodes streamed audio with the ffmpeg binary; without it the whole reply plays at the end."""
    return shutil.which("ffmpeg") is not None


def build(manager, settings, tab=None) -> SimpleNamespace:
    ui = _layout(manager, settings)
    _wire_turn(manager, settings, ui)
    _wire_compare(manager, settings, ui)
    _wire_tools(manager, settings, ui, tab)
    _wire_api(manager, settings, ui)
    return ui


def _layout(manager, settings) -> SimpleNamespace:
    """The tab's components, by name."""
    ui = SimpleNamespace(streaming=streaming_audio_available(), vqa_choices=model_choices(manager, "vqa"),
                         vqa_default=default_model(manager, settings, "vqa"))
    # Custom values are allowed so that API callers get the catalog's message listing known models.
    with gr.Row():
        ui.asr_model = gr.Dropdown(model_choices(manager, "speech-to-text"), label="Speech model",
                                   value=default_model(manager, settings, "speech-to-text"),
                                   allow_custom_value=True, elem_id="voice-asr-model")
        ui.chat_model = gr.Dropdown(model_choices(manager, "chat"), value=default_model(manager, settings, "chat"),
                                    label="Chat model", allow_custom_value=True, elem_id="voice-chat-model")
        ui.tts_model = gr.Dropdown(model_choices(manager, "text-to-speech"), label="Voice model",
                                   value=default_model(manager, settings, "text-to-speech"),
                                   allow_custom_value=True, elem_id="voice-tts-model")
    with gr.Row():
        with gr.Column(scale=1):
            _layout_inputs(ui, settings)
        with gr.Column(scale=1):
            ui.transcript = gr.Textbox(label="Transcript", interactive=False, elem_id="voice-transcript")
            ui.segments = gr.Textbox(label="Timestamps", interactive=False, lines=3)
            with gr.Row():
                ui.base_chat = gr.Chatbot(label="Base model (compare; not spoken)", height=320, visible=False,
                                          elem_id="voice-base-chat")
                ui.chatbot = gr.Chatbot(label="Conversation", height=320, elem_id="voice-chat")
            ui.reply_stream = gr.Audio(label="Spoken reply (plays as it is spoken)", streaming=True, autoplay=True,
                                       interactive=False, visible=ui.streaming, elem_id="voice-reply-stream")
            ui.reply_audio = gr.Audio(label="Whole reply (WAV)", type="numpy", autoplay=not ui.streaming,
                                      interactive=False, elem_id="voice-reply-audio")
            ui.timings = gr.Markdown(elem_id="voice-timings")
    ui.history = gr.State([])
    ui.base_history = gr.State([])
    ui.image_path = checked_image(ui.image, settings)  # what the handlers read: the picture, checked on change
    return ui


def _layout_inputs(ui: SimpleNamespace, settings) -> None:
    ui.audio_in = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Speak or upload audio")
    with gr.Accordion("Ask about an image (optional)", open=False):
        ui.image = gr.Image(label="Image: the question goes to the VQA model with it", type="filepath",
                            sources=["upload", "clipboard", "webcam"], height=200, elem_id="voice-image")
        ui.vqa_model = gr.Dropdown(ui.vqa_choices, value=ui.vqa_default, label="VQA model", allow_custom_value=True,
                                   elem_id="voice-vqa-model")
    # lines=1 (growing to 6): Enter sends, Shift+Enter adds a line
    ui.text_in = gr.Textbox("", label="…or type a message", lines=1, max_lines=6, elem_id="voice-text",
                            placeholder="What is the capital of France?", info="Enter sends · Shift+Enter adds a line")
    with gr.Row():
        ui.send = gr.Button("Send", variant="primary", elem_id="voice-send")
        ui.stop = gr.Button("Stop", elem_id="voice-stop")
        ui.transcribe_only = gr.Button("Transcribe only")
        ui.clear = gr.Button("Clear conversation", variant="stop")
    with gr.Accordion("Speech recognition", open=False):
        ui.language = gr.Dropdown(LANGUAGE_CHOICES, value="auto", label="Language", allow_custom_value=True,
                                  info="or a Whisper language code; whisper-tiny.en knows only English")
        ui.task = gr.Radio(["transcribe", "translate"], value="transcribe", label="Task",
                           info="translate: speech in any language to English text (multilingual models)")
        ui.timestamps = gr.Radio(list(TIMESTAMPS), value="none", label="Timestamps")
    with gr.Accordion("Reply", open=False):
        ui.system_prompt = gr.Textbox(DEFAULT_SYSTEM_PROMPT, label="System prompt", lines=3)
        ui.max_new_tokens = gr.Slider(8, MAX_NEW_TOKENS, value=DEFAULT_MAX_NEW_TOKENS, step=8, label="Max new tokens")
        ui.temperature = gr.Slider(0.0, 2.0, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature")
        ui.adapter = gr.Dropdown(adapters_for(settings, ui.chat_model.value), value="none", allow_custom_value=True,
                                 label="LoRA adapter (trained on the chat model)", elem_id="voice-adapter")
        ui.compare = gr.Checkbox(False, label="Compare: also show the base model's reply (not spoken)",
                                 elem_id="voice-compare")
    with gr.Accordion("Voice", open=False):
        ui.speaker = gr.Dropdown(["default"], value="default", label="Speaker", allow_custom_value=True)
        ui.tts_language = gr.Dropdown(["default"], value="default", label="Voice language", allow_custom_value=True)
        ui.reference = gr.Audio(sources=["upload"], type="filepath", label="Reference voice (XTTS cloning)")
        ui.speed = gr.Slider(0.5, 2.0, value=1.0, step=0.05, label="Speed")
        ui.noise_scale = gr.Slider(0.0, 1.5, value=0.667, step=0.01, label="Variation (noise scale, Piper)",
                                   info="higher: livelier, less stable intonation")
        ui.noise_w = gr.Slider(0.0, 1.5, value=0.8, step=0.01, label="Rhythm variation (noise w, Piper)")


def _wire_turn(manager, settings, ui: SimpleNamespace) -> None:
    """Send (a whole turn, spoken as it is written), Stop and Clear."""
    form = Form(audio=ui.audio_in, text=ui.text_in, history=ui.history, asr_model=ui.asr_model,
                language=ui.language, task=ui.task, timestamps=ui.timestamps, chat_model=ui.chat_model,
                system_prompt=ui.system_prompt, max_new_tokens=ui.max_new_tokens, temperature=ui.temperature,
                adapter=ui.adapter, tts_model=ui.tts_model, speaker=ui.speaker, tts_language=ui.tts_language,
                reference=ui.reference, speed=ui.speed, noise_scale=ui.noise_scale, noise_w=ui.noise_w,
                image=ui.image_path, vqa_model=ui.vqa_model)

    running = StopRegistry()

    @model_call(manager)
    def run_turn(data, request: gr.Request = None, progress=gr.Progress()):
        turn = VoiceTurnRequest.build(manager.catalog, settings, **form.values(data))
        session = session_of(request)
        flag = running.start(session)
        try:
            for update in voice_turn(manager, settings, turn, progress=progress_callback(progress)):
                chunk = update.audio_chunk if ui.streaming else None
                lines = [update.timings.markdown(), f"*{STAGE_WORDS.get(update.stage, update.stage)}*",
                         *(f"*{note}*" for note in update.notices)]
                yield (update.transcript, update.segments, update.history, chunk, update.audio,
                       "  \n".join(line for line in lines if line), update.history)
        finally:
            running.finish(session, flag)

    def say_stopped(request: gr.Request = None):
        gr.Info("Stopped: the reply and its speech end here." if running.stop(session_of(request))
                else "Nothing is running.")

    send_event = gr.on(
        [ui.send.click, ui.text_in.submit], run_turn, inputs=form.inputs,
        outputs=[ui.transcript, ui.segments, ui.chatbot, ui.reply_stream, ui.reply_audio, ui.timings, ui.history],
        api_visibility="private", **GPU_QUEUE)
    ui.turn_done = send_event.success(lambda: (None, ""), outputs=[ui.audio_in, ui.text_in], api_visibility="private",
                                      queue=False)
    ui.stop.click(say_stopped, cancels=[send_event], api_visibility="private", concurrency_limit=None)
    ui.clear.click(lambda: ([], [], "", "", None, "", [], []),
                   outputs=[ui.history, ui.chatbot, ui.transcript, ui.segments, ui.reply_audio, ui.timings,
                            ui.base_history, ui.base_chat], api_visibility="private", queue=False)


def _wire_compare(manager, settings, ui: SimpleNamespace) -> None:
    """Compare: after each turn with an adapter, the base chat model answers the same message, shown beside."""
    form = Form(history=ui.history, base_history=ui.base_history, model=ui.chat_model, system_prompt=ui.system_prompt,
                max_new_tokens=ui.max_new_tokens, temperature=ui.temperature, compare=ui.compare, adapter=ui.adapter)

    @model_call(manager)
    def base_reply(data):
        values = form.values(data)
        history, earlier = values["history"] or [], values["base_history"] or []
        if not values["compare"] or values["adapter"] in (None, "", "none") or len(history) < 2:
            return
        message = history[-2]["content"]
        request = ChatRequest.build(manager.catalog, settings, message=message, history=earlier,
                                    model=values["model"], system_prompt=values["system_prompt"],
                                    max_new_tokens=values["max_new_tokens"], temperature=values["temperature"])
        for text in chat_reply(manager, request):
            turn = [*earlier, {"role": "user", "content": message}, {"role": "assistant", "content": text}]
            yield turn, turn

    ui.turn_done.then(base_reply, inputs=form.inputs, outputs=[ui.base_chat, ui.base_history],
                      api_visibility="private", **GPU_QUEUE)
    ui.compare.change(lambda on: gr.update(visible=bool(on)), inputs=ui.compare, outputs=ui.base_chat,
                      api_visibility="private", queue=False)


def _wire_tools(manager, settings, ui: SimpleNamespace, tab=None) -> None:
    """Transcribe only, the voice's own options when the voice model changes, and current adapter menus."""
    form = Form(audio=ui.audio_in, language=ui.language, model=ui.asr_model, task=ui.task, timestamps=ui.timestamps)

    @model_call(manager)
    def run_transcribe_only(data, progress=gr.Progress()):
        request = TranscribeRequest.build(manager.catalog, settings, **form.values(data))
        result, seconds = transcribe_file(manager, settings, request, progress_callback(progress))
        return (result.text, format_segments(result.segments),
                Timings(asr_seconds=seconds, audio_in_seconds=result.audio_seconds).markdown())

    ui.transcribe_only.click(run_transcribe_only, inputs=form.inputs, outputs=[ui.transcript, ui.segments, ui.timings],
                             api_visibility="private", **GPU_QUEUE)

    @model_call(manager)
    def refresh_voice(model):
        options = voice_options(manager, model)
        speakers, languages = ["default"] + options["speakers"], ["default"] + options["languages"]
        piper = options["family"] == "piper"
        return (gr.update(choices=speakers, value="default", visible=len(speakers) > 1),
                gr.update(choices=languages, value="default", visible=len(languages) > 1),
                gr.update(visible=options["cloning"]), gr.update(visible=piper), gr.update(visible=piper))

    ui.tts_model.change(refresh_voice, inputs=ui.tts_model,
                        outputs=[ui.speaker, ui.tts_language, ui.reference, ui.noise_scale, ui.noise_w],
                        api_visibility="private", **GPU_QUEUE)

    def current_adapters(model, chosen):
        """The adapters trained on the chat model, read from disk: a run that just finished is listed."""
        names = adapters_for(settings, model)
        return gr.update(choices=names, value=chosen if chosen in names else "none")

    triggers = [ui.chat_model.change] + ([tab.select] if tab is not None else [])
    gr.on(triggers, current_adapters, inputs=[ui.chat_model, ui.adapter], outputs=ui.adapter,
          api_visibility="private", queue=False)
    refresh_model_menus(manager, tab, {ui.asr_model: "speech-to-text", ui.chat_model: "chat",
                                       ui.tts_model: "text-to-speech", ui.vqa_model: "vqa"})


def _wire_api(manager, settings, ui: SimpleNamespace) -> None:
    """Named API endpoints: hidden triggers whose inputs reuse the visible controls' defaults.

    Each handler's parameter names are the API's; they go to a request's ``build`` by keyword.
    """
    with gr.Group(visible=False):
        api_history = gr.JSON([], visible=False)
        api_text, api_reply = gr.Textbox(visible=False), gr.Textbox(visible=False)
        api_audio = gr.Audio(type="numpy", visible=False)
        api_timings = gr.JSON(visible=False)
        trigger = gr.Button(visible=False)
        api_image = gr.File(type="filepath", visible=False, label="image")  # an upload, checked by the request
    catalog = manager.catalog

    @model_call(manager)
    def transcribe(audio, language, model, task, timestamps, progress=gr.Progress()):
        """Transcribe an audio file (WAV, FLAC, MP3, OGG; up to 10 minutes); returns the text."""
        request = TranscribeRequest.build(catalog, settings, audio=audio, language=language, model=model, task=task,
                                          timestamps=timestamps)
        return transcribe_file(manager, settings, request, progress_callback(progress))[0].text

    @model_call(manager)
    def chat(message, history, model, system_prompt, max_new_tokens, temperature, adapter):
        """Reply to ``message`` after ``history`` (messages format); streams, returns the reply."""
        yield from chat_reply(manager, ChatRequest.build(
            catalog, settings, message=message, history=history, model=model, system_prompt=system_prompt,
            max_new_tokens=max_new_tokens, temperature=temperature, adapter=adapter))

    @model_call(manager)
    def speak(text, model, speaker, language, reference=None, speed=1.0):
        """Speak ``text``; returns a WAV file at the model's sample rate."""
        return speak_text(manager, SpeakRequest.build(catalog, settings, text=text, model=model, speaker=speaker,
                                                      language=language, reference=reference, speed=speed))[0]

    @model_call(manager)
    def voice(audio=None, text="", history=None, asr_model=ui.asr_model.value, language="auto",
              chat_model=ui.chat_model.value, system_prompt=DEFAULT_SYSTEM_PROMPT, tts_model=ui.tts_model.value,
              max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=DEFAULT_TEMPERATURE, image=None,
              vqa_model=ui.vqa_default):
        """One turn: audio (or text) -> transcript, reply, spoken reply (WAV) and stage timings.

        With an ``image``, the question goes to ``vqa_model`` with it, and its answer is spoken.
        """
        request = VoiceTurnRequest.build(
            catalog, settings, audio=audio, text=text, history=history, asr_model=asr_model, language=language,
            chat_model=chat_model, system_prompt=system_prompt, tts_model=tts_model, max_new_tokens=max_new_tokens,
            temperature=temperature, image=image, vqa_model=vqa_model)
        final = last(voice_turn(manager, settings, request))
        return final.transcript, final.reply, final.audio, final.timings.as_dict()

    # Each endpoint's parameters find their components by name (inputs_for), so none can be swapped.
    trigger.click(transcribe, inputs=inputs_for(transcribe, ui, audio=ui.audio_in, model=ui.asr_model),
                  outputs=api_text, api_name="transcribe", **GPU_QUEUE)
    trigger.click(chat, inputs=inputs_for(chat, ui, message=ui.text_in, history=api_history, model=ui.chat_model),
                  outputs=api_reply, api_name="chat", **GPU_QUEUE)
    trigger.click(speak, inputs=inputs_for(speak, ui, text=ui.text_in, model=ui.tts_model, language=ui.tts_language),
                  outputs=api_audio, api_name="speak", **GPU_QUEUE)
    trigger.click(voice, inputs=inputs_for(voice, ui, audio=ui.audio_in, text=ui.text_in, history=api_history,
                                           image=api_image),
                  outputs=[api_text, api_reply, api_audio, api_timings], api_name="voice", **GPU_QUEUE)
