"""Image VQA tab: ask questions about an image, in a multi-turn chat, with streamed answers.

The logic is ``models.vqa`` (no gradio); this module lays out the tab (``_layout``) and wires its
events (``_wire_chat``, ``_wire_controls``, ``_wire_api``).
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from models.generation import MAX_NEW_TOKENS
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
from tabs.common import GPU_QUEUE, Form, default_model, model_call, model_choices


def build(manager, settings) -> None:
    ui = _layout(manager, settings)
    _wire_chat(manager, settings, ui)
    _wire_controls(manager, settings, ui)
    _wire_api(manager, settings, ui)


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
                ui.refresh_adapters = gr.Button("↻", scale=1, min_width=40, elem_id="vqa-refresh-adapters")
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
            ui.question = gr.Textbox(label="Question", placeholder="Ask something about the image...", lines=2,
                                     elem_id="vqa-question")
            with gr.Row():
                ui.ask = gr.Button("Ask", variant="primary", elem_id="vqa-ask")
                ui.stop = gr.Button("Stop", variant="stop", elem_id="vqa-stop")
                ui.clear = gr.Button("New conversation", elem_id="vqa-clear")
            ui.notices = gr.Markdown(elem_id="vqa-notices")
    gr.Examples(example_pairs(settings), inputs=[ui.image, ui.question], label="Examples (images drawn by the app)")
    ui.history = gr.State([])
    ui.base_history = gr.State([])
    return ui


def _progress_callback(progress):
    return lambda fraction, description: progress(fraction, desc=description)


def _wire_chat(manager, settings, ui: SimpleNamespace) -> None:
    """Ask (streamed, with compare), Stop and New conversation."""
    form = Form(image=ui.image, question=ui.question, history=ui.history, base_history=ui.base_history,
                model=ui.model, max_new_tokens=ui.max_new_tokens, temperature=ui.temperature, top_p=ui.top_p,
                system_prompt=ui.system_prompt, adapter=ui.adapter, compare=ui.compare)

    @model_call(manager)
    def stream(data, progress=gr.Progress()):
        request = VqaRequest.build(manager.catalog, settings, **form.values(data))
        for main, base, notes in chat_turn(manager, request, progress=_progress_callback(progress)):
            yield main, base, main, base, "\n".join(f"- {note}" for note in notes)

    def new_conversation():
        return [], [], [], [], ""

    conversation = [ui.chat, ui.base_chat, ui.history, ui.base_history, ui.notices]
    ask_event = gr.on([ui.ask.click, ui.question.submit], stream, inputs=form.inputs, outputs=conversation,
                      api_visibility="private", **GPU_QUEUE)
    ask_event.then(lambda mid: ("", precision_line(manager, settings, mid)), inputs=ui.model,
                   outputs=[ui.question, ui.precision], api_visibility="private", queue=False)
    ui.stop.click(None, cancels=[ask_event], api_visibility="private", queue=False)
    ui.image.change(new_conversation, outputs=conversation, api_visibility="private", queue=False)
    ui.clear.click(new_conversation, outputs=conversation, api_visibility="private", queue=False)


def _wire_controls(manager, settings, ui: SimpleNamespace) -> None:
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
    ui.refresh_adapters.click(lambda mid: gr.update(choices=adapters_for(settings, mid)), inputs=ui.model,
                              outputs=ui.adapter, api_visibility="private", queue=False)


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
