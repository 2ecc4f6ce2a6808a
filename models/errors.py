"""The errors whose message is meant for the person who made the request.

Core code (``models/``, ``finetune/``) raises these with a concise message that says what to do;
the tabs and the API show exactly that message. Any other exception is a bug: it is logged with
its traceback and the user gets a short "internal error" that says where the log is.
"""

from __future__ import annotations


class UserError(Exception):
    """A message for the user: what they sent was wrong, or what the machine lacks, or try later."""


class InvalidRequest(UserError, ValueError):
    """What was sent is not acceptable: a value out of range, a wrong type, a bad file."""


class UnknownModel(InvalidRequest):
    """The model id is not in the catalog."""


class WrongTask(InvalidRequest):
    """The model exists but does another task (a chat model asked to answer about an image...)."""


class TooLarge(InvalidRequest):
    """The request is over a limit (file size, pixels, seconds of audio, rows, tokens, characters)."""


class Unavailable(UserError, RuntimeError):
    """The machine lacks what the request needs: a package, a model's files, espeak-ng, CUDA."""


class Busy(UserError, RuntimeError):
    """The request is fine but cannot run now (memory held by calls in progress); try again shortly."""


def quote(value, limit: int = 200) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for error messages that echo what was sent."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"
