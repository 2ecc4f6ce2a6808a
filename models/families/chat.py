"""Chat family: any causal LM with a chat template (Qwen2.5, SmolLM2, Llama...)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

from models.catalog import ModelSpec
from models.errors import InvalidRequest
from models.generation import GenerationParams, StreamStats, stream_generate
from models.quantization import Precision, fit_4bit_for_cpu, transformers_kwargs

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(eq=False)
class ChatHandle:
    model: object
    tokenizer: object
    spec_id: str
    device: str

    @property
    def context_length(self) -> int:
        config = self.model.config
        return int(getattr(config, "max_position_embeddings", 0) or 2048)


def load(spec: ModelSpec, location: str, precision: Precision) -> ChatHandle:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = transformers_kwargs(precision)
    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=spec.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(location, trust_remote_code=spec.trust_remote_code, **kwargs)
    if "quantization_config" not in kwargs:
        model.to(precision.device)
    elif precision.device == "cpu":
        fit_4bit_for_cpu(model)
    model.eval()
    if tokenizer.chat_template is None:
        raise InvalidRequest(f"{spec.id} has no chat template; it is not an instruct/chat model")
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


def check_messages(messages: list[dict]) -> list[dict]:
    """Validate a messages-format history (role/content strings) and return a clean copy."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content}")
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InvalidRequest(f"message {index} must have a role in {ROLES}")
        content = message.get("content")
        if not isinstance(content, str):
            raise InvalidRequest(f"message {index} must have text content")
        clean.append({"role": message["role"], "content": content})
    if clean[-1]["role"] != "user" or not clean[-1]["content"].strip():
        raise InvalidRequest("The last message must be a non-empty user message.")
    return clean


def encode(handle: ChatHandle, messages: list[dict], params: GenerationParams) -> tuple[dict, int]:
    """Tokenize with the chat template, dropping the oldest turns when the context is too long.

    Returns the inputs and how many earlier messages were dropped.
    """
    messages = check_messages(messages)
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    budget = handle.context_length - params.max_new_tokens
    dropped = 0
    while True:
        ids = handle.tokenizer.apply_chat_template(system + turns, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt")
        if ids["input_ids"].shape[-1] <= budget or len(turns) <= 1:
            break
        turns, dropped = turns[2:] if len(turns) > 2 else turns[1:], dropped + 2
    if ids["input_ids"].shape[-1] > budget:
        raise InvalidRequest(f"The message is {ids['input_ids'].shape[-1]} tokens; {handle.spec_id} accepts "
                         f"{budget} with max_new_tokens={params.max_new_tokens}. Shorten it or lower max new tokens.")
    return {k: v.to(handle.model.device) for k, v in ids.items()}, dropped


def reply(handle: ChatHandle, messages: list[dict], params: GenerationParams,
          stop: threading.Event | None = None, stats: StreamStats | None = None) -> Iterator[str]:
    """Stream the assistant's reply (accumulated text) to a messages-format conversation."""
    inputs, _ = encode(handle, messages, params)
    yield from stream_generate(handle.model, handle.tokenizer, inputs, params, stop=stop, stats=stats)
