"""Streaming text generation shared by the chat and VLM families.

``model.generate`` runs in a worker thread that feeds a TextIteratorStreamer. The generator that
wraps it owns the thread: when the caller stops iterating (Stop button, closed page, an error),
the generator's ``finally`` sets a stop flag that the model checks after every token, joins the
thread, and drops every reference to the model, so no thread outlives its request.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

from models import limits
from models.errors import InvalidRequest

JOIN_TIMEOUT = 30.0
# The one cap on new tokens for every chat and VQA request, in the tabs and the API alike.
MAX_NEW_TOKENS = 2048


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """Sampling settings; validated so that API callers get a clear error, not a crash."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None  # sampling seed (the OpenAI API's ``seed``); None: not reseeded

    MAX_NEW_TOKENS = MAX_NEW_TOKENS

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or not 1 <= self.max_new_tokens <= self.MAX_NEW_TOKENS:
            raise InvalidRequest(f"max_new_tokens must be a whole number from 1 to {self.MAX_NEW_TOKENS}, "
                             f"got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequest(f"temperature must be between 0 and 2, got {self.temperature!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**32):
            raise InvalidRequest(f"seed must be a whole number from 0 to {2**32 - 1}, got {self.seed!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be above 0 and at most 1, got {self.top_p!r}")

    def generate_kwargs(self) -> dict:
        sample = self.temperature > 0
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": sample}
        if sample:
            kwargs.update(temperature=float(self.temperature), top_p=float(self.top_p))
        return kwargs


@dataclasses.dataclass
class StreamStats:
    """Filled in while streaming; read after the generator is exhausted."""

    new_tokens: int = 0
    seconds: float = 0.0
    stopped: bool = False
    prompt_tokens: int = 0
    max_new_tokens: int = 0  # after any lowering to fit the context

    @property
    def hit_length_limit(self) -> bool:
        return bool(self.max_new_tokens) and self.new_tokens >= self.max_new_tokens

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def stream_generate(model, tokenizer, inputs: dict, params: GenerationParams,
                    stop: threading.Event | None = None, stats: StreamStats | None = None,
                    notices: list[str] | None = None) -> Iterator[str]:
    """Yield the accumulated answer text as tokens arrive.

    Args:
        model: a transformers model with ``generate``.
        tokenizer: the tokenizer (or processor) used to decode new tokens.
        inputs: tensors for ``generate`` (input_ids, attention_mask, pixel_values...).
        params: sampling settings.
        stop: set it from elsewhere to end generation after the current token.
        stats: optional holder for token count, seconds and whether generation was stopped.
        notices: gets a line for the user when the call's time cap ended the generation.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    stop = stop or threading.Event()
    flag = limits.StopFlag(stop)  # this run's Stop, and the call's (closed connection, time cap)
    stats = stats if stats is not None else StreamStats()
    decoder = getattr(tokenizer, "tokenizer", tokenizer)
    streamer = TextIteratorStreamer(decoder, skip_prompt=True, skip_special_tokens=True, timeout=JOIN_TIMEOUT)

    class _StopFlag(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stats.new_tokens += 1
            return flag.is_set()

    errors: list[BaseException] = []

    call_kwargs = dict(inputs)
    stats.prompt_tokens = int(inputs["input_ids"].shape[-1]) if "input_ids" in inputs else 0
    stats.max_new_tokens = params.max_new_tokens

    def work(generate=model.generate):
        try:
            if params.seed is not None:
                torch.manual_seed(params.seed)  # the model call holds the device lock: no other call draws meanwhile
            with torch.inference_mode():
                generate(**call_kwargs, **params.generate_kwargs(), streamer=streamer,
                         stopping_criteria=StoppingCriteriaList([_StopFlag()]),
                         pad_token_id=getattr(decoder, "pad_token_id", None) or getattr(decoder, "eos_token_id", None))
        except BaseException as exc:  # re-raised in the caller's thread below
            errors.append(exc)
            streamer.end()

    del model, inputs
    worker = threading.Thread(target=work, name="generate", daemon=True)
    started = time.perf_counter()
    worker.start()
    text = ""
    finished = False
    try:
        for piece in streamer:
            if piece:
                text += piece
                yield text
        finished = True
    finally:
        if not finished:
            stats.stopped = True
            stop.set()
        worker.join(JOIN_TIMEOUT)
        stats.stopped = stats.stopped or flag.is_set()
        if notices is not None and stats.stopped and (notice := limits.timeout_notice()):
            notices.append(notice)
        stats.seconds = time.perf_counter() - started
        del work, worker
    if errors:
        raise RuntimeError(f"generation failed: {errors[0]}") from errors[0]
