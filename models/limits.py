"""What one request may cost, decided before the work starts, and the wall-clock cap of a model call.

A request's cost is bounded by what its input *expands to* (decoded pixels, decoded samples,
dataset rows, extracted bytes, history turns, YAML nodes), never by its upload size. Each limit
has a default that keeps one request well under 1 GB on a 2-core, 24 GB machine, and can be set
with an environment variable ``WORKBENCH_LIMIT_<NAME>`` (``WORKBENCH_LIMIT_AUDIO_SECONDS=1200``).

A model call's stop flag (``Call``) lives in a context variable set by the handler that runs the
call; a timer sets it at the wall-clock cap. The loops that can run long (token generation,
denoising steps, audio chunks, sentences) check it and stop as if Stop had been pressed.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import threading
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


class Call:
    """One model call in progress: its stop flag, set by Stop, by a closed connection, or by the time cap.

    The handler that runs the call creates it (``start``) and makes it current around every step of
    its work (``active``); the loops that can run long read it with ``current()``.
    """

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.stop = threading.Event()
        self.started = time.monotonic()
        self._timer = threading.Timer(seconds, self.stop.set) if seconds else None
        if self._timer is not None:
            self._timer.daemon = True
            self._timer.start()

    @property
    def timed_out(self) -> bool:
        return bool(self.seconds) and time.monotonic() - self.started >= self.seconds

    def notice(self) -> str:
        """What to tell the user when the time cap stopped the call ("" when it did not)."""
        if not self.timed_out:
            return ""
        return (f"Stopped after {format_seconds(time.monotonic() - self.started)}: one model call may run for at "
                f"most {format_seconds(self.seconds)} (--max-call-seconds). What was made so far is kept.")

    def end(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


_current: contextvars.ContextVar[Call | None] = contextvars.ContextVar("workbench_call", default=None)


@contextlib.contextmanager
def active(call: Call | None) -> Iterator[None]:
    """Make ``call`` the current one for the block (set around each step of a generator's work)."""
    token = _current.set(call)
    try:
        yield
    finally:
        _current.reset(token)


def current() -> Call | None:
    return _current.get()


class StopFlag:
    """Set when any of its events is set: a run's own Stop and the current call's stop, checked as one."""

    def __init__(self, *events: threading.Event | None):
        call = current()
        self.events = [event for event in (*events, call.stop if call else None) if event is not None]

    def is_set(self) -> bool:
        return any(event.is_set() for event in self.events)

    def set(self) -> None:
        for event in self.events:
            event.set()


def exclusive(lock: threading.Lock, seconds: float | None, fn, *args, **kwargs):
    """Run ``fn`` as one model call: holding ``lock`` (one call at a time on the device) with a current Call."""
    call = Call(seconds)
    with lock, active(call):
        try:
            return fn(*args, **kwargs)
        finally:
            call.end()


def exclusive_iter(lock: threading.Lock, seconds: float | None, make_iterator) -> Iterator:
    """Iterate ``make_iterator()`` as one model call, whichever threads resume it.

    The lock is held until the work has really ended: a consumer that goes away (a cancelled
    Gradio event, a closed HTTP stream) closes this generator once its running step returns, and
    only then may the next call start. The Call is made current around every step, and set when the
    generator is closed, so a loop still running ends at its next token or step.
    """
    call = Call(seconds)
    with lock:
        iterator = make_iterator()
        try:
            while True:
                with active(call):
                    try:
                        value = next(iterator)
                    except StopIteration:
                        return
                yield value
        finally:
            call.stop.set()
            with active(call):
                iterator.close()
            call.end()


def timeout_notice() -> str:
    """The current call's time-cap notice, or ""."""
    call = current()
    return call.notice() if call is not None else ""


def format_bytes(nbytes: float) -> str:
    """GB above 0.1 GB, MB below (so a small amount never reads "0.00 GB")."""
    return f"{nbytes / 1024**3:.2f} GB" if nbytes >= 1024**3 / 10 else f"{nbytes / 1024**2:.1f} MB"


def format_seconds(seconds: float) -> str:
    """"10 min 01 s", "45 s": audio lengths and limits people can compare at a glance."""
    whole = int(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"
