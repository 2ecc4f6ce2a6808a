"""Voice assistant tab: speech (or typed text) -> transcript -> streamed reply -> spoken reply.

The logic is ``models.voice`` (no gradio); this module lays out the tab and wires its events.
The reply is spoken sentence by sentence while it is written: the first sentence plays as soon
as it is synthesized (a streamed audio output, which Gradio encodes with ffmpeg), and the whole
reply is also offered as one WAV at the end.
"""

from __future__ import annotations

import shutil

import gradio as gr

from models.families.asr import TIMESTAMPS as TIMESTAMP_CHOICES
from models.families.asr import format_segments
from models.voice import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_TEMPERATURE,
    LANGUAGE_CHOICES,
    MAX_NEW_TOKENS,
    Timings,
    Variation,
    chat_reply,
    last,
    speak_text,
    transcribe_file,
    voice_options,
    voice_turn,
)
from tabs.common import GPU_QUEUE, adapter_choices, default_model, gpu, model_choices, user_errors


def streaming_audio_available() -> bool:
    """Gradio encodes streamed audio with the ffmpeg binary; without it the whole reply plays at the end."""
    return shutil.which("ffmpeg") is not None


def _progress_callback(progress):
    if progress is None:
        return None
    return lambda fraction, description: progress(fraction, desc=description)


def build(manager, settings) -> None:
    asr_default = default_model(manager, settings, "speech-to-text")
    chat_default = default_model(manager, settings, "chat")
    tts_default = default_model(manager, settings, "text-to-speech")
    streaming = streaming_audio_available()

    # Custom values are allowed so that API callers get the catalog's message listing known models.
    with gr.Row():
        asr_model = gr.Dropdown(model_choices(manager, "speech-to-text"), value=asr_default, label="Speech model",
                                allow_custom_value=True, elem_id="voice-asr-model")
        chat_model = gr.Dropdown(model_choices(manager, "chat"), value=chat_default, label="Chat model",
                                 allow_custom_value=True, elem_id="voice-chat-model")
        tts_model = gr.Dropdown(model_choices(manager, "text-to-speech"), value=tts_default, label="Voice model",
                                allow_custom_value=True, elem_id="voice-tts-model")
    with gr.Row():
        with gr.Column(scale=1):
            audio_in = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Speak or upload audio")
            text_in = gr.Textbox("", label="…or type a message", lines=2, placeholder="What is the capital of France?")
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="voice-send")
                stop = gr.Button("Stop", elem_id="voice-stop")
                transcribe_only = gr.Button("Transcribe only")
                clear = gr.Button("Clear conversation", variant="stop")
            with gr.Accordion("Speech recognition", open=False):
                language = gr.Dropdown(LANGUAGE_CHOICES, value="auto", label="Language", allow_custom_value=True,
                                       info="or a Whisper language code; whisper-tiny.en knows only English")
                task = gr.Radio(["transcribe", "translate"], value="transcribe", label="Task",
                                info="translate: speech in any language to English text (multilingual models)")
                timestamps = gr.Radio(list(TIMESTAMP_CHOICES), value="none", label="Timestamps")
            with gr.Accordion("Reply", open=False):
                system_prompt = gr.Textbox(DEFAULT_SYSTEM_PROMPT, label="System prompt", lines=3)
                max_new_tokens = gr.Slider(8, MAX_NEW_TOKENS, value=DEFAULT_MAX_NEW_TOKENS, step=8,
                                           label="Max new tokens")
                temperature = gr.Slider(0.0, 2.0, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature")
                adapter = gr.Dropdown(adapter_choices(settings), value="none", label="LoRA adapter",
                                      allow_custom_value=True)
            with gr.Accordion("Voice", open=False):
                speaker = gr.Dropdown(["default"], value="default", label="Speaker", allow_custom_value=True)
                tts_language = gr.Dropdown(["default"], value="default", label="Voice language",
                                           allow_custom_value=True)
                reference = gr.Audio(sources=["upload"], type="filepath", label="Reference voice (XTTS cloning)")
                speed = gr.Slider(0.5, 2.0, value=1.0, step=0.05, label="Speed")
                noise_scale = gr.Slider(0.0, 1.5, value=0.667, step=0.01, label="Variation (noise scale, Piper)",
                                        info="higher: livelier, less stable intonation")
                noise_w = gr.Slider(0.0, 1.5, value=0.8, step=0.01, label="Rhythm variation (noise w, Piper)")
        with gr.Column(scale=1):
            transcript = gr.Textbox(label="Transcript", interactive=False, elem_id="voice-transcript")
            segments = gr.Textbox(label="Timestamps", interactive=False, lines=3)
            chatbot = gr.Chatbot(label="Conversation", height=320, elem_id="voice-chat")
            reply_stream = gr.Audio(label="Spoken reply (plays as it is spoken)", streaming=True, autoplay=True,
                                    interactive=False, visible=streaming, elem_id="voice-reply-stream")
            reply_audio = gr.Audio(label="Whole reply (WAV)", type="numpy", autoplay=not streaming,
                                   interactive=False, elem_id="voice-reply-audio")
            timings = gr.Markdown(elem_id="voice-timings")
    history = gr.State([])

    turn_inputs = [audio_in, text_in, history, asr_model, language, task, timestamps, chat_model, system_prompt,
                   max_new_tokens, temperature, adapter, tts_model, speaker, tts_language, reference, speed,
                   noise_scale, noise_w]

    @gpu
    @user_errors
    def run_turn(*values, progress=gr.Progress()):
        *values, noise, noise_width = values
        turn = voice_turn(manager, settings, *values, progress=_progress_callback(progress),
                          variation=Variation(noise, noise_width))
        for update in turn:
            chunk = update.audio_chunk if streaming else None
            yield (update.transcript, update.segments, update.history, chunk, update.audio,
                   f"{update.timings.markdown()}  \n*{update.stage}*", update.history)

    send_event = send.click(
        run_turn, inputs=turn_inputs,
        outputs=[transcript, segments, chatbot, reply_stream, reply_audio, timings, history],
        api_visibility="private", **GPU_QUEUE)
    send_event.success(lambda: (None, ""), outputs=[audio_in, text_in], api_visibility="private", queue=False)
    stop.click(None, cancels=[send_event], api_visibility="private", queue=False)

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
        piper = options["family"] == "piper"
        return (gr.update(choices=speakers, value="default", visible=len(speakers) > 1),
                gr.update(choices=languages, value="default", visible=len(languages) > 1),
                gr.update(visible=options["cloning"]), gr.update(visible=piper), gr.update(visible=piper))

    tts_model.change(refresh_voice, inputs=tts_model, outputs=[speaker, tts_language, reference, noise_scale, noise_w],
                     api_visibility="private", **GPU_QUEUE)

    _build_api(manager, settings, audio_in, text_in, language, asr_model, task, timestamps, chat_model,
               system_prompt, max_new_tokens, temperature, adapter, tts_model, speaker, tts_language, reference, speed,
               (asr_default, chat_default, tts_default))


def _build_api(manager, settings, audio_in, text_in, language, asr_model, task, timestamps, chat_model,
               system_prompt, max_new_tokens, temperature, adapter, tts_model, speaker, tts_language, reference,
               speed, defaults) -> None:
    """Named API endpoints: hidden triggers whose inputs reuse the visible controls' defaults."""
    asr_default, chat_default, tts_default = defaults
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
