"""Image VQA tab: ask questions about an image, in a multi-turn chat, with streamed answers.

The logic is ``models.vqa`` (no gradio); this module lays out the tab (``_layout``) and wires its
events (``_wire_chat``, ``_wire_controls``, ``_wire_api``).
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import gradio as gr

from models.errors import InvalidRequest
from models.generation import MAX_NEW_TOKENS
from models.voice import SpeakRequest, speak_text
from models.vqa import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    NONE,
    TASK,
    VqaRequest,
    adapters_for,
    chat_turn,
    example_pairs,
    precision_line,
)
from tabs.common import (
    GPU_QUEUE,
    Form,
    StopRegistry,
    checked_image,
    default_model,
    model_call,
    model_choices,
    progress_callback,
    refresh_model_menus,
    session_of,
)


def build(manager, settings, tab=None) -> SimpleNamespace:
    ui = _layout(manager, settings)
    _wire_chat(manager, settings, ui)
    _wire_controls(manager, settings, ui, tab)
    _wire_api(manager, settings, ui)
    return ui


def _layout(manager, settings) -> SimpleNamespace:
    """The tab's components, by name."""
    ui = SimpleNamespace()
    model_default = default_model(manager, settings, TASK)
    with gr.Row():
        with gr.Column(scale=2):
            ui.image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard", "webcam"],
                                height=300, elem_id="vqa-image")
            ui.model = gr.Dropdown(choices=model_choices(manager, TASK), value=model_default, label="Model",
                                   elem_id="vqa-model")
            ui.precision = gr.Markdown(precision_line(manager, settings, model_default), elem_id="vqa-precision")
            with gr.Row():
                ui.adapter = gr.Dropdown(choices=adapters_for(settings, model_default), value=NONE,
                                         label="Adapter (LoRA)", scale=4, elem_id="vqa-adapter")
                ui.refresh_adapters = gr.Button("↻ Refresh", scale=1, min_width=40, elem_id="vqa-refresh-adapters")
            ui.compare = gr.Checkbox(False, label="Compare: show base and adapter answers side by side",
                                     elem_id="vqa-compare")
            with gr.Accordion("Generation settings", open=False):
                ui.system_prompt = gr.Textbox(label="System prompt (optional)", lines=2)
                ui.max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=DEFAULT_MAX_NEW_TOKENS, step=1,
                                              label="Max new tokens", elem_id="vqa-max-new-tokens")
                ui.temperature = gr.Slider(0.0, 2.0, value=DEFAULT_TEMPERATURE, step=0.05,
                                           label="Temperature (0 = greedy)", elem_id="vqa-temperature")
                ui.top_p = gr.Slider(0.05, 1.0, value=DEFAULT_TOP_P, step=0.05, label="Top-p")
        with gr.Column(scale=3):
            with gr.Row():
                ui.base_chat = gr.Chatbot(label="Base model", visible=False, height=420, elem_id="vqa-base-chat")
                ui.chat = gr.Chatbot(label="Answer", height=420, elem_id="vqa-chat")
            # lines=1 (growing to 6): Enter asks, Shift+Enter adds a line
            ui.question = gr.Textbox(label="Question", placeholder="Ask something about the image...", lines=1,
                                     max_lines=6, info="Enter asks · Shift+Enter adds a line", elem_id="vqa-question")
            with gr.Row():
                ui.ask = gr.Button("Ask", variant="primary", elem_id="vqa-ask")
                ui.stop = gr.Button("Stop", variant="stop", elem_id="vqa-stop")
                ui.clear = gr.Button("New conversation", elem_id="vqa-clear")
            ui.notices = gr.Markdown(elem_id="vqa-notices")
            with gr.Row(equal_height=True):
                ui.voice = gr.Dropdown(model_choices(manager, "text-to-speech"), label="Voice", scale=3,
                                       value=default_model(manager, settings, "text-to-speech"), elem_id="vqa-voice")
                ui.speak = gr.Button("Speak the answer", scale=2, elem_id="vqa-speak")
            ui.spoken = gr.Audio(label="Spoken answer", type="numpy", autoplay=True, interactive=False, visible=False,
                                 elem_id="vqa-spoken")
    gr.Examples(example_pairs(settings), inputs=[ui.image, ui.question], label="Examples (images drawn by the app)")
    ui.image_path = checked_image(ui.image, settings)  # what the handlers read: the picture, checked on change
    ui.history = gr.State([])
    ui.base_history = gr.State([])
    return ui


def _wire_chat(manager, settings, ui: SimpleNamespace) -> None:
    """Ask (streamed, with compare), Stop and New conversation."""
    form = Form(image=ui.image_path, question=ui.question, history=ui.history, base_history=ui.base_history,
                model=ui.model, max_new_tokens=ui.max_new_tokens, temperature=ui.temperature, top_p=ui.top_p,
                system_prompt=ui.system_prompt, adapter=ui.adapter, compare=ui.compare)
    stops = StopRegistry()

    @model_call(manager)
    def stream(data, request: gr.Request = None, progress=gr.Progress()):
        ask = VqaRequest.build(manager.catalog, settings, **form.values(data))
        session = session_of(request)
        stop = stops.start(session)
        try:
            for main, base, notes in chat_turn(manager, ask, stop=stop, progress=progress_callback(progress)):
                yield main, base, main, base, "\n".join(f"- {note}" for note in notes)
        finally:
            stops.finish(session, stop)

    def request_stop(request: gr.Request = None):
        if stops.stop(session_of(request)):
            gr.Info("Stopped: the answer so far is kept.")
        else:
            gr.Info("Nothing is running.")

    def new_conversation():
        return [], [], [], [], ""

    conversation = [ui.chat, ui.base_chat, ui.history, ui.base_history, ui.notices]
    ask_event = gr.on([ui.ask.click, ui.question.submit], stream, inputs=form.inputs, outputs=conversation,
                      api_visibility="private", **GPU_QUEUE)
    # Only a finished answer clears the question: after Stop or an error, what the user typed stays
    ask_event.success(lambda: "", outputs=ui.question, api_visibility="private", queue=False)
    ask_event.then(lambda mid: precision_line(manager, settings, mid), inputs=ui.model, outputs=ui.precision,
                   api_visibility="private", queue=False)
    # Stop does not wait behind the run it interrupts: it sets the run's flag (the answer ends at its next
    # token and keeps what it has), in the queue without a limit (so that its pop-up reaches the page)
    ui.stop.click(request_stop, api_visibility="private", concurrency_limit=None)
    ui.image.change(new_conversation, outputs=conversation, api_visibility="private", queue=False)
    ui.clear.click(new_conversation, outputs=conversation, api_visibility="private", queue=False)

    @model_call(manager)
    def speak_answer(history, voice, progress=gr.Progress()):
        """The last answer, spoken by the chosen voice (a text-to-speech model of the catalog)."""
        answers = [turn["content"] for turn in history or [] if turn.get("role") == "assistant" and turn.get("content")]
        if not answers:
            raise InvalidRequest("There is no answer to speak yet: ask a question about the image first.")
        request = SpeakRequest.build(manager.catalog, settings, text=_plain(answers[-1]), model=voice)
        audio, _ = speak_text(manager, request, progress=progress_callback(progress))
        return gr.update(value=audio, visible=True)

    ui.speak.click(speak_answer, inputs=[ui.history, ui.voice], outputs=ui.spoken, api_visibility="private",
                   **GPU_QUEUE)


def _plain(answer) -> str:
    """An answer's text without the Markdown a chat shows (a voice would read the asterisks)."""
    text = answer if isinstance(answer, str) else " ".join(str(part.get("text", "")) for part in answer
                                                           if isinstance(part, dict))
    return re.sub(r"[*_`#>]+", "", text).strip()


def _wire_controls(manager, settings, ui: SimpleNamespace, tab=None) -> None:
    """Model, adapter and compare: the precision line, the adapter list and the compare layout."""
    def on_compare(compare_on, adapter_name):
        label = f"With adapter {adapter_name}" if compare_on and adapter_name != NONE else "Answer"
        return gr.update(visible=bool(compare_on)), gr.update(label=label)

    def on_model(mid, adapter_name):
        names = adapters_for(settings, mid)
        return precision_line(manager, settings, mid), gr.update(
            choices=names, value=adapter_name if adapter_name in names else NONE)

    ui.model.change(on_model, inputs=[ui.model, ui.adapter], outputs=[ui.precision, ui.adapter],
                    api_visibility="private", queue=False)
    for control in (ui.compare, ui.adapter):
        control.change(on_compare, inputs=[ui.compare, ui.adapter], outputs=[ui.base_chat, ui.chat],
                       api_visibility="private", queue=False)
    def current_adapters(mid, chosen):
        """The adapters trained on the model, read from disk: a run that just finished is listed."""
        names = adapters_for(settings, mid)
        return gr.update(choices=names, value=chosen if chosen in names else NONE)

    triggers = [ui.refresh_adapters.click] + ([tab.select] if tab is not None else [])
    gr.on(triggers, current_adapters, inputs=[ui.model, ui.adapter], outputs=ui.adapter, api_visibility="private",
          queue=False)
    refresh_model_menus(manager, tab, {ui.model: TASK, ui.voice: "text-to-speech"})


def _wire_api(manager, settings, ui: SimpleNamespace) -> None:
    """The /vqa endpoint: plain inputs, the final answer (the UI streams through its own event)."""
    with gr.Group(visible=False):
        inputs = [gr.File(type="filepath", label="image"), gr.Textbox(label="question"),
                  gr.Textbox(value=ui.model.value, label="model"),
                  gr.Number(value=DEFAULT_MAX_NEW_TOKENS, label="max_new_tokens"),
                  gr.Number(value=DEFAULT_TEMPERATURE, label="temperature"), gr.Textbox(value=NONE, label="adapter"),
                  gr.Number(value=DEFAULT_TOP_P, label="top_p"), gr.Textbox(value="", label="system_prompt")]
        answer = gr.Textbox(label="answer")
        button = gr.Button("vqa")

    @model_call(manager)
    def vqa(image, question, model, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=DEFAULT_TEMPERATURE,
            adapter=NONE, top_p=DEFAULT_TOP_P, system_prompt=""):
        """Answer one question about an image file; streams, returns the whole answer text."""
        request = VqaRequest.build(manager.catalog, settings, image=image, question=question, model=model,
                                   max_new_tokens=max_new_tokens, temperature=temperature, adapter=adapter,
                                   top_p=top_p, system_prompt=system_prompt)
        # A generator, so that a client that goes away ends generation at the next token
        for history, _, _ in chat_turn(manager, request):
            yield history[-1]["content"]

    button.click(vqa, inputs=inputs, outputs=answer, api_name="vqa", **GPU_QUEUE)
