"""Image question answering: the request, its validation, and the calls the VQA tab and the API make.

No gradio here. ``VqaRequest.build`` checks every value before any model loads (a bad request
costs nothing); ``answer_once`` serves /vqa, ``chat_turn`` the tab's streamed, multi-turn chat with
an optional base-vs-adapter compare.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from models.checks import check_messages, check_model, check_number, check_text
from models.errors import InvalidRequest
from models.generation import MAX_NEW_TOKENS, GenerationParams

log = logging.getLogger(__name__)

TASK = "vqa"
NONE = "none"
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.9


@dataclasses.dataclass(frozen=True)
class VqaRequest:
    """One question about one image, validated; the image is opened, checked and downscaled once.

    Attributes:
        image: the RGB PIL image.
        notices: what was done to the image (rotated by EXIF, downscaled...), for the user.
        history, base_history: earlier turns (the base side only with ``compare``).
        adapter_folder: the LoRA adapter to answer with (None: the base model).
    """

    image: object
    question: str
    model: str
    params: GenerationParams
    system_prompt: str = ""
    adapter_folder: Path | None = None
    history: tuple = ()
    base_history: tuple = ()
    compare: bool = False
    notices: tuple = ()

    @classmethod
    def build(cls, catalog, settings, *, image, question, model=None, max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
              temperature=DEFAULT_TEMPERATURE, top_p=DEFAULT_TOP_P, system_prompt="", adapter=NONE, history=None,
              base_history=None, compare=False, seed=None) -> VqaRequest:
        from models import adapters
        from models.images import load_image

        model = check_model(catalog, catalog.default_for(TASK, settings.offline) if model in (None, "") else model,
                            TASK).id
        params = GenerationParams(
            max_new_tokens=check_number("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS, integer=True),
            temperature=check_number("temperature", temperature, 0.0, 2.0),
            top_p=check_number("top_p", top_p, 0.0, 1.0),
            seed=None if seed is None else check_number("seed", seed, 0, 2**32 - 1, integer=True))
        question = check_text("question", question, settings.limits.text_chars,
                              empty_message="Type a question about the image first.")
        system_prompt = check_text("system_prompt", system_prompt, settings.limits.text_chars, required=False)
        folder = adapters.resolve(settings.adapters_dir, adapter or NONE, model)
        if compare and folder is None:
            raise InvalidRequest("Compare needs an adapter: choose one in 'Adapter' (or untick Compare).")
        history = check_messages(history, settings.limits)
        base_history = check_messages(base_history, settings.limits, what="base history") if compare else []
        if image is None or image == "":
            raise InvalidRequest("Upload, paste or capture an image first.")
        picture, notices = load_image(image, limits=settings.limits)
        return cls(image=picture, question=question, model=model, params=params, system_prompt=system_prompt,
                   adapter_folder=folder, history=tuple(history), base_history=tuple(base_history),
                   compare=bool(compare), notices=tuple(notices))


def answer_once(manager, request: VqaRequest, stop: threading.Event | None = None) -> str:
    """The whole answer to one question (the /vqa endpoint), with the model pinned for exactly this call.

    It streams internally like the tab, so Stop, a closed connection and the call's time cap end it.
    """
    answer = ""
    for history, _, _ in chat_turn(manager, dataclasses.replace(request, compare=False), stop=stop):
        answer = history[-1]["content"]
    if request.notices:
        log.info("vqa image notices: %s", "; ".join(request.notices))
    return answer


def chat_turn(manager, request: VqaRequest, stop: threading.Event | None = None, progress=None,
              stats=None) -> Iterator[tuple]:
    """Stream one turn of the conversation.

    Yields ``(history, base_history, notices)``: messages-format lists with the growing answer as the
    last assistant message. ``history`` is the conversation with the chosen adapter (or the base
    model); ``base_history`` is the base model's side of a compare, otherwise unchanged.
    """
    from models.families import family_module

    family = family_module(manager.catalog.get(request.model).family)  # vlm, or remote for an engine elsewhere
    notices = list(request.notices)
    runs = ([("base", None, list(request.base_history))] if request.compare else []) + \
        [("main", request.adapter_folder, list(request.history))]
    shown = {"main": list(request.history), "base": list(request.base_history)}
    with manager.use(request.model, progress=progress) as handle:
        for side, run_folder, earlier in runs:
            turn = earlier + [{"role": "user", "content": request.question}, {"role": "assistant", "content": ""}]
            shown[side] = turn
            yield shown["main"], shown["base"], notices
            for text in family.answer(handle, request.image, request.question, request.params, history=earlier,
                                   system_prompt=request.system_prompt, adapter_folder=run_folder, stop=stop,
                                   notices=notices, stats=stats):
                turn[-1] = {"role": "assistant", "content": text}
                yield shown["main"], shown["base"], notices
            if stop is not None and stop.is_set():
                return


def adapters_for(settings, model: str) -> list[str]:
    """'none' plus the saved adapters trained on ``model`` (or with no recorded base)."""
    from models.adapters import list_adapters

    return [NONE] + list_adapters(settings.adapters_dir, base_model=model)


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
        except InvalidRequest as exc:
            return f"Precision on this device: not available ({exc})"
    return (f"Precision on this device: **{choose(spec, 'cpu').name}** on CPU / "
            f"**{choose(spec, 'cuda').name}** on CUDA")


def example_pairs(settings) -> list[list[str]]:
    """[[image path, question], ...] drawn by the project into the cache (no downloads)."""
    from models.images import ensure_examples

    return [[path, question] for path, question in ensure_examples(settings.cache_dir / "examples")]
