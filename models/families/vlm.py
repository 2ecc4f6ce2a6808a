"""Vision-language family: image + question -> streamed answer.

One family for every ``AutoModelForImageTextToText`` model that has a processor with a chat
template: LLaVA-1.5 (llava-hf), Qwen2/2.5-VL, SmolVLM/Idefics3 and Llama-3.2-Vision (Mllama).
Their differences (image size limits, how images are passed, where the context length lives)
are handled here, so the tab never needs to know which kind of model it talks to.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

from models.catalog import ModelSpec
from models.checks import check_messages, check_text
from models.errors import Busy, InvalidRequest, TooLarge
from models.families.loading import load_pretrained
from models.generation import GenerationParams, StreamStats, stream_generate
from models.limits import Limits
from models.quantization import Precision

BUSY_TIMEOUT = 120.0
# Re-renders of the prompt after the estimate, at most; then the follow-ups are all left out.
MAX_RECHECKS = 3

# Pixels fed to the processor per model type. Processors resize anyway; Qwen2-VL keeps the native
# resolution (one token per 28x28 patch), so a large photo would cost thousands of tokens.
MAX_IMAGE_PIXELS = {"qwen2_vl": 1024 * 28 * 28, "qwen2_5_vl": 1024 * 28 * 28, "mllama": 1120 * 1120,
                    "idefics3": 1536 * 1536, "llava": 1024 * 1024}
DEFAULT_MAX_IMAGE_PIXELS = 1536 * 1536


@dataclasses.dataclass(eq=False)
class VLMHandle:
    """A loaded vision-language model; ``lock`` serializes calls because adapters switch in place."""

    model: object
    processor: object
    spec_id: str
    device: str
    model_type: str
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def context_length(self) -> int:
        config = self.model.config
        text_config = getattr(config, "text_config", None) or config
        return int(getattr(text_config, "max_position_embeddings", 0) or 4096)

    @property
    def max_image_pixels(self) -> int:
        return MAX_IMAGE_PIXELS.get(self.model_type, DEFAULT_MAX_IMAGE_PIXELS)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)


def load(spec: ModelSpec, location: str, precision: Precision) -> VLMHandle:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = load_pretrained(spec, location, precision, AutoModelForImageTextToText, AutoProcessor,
                                       kind="chat vision model")
    return VLMHandle(model=model, processor=processor, spec_id=spec.id, device=precision.device,
                     model_type=getattr(model.config, "model_type", ""))


def release(handle: VLMHandle) -> None:
    """Drop the handle's references so that the model (and any loaded adapters) can be freed."""
    handle.model = None
    handle.processor = None


def build_tiny(folder: Path) -> None:
    """A LLaVA with a 2-layer CLIP vision tower (32 px, patch 8) and a 2-layer Llama, random weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    try:  # the PIL-only image processor: no torchvision here
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    from models.offline import CHAT_TEMPLATE, seeded, train_tokenizer

    tokenizer = train_tokenizer(special_tokens=["<image>"], chat_template=CHAT_TEMPLATE,
                                extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    seeded()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor.save_pretrained(folder)
    model.save_pretrained(folder, safe_serialization=True)


# ---- prompts -----------------------------------------------------------------------------------

def build_messages(question: str, history: list[dict], system_prompt: str = "") -> list[dict]:
    """Chat-template messages: the image goes with the first user turn, later turns are text."""
    messages = []
    if system_prompt and system_prompt.strip():
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt.strip()}]})
    turns = history + [{"role": "user", "content": question}]
    first_user = next(i for i, turn in enumerate(turns) if turn["role"] == "user")
    for index, turn in enumerate(turns):
        parts = [{"type": "text", "text": turn["content"]}]
        if index == first_user:
            parts.insert(0, {"type": "image"})
        messages.append({"role": turn["role"], "content": parts})
    return messages


def encode(handle: VLMHandle, image, question: str, params: GenerationParams, history: list[dict] | None = None,
           system_prompt: str = "", limits: Limits | None = None) -> tuple[dict, list[str], GenerationParams]:
    """Processor inputs for one question; drops the oldest follow-up turns when the context is full.

    Returns the inputs (on the model's device, pixels in the model's dtype), notices for the user,
    and the sampling settings, with max_new_tokens lowered if the answer would overflow the context.
    """
    limits = limits or Limits()
    question = check_text("question", question, limits.text_chars,
                          empty_message="Type a question about the image first.")
    history = check_messages(history, limits)
    image, notices = fit_image(image, handle.max_image_pixels)
    system_prompt = check_text("system_prompt", system_prompt, limits.text_chars, required=False)
    context = handle.context_length
    # Room kept for the answer while trimming history; a huge max_new_tokens must not drop everything.
    budget = max(context - params.max_new_tokens, context // 2)
    # Keep the first exchange (it carries the image); drop follow-ups from the oldest, each counted once.
    keep_head = 2 if len(history) >= 2 else len(history)
    head = history[:keep_head]
    tail = history[keep_head:]
    tail = tail[_first_kept(handle, image, question, head, tail, system_prompt, budget):]
    for attempt in range(MAX_RECHECKS + 1):
        inputs = _process(handle, image, build_messages(question, head + tail, system_prompt))
        length = int(inputs["input_ids"].shape[-1])
        if length <= budget or not tail:
            break
        tail = tail[2:] if attempt < MAX_RECHECKS - 1 else []  # bounded re-checks: the last drops them all
    left_out = len(history) - keep_head - len(tail)
    if left_out:
        notices.append(f"Left out {left_out:,} earlier message{'s' if left_out != 1 else ''} to fit the "
                       f"{context}-token context.")
    if length >= context:
        raise TooLarge(f"The question and image take {length} tokens; {handle.spec_id} reads at most {context} "
                       "tokens, answer included. Shorten the question or start a new conversation.")
    if length + params.max_new_tokens > context:
        params = dataclasses.replace(params, max_new_tokens=context - length)
        notices.append(f"Max new tokens lowered to {params.max_new_tokens} to fit the {context}-token context.")
    model = handle.model
    dtype = getattr(model, "dtype", None)
    moved = {}
    for key, value in inputs.items():
        if hasattr(value, "to"):
            value = value.to(model.device)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
        moved[key] = value
    return moved, notices, params


def _process(handle: VLMHandle, image, messages: list[dict]) -> dict:
    prompt = handle.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return handle.processor(images=[image], text=prompt, return_tensors="pt")


def _first_kept(handle: VLMHandle, image, question: str, head: list[dict], tail: list[dict], system_prompt: str,
                budget: int) -> int:
    """Index in ``tail`` of the oldest follow-up to keep so that the prompt fits ``budget`` (an estimate).

    Each follow-up's tokens are counted once, newest first (one tokenizer call), plus the template's
    tokens around a message, measured once on a probe exchange; the processor runs twice, whatever
    the length of the conversation. Kept follow-ups start at a user message.
    """
    if not tail:
        return 0
    bare = int(_process(handle, image, build_messages(question, head, system_prompt))["input_ids"].shape[-1])
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with_probe = int(_process(handle, image, build_messages(question, head + probe, system_prompt)
                              )["input_ids"].shape[-1])
    counts = handle.tokenizer([m["content"] for m in probe + tail], add_special_tokens=False)["input_ids"]
    per_message = max(0.0, (with_probe - bare - len(counts[0]) - len(counts[1])) / 2)
    room, used, first = budget - bare, 0.0, len(tail)
    for index in range(len(tail) - 1, -1, -1):
        used += len(counts[index + 2]) + per_message
        if used > room:
            break
        if tail[index]["role"] == "user":
            first = index
    return first


def fit_image(image, max_pixels: int) -> tuple[object, list[str]]:
    """Downscale ``image`` to the model's pixel limit (keeping its aspect ratio), with a notice."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise InvalidRequest(f"image must be a PIL image (see models.images.load_image), got {type(image).__name__}")
    if image.width * image.height <= max_pixels:
        return image, []
    scale = (max_pixels / (image.width * image.height)) ** 0.5
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    notice = f"Image downscaled from {image.width}x{image.height} to {size[0]}x{size[1]} for this model."
    return image.resize(size, Image.Resampling.LANCZOS), [notice]


# ---- answering ---------------------------------------------------------------------------------

def set_adapter(handle: VLMHandle, adapter_folder: Path | None) -> None:
    """Run the base model (None) or a LoRA adapter; loaded adapters stay next to the base weights."""
    from models.adapters import activate

    activate(handle.model, adapter_folder)


def answer(handle: VLMHandle, image, question: str, params: GenerationParams, history: list[dict] | None = None,
           system_prompt: str = "", adapter_folder: Path | None = None, stop: threading.Event | None = None,
           stats: StreamStats | None = None, notices: list[str] | None = None) -> Iterator[str]:
    """Stream the answer (accumulated text) to ``question`` about ``image`` (an RGB PIL image).

    Args:
        handle: the loaded model.
        image: RGB ``PIL.Image`` (see models.images.load_image).
        question: the user's question.
        params: sampling settings.
        history: earlier turns about the same image, messages format with text content.
        system_prompt: optional system message.
        adapter_folder: a LoRA adapter folder, or None for the base model.
        stop: set it to end generation after the current token.
        stats: filled with token count and timing.
        notices: if given, receives notices about dropped turns.
    """
    if not handle.lock.acquire(timeout=BUSY_TIMEOUT):
        raise Busy(f"{handle.spec_id} is busy answering another request; try again shortly.")
    try:
        set_adapter(handle, adapter_folder)
        inputs, encode_notices, params = encode(handle, image, question, params, history, system_prompt)
        if notices is not None:
            notices.extend(encode_notices)
        yield from stream_generate(handle.model, handle.processor, inputs, params, stop=stop, stats=stats)
    finally:
        handle.lock.release()


def answer_text(handle: VLMHandle, image, question: str, params: GenerationParams, history: list[dict] | None = None,
                system_prompt: str = "", adapter_folder: Path | None = None) -> str:
    """The whole answer at once, without a streaming thread (the API path)."""
    import torch

    if not handle.lock.acquire(timeout=BUSY_TIMEOUT):
        raise Busy(f"{handle.spec_id} is busy answering another request; try again shortly.")
    try:
        set_adapter(handle, adapter_folder)
        inputs, _, params = encode(handle, image, question, params, history, system_prompt)
        tokenizer = handle.tokenizer
        with torch.inference_mode():
            output = handle.model.generate(**inputs, **params.generate_kwargs(),
                                           pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        new_tokens = output[0, inputs["input_ids"].shape[-1]:]
        return tokenizer.decode(new_tokens, skip_special_tokens=True)
    finally:
        handle.lock.release()
