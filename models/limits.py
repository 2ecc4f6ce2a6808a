"""What one request may cost, decided before the work starts, and the wall-clock cap of a model call.

A request's cost is bounded by what its input *expands to* (decoded pixels, decoded samples,
dataset rows, extracted bytes, history turns, YAML nodes), never by its upload size. Each limit
has a default that keeps one request well under 1 GB on a 2-core, 24 GB machine, and can be set
with an environment variable ``WORKBENCH_LIMIT_<NAME>`` (``WORKBENCH_LIMIT_AUDIO_SECONDS=1200``).

The call deadline lives in a context variable set by the handler that runs a model call; the
loops that can run long (token generation, denoising steps, audio chunks, sentences) check it
and stop as if Stop had been pressed.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import time
from collections.abc import Iterator

ENV_PREFIX = "WORKBENCH_LIMIT_"


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request limits; every one is documented in the README."""

    image_pixels: int = 40_000_000  # decoded pixels of an uploaded image (width x height)
    image_side: int = 12_000  # either side of an uploaded image, in pixels
    image_aspect: float = 20.0  # long side over short side: processors scale the short side up
    audio_seconds: float = 600.0  # length of an uploaded recording
    audio_samples: int = 60_000_000  # samples decoded from a file: rate x channels x seconds (10 min of 48 kHz stereo)
    text_chars: int = 20_000  # one message, question, prompt or text to speak
    history_turns: int = 10_000  # messages in a conversation sent with a request (older ones are trimmed)
    history_chars: int = 2_000_000  # characters in that conversation
    dataset_bytes: int = 256 * 1024**2  # a dataset's JSONL once extracted
    dataset_rows: int = 200_000  # lines of a dataset
    dataset_problems: int = 200  # problems listed in a validation report (the rest are counted)
    dataset_tokens: int = 50_000_000  # tokens in a dataset (the training run reads them all)
    extracted_bytes: int = 1024**3  # everything a dataset zip expands to
    extracted_files: int = 20_000  # files in a dataset zip
    yaml_bytes: int = 64 * 1024  # a run config as YAML or JSON text
    yaml_nodes: int = 2_000  # nodes in that config; aliases are refused
    call_seconds: float = 600.0  # wall-clock cap of one model call (--max-call-seconds)

    @classmethod
    def from_env(cls, **overrides) -> Limits:
        """Defaults, then ``WORKBENCH_LIMIT_<NAME>`` variables, then ``overrides``."""
        values = {}
        for field in dataclasses.fields(cls):
            raw = os.environ.get(ENV_PREFIX + field.name.upper())
            if raw in (None, ""):
                continue
            try:
                number = float(raw) if field.type == "float" else int(raw)
            except ValueError:
                raise SystemExit(f"{ENV_PREFIX}{field.name.upper()} must be a number, got {raw!r}") from None
            if number <= 0:
                raise SystemExit(f"{ENV_PREFIX}{field.name.upper()} must be positive, got {raw!r}")
            values[field.name] = number
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)


_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("workbench_call_deadline", default=None)


class CallTimedOut(Exception):
    """Raised inside a loop when the call's wall-clock cap has passed (caught by the call's owner)."""


@contextlib.contextmanager
def call_deadline(seconds: float | None) -> Iterator[None]:
    """Run the block under a wall-clock cap of ``seconds`` (None: no cap)."""
    token = _deadline.set(time.monotonic() + seconds if seconds else None)
    try:
        yield
    finally:
        _deadline.reset(token)


def deadline() -> float | None:
    """The monotonic time at which the current call must stop (None: no cap)."""
    return _deadline.get()


def expired(at: float | None = None) -> bool:
    """Whether the deadline ``at`` (default: the current call's) has passed."""
    at = deadline() if at is None else at
    return at is not None and time.monotonic() > at


def format_bytes(nbytes: float) -> str:
    """GB above 0.1 GB, MB below (so a small amount never reads "0.00 GB")."""
    return f"{nbytes / 1024**3:.2f} GB" if nbytes >= 1024**3 / 10 else f"{nbytes / 1024**2:.1f} MB"


def format_seconds(seconds: float) -> str:
    """"10 min 01 s", "45 s": audio lengths and limits people can compare at a glance."""
    whole = int(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"
