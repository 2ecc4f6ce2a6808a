"""Image VQA tab: ask questions about an image, in a multi-turn chat, with streamed answers.

The plain functions (``answer_once``, ``chat_turn``, ``precision_line``...) hold the logic and are
what the tests and the bench call; ``build`` only lays out components and wires events to them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import gradio as gr

from models.checks import check_number
from models.errors import InvalidRequest
from tabs.common import GPU_QUEUE, default_model, gpu, model_choices, user_errors

log = logging.getLogger(__name__)

TASK = "vqa"
NONE = "none"
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.9
UI_MAX_NEW_TOKENS = 1024
MAX_QUESTION_CHARS = 4000


# ---- plain functions (tested directly) ---------------------------------------------------------

def check_request(manager, model: str, max_new_tokens, temperature, top_p=DEFAULT_TOP_P):
    """Validate the model id and sampling numbers (they may come from the API); returns GenerationParams."""
    from models.generation import GenerationParams

    if model not in manager.catalog:
        raise InvalidRequest(f"Unknown model {model!r}. Image VQA models: {', '.join(manager.catalog.ids(TASK))}")
    spec = manager.catalog.get(model)
    if spec.task != TASK:
        raise InvalidRequest(f"{model} is a {spec.task} model; choose one of: {', '.join(manager.catalog.ids(TASK))}")
    max_new_tokens = check_number("max_new_tokens", max_new_tokens, 1, GenerationParams.MAX_NEW_TOKENS, integer=True)
    temperature = check_number("temperature", temperature, 0.0, 2.0)
    top_p = check_number("top_p", top_p, 0.0, 1.0)
    return GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)


def check_question_text(question) -> str:
    if not isinstance(question, str) or not question.strip():
        raise InvalidRequest("Type a question about the image first.")
    if len(question) > MAX_QUESTION_CHARS:
        raise InvalidRequest(f"The question is {len(question)} characters; the limit is {MAX_QUESTION_CHARS}. "
                         "Shorten it.")
    return question.strip()


def open_image(image_path):
    """The uploaded file as an RGB image plus notices; a clear ValueError for anything unusable."""
    from models.images import load_image

    if image_path is None or image_path == "":
        raise InvalidRequest("Upload, paste or capture an image first.")
    return load_image(image_path)


def adapters_for(settings, model: str) -> list[str]:
    """'none' plus the saved adapters trained on ``model`` (or with no recorded base)."""
    from models.adapters import list_adapters

    return [NONE] + list_adapters(settings.adapters_dir, base_model=model)


def adapter_folder(settings, adapter, model: str):
    from models.adapters import resolve

    return resolve(settings.adapters_dir, adapter or NONE, model)


def answer_once(manager, settings, image, question: str, model: str, max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
                temperature=DEFAULT_TEMPERATURE, adapter: str = NONE, top_p=DEFAULT_TOP_P,
                system_prompt: str = "") -> str:
    """The whole answer to one question about ``image`` (a file path or PIL image): the /vqa endpoint."""
    from models.families import vlm

    # 1. Check every input before loading anything, so bad requests cost nothing.
    params = check_request(manager, model, max_new_tokens, temperature, top_p)
    question = check_question_text(question)
    picture, notices = open_image(image)
    folder = adapter_folder(settings, adapter, model)
    if notices:
        log.info("vqa image notices: %s", "; ".join(notices))
    # 2. Run the model, pinned for exactly this call.
    with manager.use(model) as handle:
        return vlm.answer_text(handle, picture, question, params, system_prompt=system_prompt or "",
                               adapter_folder=folder)


def precision_line(manager, settings, model: str) -> str:
    """'Precision on this device: ...' without importing torch (the device may still be 'auto')."""
    from models.quantization import choose

    if model not in manager.catalog:
        return ""
    spec = manager.catalog.get(model)
    loaded = {entry["id"]: entry for entry in manager.snapshot()}
    if model in loaded:
        entry = loaded[model]
        return f"Precision on this device: **{entry['precision']}** on {entry['device']} (loaded)"
    if settings.device in ("cpu", "cuda", "mps"):
        try:
            return f"Precision on this device: **{choose(spec, settings.device).name}** on {settings.device}"
        except ValueError as exc:
            return f"Precision on this device: not available ({exc})"
    return (f"Precision on this device: **{choose(spec, 'cpu').name}** on CPU / "
            f"**{choose(spec, 'cuda').name}** on CUDA")


def chat_turn(manager, settings, image_path, question, history, base_history, model, max_new_tokens, temperature,
              top_p, system_prompt, adapter, compare, stop: threading.Event | None = None) -> Iterator[tuple]:
    """Stream one turn of the conversation.

    Yields ``(history, base_history, notices)``: messages-format lists with the growing answer as the
    last assistant message. ``history`` is the conversation with the chosen adapter (or the base
    model); ``base_history`` is the base model's side of a compare, otherwise unchanged.
    """
    from models.families import vlm

    params = check_request(manager, model, max_new_tokens, temperature, top_p)
    question = check_question_text(question)
    picture, notices = open_image(image_path)
    folder = adapter_folder(settings, adapter, model)
    if compare and folder is None:
        raise InvalidRequest("Compare needs an adapter: choose one in 'Adapter' (or untick Compare).")
    history = vlm.check_history(list(history or []))
    base_history = vlm.check_history(list(base_history or [])) if compare else list(base_history or [])
    runs = ([("base", None, base_history)] if compare else []) + [("main", folder, history)]
    shown = {"main": history, "base": base_history}
    with manager.use(model) as handle:
        for side, run_folder, earlier in runs:
            turn = earlier + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
            shown[side] = turn
            yield shown["main"], shown["base"], notices
            for text in vlm.answer(handle, picture, question, params, history=earlier,
                                   system_prompt=system_prompt or "", adapter_folder=run_folder, stop=stop,
                                   notices=notices):
                turn[-1] = {"role": "assistant", "content": text}
                yield shown["main"], shown["base"], notices
            if stop is not None and stop.is_set():
                return


def example_pairs(settings) -> list[list[str]]:
    """[[image path, question], ...] drawn by the project into the cache (no downloads)."""
    from models.images import ensure_examples

    return [[path, question] for path, question in ensure_examples(settings.cache_dir / "examples")]


def vqa_endpoint(manager, settings):
    """The /vqa handler; its parameter names are the API's parameter names."""
    @gpu
    @user_errors
    def vqa(image, question, model, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=DEFAULT_TEMPERATURE,
            adapter=NONE, top_p=DEFAULT_TOP_P, system_prompt=""):
        """Answer one question about an image file; returns the whole answer text."""
        return answer_once(manager, settings, image, question, model, max_new_tokens, temperature, adapter, top_p,
                           system_prompt)
    return vqa


# ---- UI ----------------------------------------------------------------------------------------

def build(manager, settings) -> None:
    model_default = default_model(manager, settings, TASK)

    with gr.Row():
        with gr.Column(scale=2):
            image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard", "webcam"],
                             height=300, elem_id="vqa-image")
            model = gr.Dropdown(choices=model_choices(manager, TASK), value=model_default, label="Model",
                                elem_id="vqa-model")
            precision = gr.Markdown(precision_line(manager, settings, model_default), elem_id="vqa-precision")
            with gr.Row():
                adapter = gr.Dropdown(choices=adapters_for(settings, model_default), value=NONE, label="Adapter (LoRA)",
                                      scale=4, elem_id="vqa-adapter")
                refresh_adapters = gr.Button("↻", scale=1, min_width=40, elem_id="vqa-refresh-adapters")
            compare = gr.Checkbox(False, label="Compare: show base and adapter answers side by side",
                                  elem_id="vqa-compare")
            with gr.Accordion("Generation settings", open=False):
                system_prompt = gr.Textbox(label="System prompt (optional)", lines=2)
                max_new_tokens = gr.Slider(1, UI_MAX_NEW_TOKENS, value=DEFAULT_MAX_NEW_TOKENS, step=1,
                                           label="Max new tokens", elem_id="vqa-max-new-tokens")
                temperature = gr.Slider(0.0, 2.0, value=DEFAULT_TEMPERATURE, step=0.05,
                                        label="Temperature (0 = greedy)", elem_id="vqa-temperature")
                top_p = gr.Slider(0.05, 1.0, value=DEFAULT_TOP_P, step=0.05, label="Top-p")
        with gr.Column(scale=3):
            with gr.Row():
                base_chat = gr.Chatbot(label="Base model", visible=False, height=420, elem_id="vqa-base-chat")
                chat = gr.Chatbot(label="Answer", height=420, elem_id="vqa-chat")
            question = gr.Textbox(label="Question", placeholder="Ask something about the image...", lines=2,
                                  elem_id="vqa-question")
            with gr.Row():
                ask = gr.Button("Ask", variant="primary", elem_id="vqa-ask")
                stop = gr.Button("Stop", variant="stop", elem_id="vqa-stop")
                clear = gr.Button("New conversation", elem_id="vqa-clear")
            notices = gr.Markdown(elem_id="vqa-notices")
    gr.Examples(example_pairs(settings), inputs=[image, question], label="Examples (images drawn by the app)")

    history = gr.State([])
    base_history = gr.State([])

    # The /vqa endpoint: plain inputs, final answer (the UI streams through its own event).
    with gr.Group(visible=False):
        api_image = gr.File(type="filepath", label="image")
        api_question = gr.Textbox(label="question")
        api_model = gr.Textbox(value=model_default, label="model")
        api_max_new_tokens = gr.Number(value=DEFAULT_MAX_NEW_TOKENS, label="max_new_tokens")
        api_temperature = gr.Number(value=DEFAULT_TEMPERATURE, label="temperature")
        api_adapter = gr.Textbox(value=NONE, label="adapter")
        api_top_p = gr.Number(value=DEFAULT_TOP_P, label="top_p")
        api_system_prompt = gr.Textbox(value="", label="system_prompt")
        api_answer = gr.Textbox(label="answer")
        api_button = gr.Button("vqa")

    vqa = vqa_endpoint(manager, settings)

    @gpu
    @user_errors
    def stream(image_path, question_text, turns, base_turns, model_id, max_tokens, temp, top_p_value, system_text,
               adapter_name, compare_on):
        for main, base, notes in chat_turn(manager, settings, image_path, question_text, turns, base_turns,
                                           model_id, max_tokens, temp, top_p_value, system_text, adapter_name,
                                           compare_on):
            yield main, base, main, base, "\n".join(f"- {note}" for note in notes)

    def new_conversation():
        return [], [], [], [], ""

    def on_compare(compare_on, adapter_name):
        label = f"With adapter {adapter_name}" if compare_on and adapter_name != NONE else "Answer"
        return gr.update(visible=bool(compare_on)), gr.update(label=label)

    api_button.click(vqa, inputs=[api_image, api_question, api_model, api_max_new_tokens, api_temperature,
                                  api_adapter, api_top_p, api_system_prompt],
                     outputs=api_answer, api_name="vqa", **GPU_QUEUE)
    ask_event = gr.on([ask.click, question.submit], stream,
                      inputs=[image, question, history, base_history, model, max_new_tokens, temperature, top_p,
                              system_prompt, adapter, compare],
                      outputs=[chat, base_chat, history, base_history, notices], api_visibility="private",
                      **GPU_QUEUE)
    ask_event.then(lambda mid: ("", precision_line(manager, settings, mid)), inputs=model,
                   outputs=[question, precision], api_visibility="private", queue=False)
    stop.click(None, cancels=[ask_event], api_visibility="private", queue=False)
    image.change(new_conversation, outputs=[chat, base_chat, history, base_history, notices],
                 api_visibility="private", queue=False)
    clear.click(new_conversation, outputs=[chat, base_chat, history, base_history, notices],
                api_visibility="private", queue=False)
    def on_model(mid, adapter_name):
        names = adapters_for(settings, mid)
        return precision_line(manager, settings, mid), gr.update(
            choices=names, value=adapter_name if adapter_name in names else NONE)

    model.change(on_model, inputs=[model, adapter], outputs=[precision, adapter], api_visibility="private",
                 queue=False)
    compare.change(on_compare, inputs=[compare, adapter], outputs=[base_chat, chat], api_visibility="private",
                   queue=False)
    adapter.change(on_compare, inputs=[compare, adapter], outputs=[base_chat, chat], api_visibility="private",
                   queue=False)
    refresh_adapters.click(lambda mid: gr.update(choices=adapters_for(settings, mid)), inputs=model, outputs=adapter,
                           api_visibility="private", queue=False)
