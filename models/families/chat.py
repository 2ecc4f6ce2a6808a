"""Chat family: any causal LM with a chat template (Qwen2.5, SmolLM2, Llama...)."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from pathlib import Path

from models.adapters import activate
from models.catalog import ModelSpec
from models.checks import check_messages, check_text
from models.errors import Busy, InvalidRequest, TooLarge
from models.families.loading import folder_config, load_pretrained
from models.generation import GenerationParams, StreamStats, stream_generate
from models.limits import Limits
from models.quantization import Precision
from models.sources import ModelUnavailableError

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


# Files one of which a tokenizer needs besides tokenizer_config.json (fast, SentencePiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_folder(spec: ModelSpec, location: str) -> None:
    """Refuse a local folder that holds no causal language model with its tokenizer, saying what it holds.

    Runs before anything is read with transformers, so that a models-file entry pointing at the wrong
    folder gets a message instead of a loader's traceback. Hub ids are left to transformers.
    """
    config = folder_config(spec, location, "a chat model (a transformers causal LM folder: config.json, "
                                           "weights and tokenizer files)")
    if config is None:
        return
    folder = Path(location)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kind = config.get("model_type")
    architecture = ", ".join(config.get("architectures") or [])
    described = f"a {kind!r} model" + (f" ({architecture})" if architecture else "")
    if "vision_config" in config or "image_token_index" in config:
        raise ModelUnavailableError(f"{spec.id}: {folder} holds {described}, an image-text model; list it with "
                                    "task: vqa, family: vlm.")
    remote = spec.trust_remote_code and "auto_map" in config
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        raise ModelUnavailableError(f"{spec.id}: {folder} holds {described}, which is not a causal language model; "
                                    "the chat family loads AutoModelForCausalLM models (Llama, Qwen2, SmolLM2, ...).")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelUnavailableError(f"{spec.id}: {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                                    "copy them from the model's repository next to config.json.")


def load(spec: ModelSpec, location: str, precision: Precision) -> ChatHandle:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_folder(spec, location)
    model, tokenizer = load_pretrained(spec, location, precision, AutoModelForCausalLM, AutoTokenizer,
                                       kind="chat model")
    return ChatHandle(model=model, tokenizer=tokenizer, spec_id=spec.id, device=precision.device)


def build_tiny(folder: Path, arch: str = "") -> None:
    """A deterministic random-weight chat model in ``folder``.

    ``arch`` "" is tiny-chat (a 2-layer Llama with a ChatML-style template); "qwen2" is the twin of
    Qwen2.5-Instruct (``Qwen2ForCausalLM``, Qwen's byte-level BPE tokenizer, special tokens and chat template).
    """
    builders = {"": _build_llama, "qwen2": _build_qwen2}
    if arch not in builders:
        raise ModelUnavailableError(f"the chat family builds no tiny {arch!r} model; it builds: "
                                    f"{', '.join(name for name in builders if name)}")
    builders[arch](folder)


def _build_llama(folder: Path) -> None:
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


# Qwen2.5-Instruct's added tokens in the order of their ids (151643...), after the BPE vocabulary;
# the first 14 are special (skipped when decoding), the tool-call and fill-in-the-middle ones are not.
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                       "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
QWEN_ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                     "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
# The chat template of Qwen/Qwen2.5-0.5B-Instruct and -1.5B-Instruct (tokenizer_config.json), verbatim:
# ChatML, a default system prompt when the conversation has none, and the tool-call sections.
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


def _train_qwen_bpe(vocab_size: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE trained on ``models.offline.CORPUS`` with Qwen2's pre-tokenizer.

    Deterministic for a fixed corpus and size, like ``models.offline.train_tokenizer``.
    """

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from models.offline import CORPUS

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(CORPUS * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(pair) for pair in model["merges"]]


def _build_qwen2(folder: Path) -> None:
    """Qwen2.5-Instruct in miniature: the same classes, tokens, template and generation settings.

    As in the hub repos the embedding is tied to the output head and has more rows than the
    tokenizer has tokens (padded to a multiple of 64), q/k/v have biases, and generation stops at
    ``<|im_end|>`` (or ``<|endoftext|>``).
    """
    from tokenizers import AddedToken
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2TokenizerFast

    from models.offline import seeded

    vocab, merges = _train_qwen_bpe()
    for token in QWEN_SPECIAL_TOKENS + QWEN_ADDED_TOKENS:  # their ids follow the BPE's, in Qwen's order
        vocab[token] = len(vocab)
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>", errors="replace",
                                   model_max_length=131072, split_special_tokens=False)
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL_TOKENS],
                         special_tokens=True)
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in QWEN_ADDED_TOKENS])
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    end_of_text, im_end = ids("<|endoftext|>"), ids("<|im_end|>")

    seeded()
    config = Qwen2Config(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         use_sliding_window=False, max_window_layers=2, tie_word_embeddings=True,
                         bos_token_id=end_of_text, eos_token_id=im_end, hidden_act="silu")
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=end_of_text, pad_token_id=end_of_text, eos_token_id=[im_end, end_of_text], do_sample=True,
        temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1)
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
