"""Chat family: any causal LM with a chat template (Qwen2.5, SmolLM2, Llama...)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

from models.adapters import activate
from models.catalog import ModelSpec
from models.checks import check_messages, check_text
from models.errors import Busy, InvalidRequest, TooLarge
from models.families.loading import load_pretrained
from models.generation import GenerationParams, StreamStats, stream_generate
from models.limits import Limits
from models.quantization import Precision

BUSY_TIMEOUT = 120.0
# Renders of the chat template after the estimate, each leaving out one more exchange; the estimate
# is off by a few tokens at most (tokens merge differently inside the template), so this is plenty.
MAX_RECHECKS = 3
# History messages tokenized per batch, newest first: trimming stops reading once the context is full.
TOKENIZE_BATCH = 256


@dataclasses.dataclass(eq=False)
class ChatHandle:
    """A loaded chat model; ``lock`` serializes calls because adapters switch in place."""

    model: object
    tokenizer: object
    spec_id: str
    device: str
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def context_length(self) -> int:
        config = self.model.config
        return int(getattr(config, "max_position_embeddings", 0) or 2048)


def load(spec: ModelSpec, location: str, precision: Precision) -> ChatHandle:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = load_pretrained(spec, location, precision, AutoModelForCausalLM, AutoTokenizer,
                                       kind="chat model")
    return ChatHandle(model=model, tokenizer=tokenizer, spec_id=spec.id, device=precision.device)


def build_tiny(folder: Path) -> None:
    """A 2-layer Llama with a 400-token byte-level BPE and a ChatML-style template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.offline import CHAT_TEMPLATE, seeded, train_tokenizer

    tokenizer = train_tokenizer(chat_template=CHAT_TEMPLATE)
    seeded()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder, safe_serialization=True)


# ---- prompts -----------------------------------------------------------------------------------

def check_conversation(messages, limits: Limits | None = None) -> list[dict]:
    """A clean copy of ``[system prompt?] + history + [user message]``.

    The history is checked by ``models.checks.check_messages`` under ``limits`` (the
    ``WORKBENCH_LIMIT_*`` settings by default), the system prompt and the message like any text.
    """
    limits = limits or Limits.from_env()
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} messages, the user's last")
    first, system = messages[0], []
    if isinstance(first, dict) and first.get("role") == "system":
        prompt = check_text("system prompt", first.get("content"), limits.text_chars, required=False)
        system, messages = [{"role": "system", "content": prompt}], messages[1:]
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "user":
        raise InvalidRequest("The last message must be the user's: {'role': 'user', 'content': text}")
    message = check_text("message", last.get("content"), limits.text_chars,
                         empty_message="The last message must be a non-empty user message.")
    history = check_messages(messages[:-1], limits, what="history")
    return system + history + [{"role": "user", "content": message}]


def encode(handle: ChatHandle, messages: list[dict], params: GenerationParams, notices: list[str] | None = None,
           limits: Limits | None = None) -> tuple[dict, GenerationParams]:
    """Tokenize a conversation with the chat template so that it fits the model's context.

    The oldest exchanges are left out when the conversation is too long, and max_new_tokens is
    lowered when the answer would overflow the context; ``notices`` (if given) is told both.

    Args:
        handle: the loaded model.
        messages: ``[system prompt?] + history + [user message]``, messages format with text content.
        params: sampling settings.
        notices: receives a line for the user about each change.
        limits: request limits for the validation (see ``check_conversation``).

    Returns:
        The inputs on the model's device and the sampling settings to use.
    """
    return _encode(handle, check_conversation(messages, limits), params, notices)


def _encode(handle: ChatHandle, messages: list[dict], params: GenerationParams,
            notices: list[str] | None) -> tuple[dict, GenerationParams]:
    """``encode`` for a conversation that ``check_conversation`` has cleaned."""
    notices = notices if notices is not None else []
    system = messages[:1] if messages[0]["role"] == "system" else []
    history, question = messages[len(system):-1], messages[-1:]
    context = handle.context_length
    # Room kept for the answer while trimming history; a huge max_new_tokens must not drop everything.
    budget = max(context - params.max_new_tokens, context // 2)
    cut = _first_kept(handle, system, history, question, budget)
    for attempt in range(MAX_RECHECKS + 1):
        inputs = _apply_template(handle, system + history[cut:] + question)
        length = int(inputs["input_ids"].shape[-1])
        if length <= budget or cut == len(history):
            break
        # One more exchange out; on the last try all of them, so that the renders stay bounded.
        cut = _next_user_turn(history, cut) if attempt < MAX_RECHECKS - 1 else len(history)
    if cut:
        notices.append(f"Left out {cut:,} earlier message{'s' if cut != 1 else ''} to fit the "
                       f"{context}-token context.")
    if length >= context:
        what = "The system prompt and message take" if system else "The message takes"
        raise TooLarge(f"{what} {length} tokens; {handle.spec_id} reads at most {context} tokens, answer "
                       "included. Shorten it.")
    if length + params.max_new_tokens > context:
        params = dataclasses.replace(params, max_new_tokens=context - length)
        notices.append(f"Max new tokens lowered to {params.max_new_tokens} to fit the {context}-token context.")
    return {key: value.to(handle.model.device) for key, value in inputs.items()}, params


def _apply_template(handle: ChatHandle, messages: list[dict]) -> dict:
    return handle.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True, return_tensors="pt")


def _first_kept(handle: ChatHandle, system: list[dict], history: list[dict], question: list[dict],
                budget: int) -> int:
    """Index of the oldest history message to keep so that the prompt fits ``budget`` tokens (an estimate).

    Each message's tokens are counted once, newest first, plus the template's tokens around a
    message, measured once. Kept history starts at a user message (or is the whole history), so
    exchanges are left out whole.
    """
    if not history:
        return 0
    bare = int(_apply_template(handle, system + question)["input_ids"].shape[-1])
    per_message = _template_tokens_per_message(handle, system, question, bare)
    room = budget - bare
    first, used = len(history), 0.0
    for end in range(len(history), 0, -TOKENIZE_BATCH):
        start = max(0, end - TOKENIZE_BATCH)
        contents = [message["content"] for message in history[start:end]]
        counts = handle.tokenizer(contents, add_special_tokens=False)["input_ids"]
        for index in range(end - 1, start - 1, -1):
            used += len(counts[index - start]) + per_message
            if used > room:
                return first
            if index == 0 or history[index]["role"] == "user":
                first = index
    return first


def _template_tokens_per_message(handle: ChatHandle, system: list[dict], question: list[dict], bare: int) -> float:
    """Tokens the chat template adds around a history message (role markers, separators), on average.

    Measured on one exchange, so that the count is exact for whole exchanges.
    """
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with_probe = int(_apply_template(handle, system + probe + question)["input_ids"].shape[-1])
    content = sum(len(ids) for ids in handle.tokenizer(["a", "b"], add_special_tokens=False)["input_ids"])
    return max(0.0, (with_probe - bare - content) / 2)


def _next_user_turn(history: list[dict], cut: int) -> int:
    """The next place after ``cut`` where kept history may start (a user message, or nothing kept)."""
    return next((index for index in range(cut + 1, len(history)) if history[index]["role"] == "user"), len(history))


# ---- replying ----------------------------------------------------------------------------------

def reply(handle: ChatHandle, messages: list[dict], params: GenerationParams, *, adapter_folder: Path | None = None,
          stop: threading.Event | None = None, stats: StreamStats | None = None, notices: list[str] | None = None,
          limits: Limits | None = None) -> Iterator[str]:
    """Stream the assistant's reply (accumulated text) to a messages-format conversation.

    The handle's lock is held for the whole generation, so the adapter it runs with cannot be
    switched by another call half-way.

    Args:
        handle: the loaded model.
        messages: ``[system prompt?] + history + [user message]``, text content.
        params: sampling settings.
        adapter_folder: a LoRA adapter folder (``models.adapters.resolve``), or None for the base model.
        stop: set it to end generation after the current token.
        stats: filled with token count and timing.
        notices: receives lines for the user (earlier messages left out, max new tokens lowered).
        limits: request limits for the validation (the ``WORKBENCH_LIMIT_*`` settings by default).
    """
    messages = check_conversation(messages, limits)
    if not handle.lock.acquire(timeout=BUSY_TIMEOUT):
        raise Busy(f"{handle.spec_id} is busy answering another request; try again shortly.")
    try:
        activate(handle.model, adapter_folder)
        inputs, params = _encode(handle, messages, params, notices)
        yield from stream_generate(handle.model, handle.tokenizer, inputs, params, stop=stop, stats=stats,
                                   notices=notices)
    finally:
        handle.lock.release()
