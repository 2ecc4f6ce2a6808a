"""Remote inference engines as models: chat and VQA over the OpenAI protocol (vLLM, TGI, llama.cpp's
server, Ollama, LocalAI, another workbench).

A catalog entry with ``source: openai`` names the engine's ``base_url`` (``http://host:8000/v1``),
the engine's model name (``repo``, default the entry's id) and, optionally, the environment
variable holding its API key (``api_key_env``). It takes no local memory; the tabs use it like a
local chat or VQA model: streaming, Stop, history, compare. Nothing hangs: every request has a
connect and a read timeout, and an engine that is down or answers an error gets a clear message.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from models import limits
from models.catalog import ModelSpec
from models.errors import InvalidRequest, Unavailable
from models.generation import GenerationParams, StreamStats
from models.quantization import Precision

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 120.0  # between two streamed chunks; a stalled engine ends the call with a message


@dataclasses.dataclass(eq=False)
class RemoteHandle:
    spec_id: str
    base_url: str
    model_name: str
    api_key: str = dataclasses.field(default="", repr=False)
    device: str = "remote"
    nbytes: int = 0  # nothing of the model lives in this process
    context_length: int = 1_000_000  # the engine trims or refuses; it knows its own context

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def load(spec: ModelSpec, location: str, precision: Precision) -> RemoteHandle:
    """Check that the engine answers and serves the model; nothing is loaded here."""
    import httpx

    base_url = (spec.base_url or location).rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise InvalidRequest(f"{spec.id}: base_url must be an http(s) URL such as http://host:8000/v1")
    api_key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
    handle = RemoteHandle(spec_id=spec.id, base_url=base_url, model_name=spec.repo or spec.id, api_key=api_key)
    try:
        response = httpx.get(f"{base_url}/models", headers=handle.headers(),
                             timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT))
    except httpx.HTTPError as exc:
        raise _unreachable(handle, exc) from None
    if response.status_code >= 400:
        raise Unavailable(f"{spec.id}: the engine at {base_url} answered HTTP {response.status_code}: "
                          f"{_error_text(response)}")
    return handle


def release(handle: RemoteHandle) -> None:
    """Nothing to free: the engine keeps its own memory."""


def reply(handle: RemoteHandle, messages: list[dict], params: GenerationParams, *, adapter_folder: Path | None = None,
          stop: threading.Event | None = None, stats: StreamStats | None = None, notices: list[str] | None = None,
          limits=None) -> Iterator[str]:
    """Stream the engine's reply (accumulated text) to a messages-format conversation (chat family's shape)."""
    if adapter_folder is not None:
        raise InvalidRequest(f"{handle.spec_id} runs on a remote engine: adapters trained here cannot be applied "
                             "to it (load the adapter in the engine, e.g. vLLM --lora-modules).")
    yield from _stream(handle, messages, params, stop, stats, notices)


def answer(handle: RemoteHandle, image, question: str, params: GenerationParams, history: list[dict] | None = None,
           system_prompt: str = "", adapter_folder: Path | None = None, stop: threading.Event | None = None,
           stats: StreamStats | None = None, notices: list[str] | None = None) -> Iterator[str]:
    """Stream the engine's answer about ``image`` (vlm family's shape); the image goes as a PNG data URL."""
    if adapter_folder is not None:
        raise InvalidRequest(f"{handle.spec_id} runs on a remote engine: adapters trained here cannot be applied.")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    turns = list(history or [])
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for index, turn in enumerate(turns + [{"role": "user", "content": question}]):
        if index == 0:  # the image goes with the first user turn, as the local VLM family does
            messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                         {"type": "text", "text": turn["content"]}]})
        else:
            messages.append(turn)
    yield from _stream(handle, messages, params, stop, stats, notices)


def _stream(handle: RemoteHandle, messages: list[dict], params: GenerationParams, stop, stats: StreamStats | None,
            notices: list[str] | None) -> Iterator[str]:
    import httpx

    stats = stats if stats is not None else StreamStats()
    flag = limits.StopFlag(stop)  # this run's Stop, and the call's (closed connection, time cap)
    body = {"model": handle.model_name, "messages": messages, "stream": True, "max_tokens": params.max_new_tokens,
            "temperature": params.temperature, "top_p": params.top_p if params.temperature > 0 else 1.0,
            "stream_options": {"include_usage": True}}
    if params.seed is not None:
        body["seed"] = params.seed
    started, text = time.perf_counter(), ""
    stats.max_new_tokens = params.max_new_tokens
    try:
        with httpx.stream("POST", f"{handle.base_url}/chat/completions", json=body, headers=handle.headers(),
                          timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT)) as response:
            if response.status_code >= 400:
                response.read()
                raise Unavailable(f"{handle.spec_id}: the engine at {handle.base_url} answered HTTP "
                                  f"{response.status_code}: {_error_text(response)}")
            for line in response.iter_lines():
                if flag.is_set():
                    stats.stopped = True
                    break  # leaving the stream closes the connection: the engine stops generating
                delta, usage = _parse_event(line)
                if usage:
                    stats.prompt_tokens = usage.get("prompt_tokens", 0)
                    stats.new_tokens = usage.get("completion_tokens", stats.new_tokens)
                if delta:
                    text += delta
                    stats.new_tokens = max(stats.new_tokens, len(text.split()))  # until the engine's usage arrives
                    yield text
    except httpx.HTTPError as exc:
        raise _unreachable(handle, exc) from None
    finally:
        stats.seconds = time.perf_counter() - started
    if stats.stopped and notices is not None and (notice := limits.timeout_notice()):
        notices.append(notice)


def _parse_event(line: str) -> tuple[str, dict | None]:
    """(new text, usage or None) from one server-sent-event line."""
    if not line.startswith("data:"):
        return "", None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return "", None
    try:
        event = json.loads(payload)
    except json.JSONDecodeError:
        return "", None
    choices = event.get("choices") or []
    delta = (choices[0].get("delta") or {}).get("content") if choices else None
    return delta or "", event.get("usage")


def _error_text(response) -> str:
    try:
        error = response.json().get("error", {})
        return str(error.get("message") if isinstance(error, dict) else error)[:300]
    except (ValueError, AttributeError):
        return response.text[:300]


def _unreachable(handle: RemoteHandle, exc: Exception) -> Unavailable:
    what = "timed out" if "Timeout" in exc.__class__.__name__ else "refuses connections or cannot be reached"
    return Unavailable(f"{handle.spec_id}: the engine at {handle.base_url} {what} ({exc.__class__.__name__}). "
                       "Check that it is running, or choose another model.")
