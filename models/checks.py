"""The one home of request validation: numbers, choices, text, names, models and conversations.

Values may arrive from the API as anything (strings, NaN, booleans, None, lists, lone surrogates);
each check returns a clean value or raises ``InvalidRequest`` with a message that names the field,
the rule and (cut to about 200 characters) what was sent. Tabs, the API and training all use these.
"""

from __future__ import annotations

import math
import re

from models.errors import InvalidRequest, TooLarge, UnknownModel, WrongTask, quote

CHAT_ROLES = ("system", "user", "assistant")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_number(name: str, value, low: float, high: float, integer: bool = False, context: str = ""):
    """``value`` as an int (``integer``) or float within [low, high], else InvalidRequest.

    ``context`` is appended to the limits, e.g. " for tiny-sd" or " (-1 picks a random seed)".
    """
    expected = f"{name} must be a number between {low} and {high}{context}"
    if isinstance(value, bool) or value is None:
        raise InvalidRequest(expected)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"{expected}, got {quote(value)}") from None
    if math.isnan(number):
        raise InvalidRequest(f"{expected}, got NaN")
    if not low <= number <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}{context}, got {quote(value)}")
    if integer:
        if number != int(number):
            raise InvalidRequest(f"{name} must be a whole number, got {quote(value)}")
        return int(number)
    return number


def check_choice(name: str, value, choices):
    """``value`` if it is one of ``choices``, else InvalidRequest listing them."""
    try:
        allowed = value in choices
    except TypeError:  # an unhashable value against a dict or set of choices
        allowed = False
    if not allowed:
        raise InvalidRequest(f"{name} must be one of {list(choices)}, got {quote(value)}")
    return value


def check_flag(name: str, value) -> bool:
    """A yes/no value: True, False (or 1, 0); never a string such as "false", which is truthy."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InvalidRequest(f"{name} must be true or false, got {quote(value, 80)}")


def check_text(name: str, value, max_chars: int, required: bool = True, empty_message: str = "") -> str:
    """Stripped text of at most ``max_chars`` that encodes as UTF-8 (no lone surrogates)."""
    if value is None:
        if required:
            raise InvalidRequest(empty_message or f"{name} is empty.")
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be text, got {type(value).__name__}")
    text = value.strip()
    if required and not text:
        raise InvalidRequest(empty_message or f"{name} is empty.")
    if len(text) > max_chars:
        raise TooLarge(f"{name} is {len(text):,} characters; the limit is {max_chars:,}. Shorten it.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{name} holds invalid Unicode (a lone surrogate at character {exc.start}); "
                             "send it as UTF-8 text.") from None
    if "\x00" in text:
        raise InvalidRequest(f"{name} contains a NUL character; remove it.")
    return text


def check_name(name: str, value, what: str = "names") -> str:
    """A file-system-safe name: letters, digits, '.', '_' or '-', 1 to 64 characters, not starting with '.'."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise InvalidRequest(f"{name} must be 1 to 64 letters, digits, '.', '_' or '-' (not starting with "
                             f"'.' or '-'), as {what} are; got {quote(value, 80)}")
    return value


def check_model(catalog, model_id, task: str):
    """The catalog entry of ``model_id``, which must exist and do ``task``; InvalidRequest otherwise."""
    from models.catalog import TASK_LABELS

    if not isinstance(model_id, str) or model_id not in catalog:
        raise UnknownModel(f"Unknown model {quote(model_id, 100)}. {TASK_LABELS.get(task, task)} models: "
                             f"{', '.join(catalog.ids(task))}")
    spec = catalog.get(model_id)
    if spec.task != task:
        raise WrongTask(f"{model_id} is a {spec.task} model; choose one of: {', '.join(catalog.ids(task))}")
    return spec


def check_messages(messages, limits, roles: tuple[str, ...] = ("user", "assistant"), what: str = "history",
                   required: bool = False) -> list[dict]:
    """A clean copy of a messages-format conversation: ``[{"role": ..., "content": text}, ...]``.

    Args:
        messages: what was sent (None or "" is an empty conversation unless ``required``).
        limits: ``models.limits.Limits``: turn count, characters per message and in total.
        roles: the roles accepted here (a system prompt has its own field in the tabs).
        what: the name used in messages ("history", "messages").
        required: refuse an empty conversation.
    """
    if messages is None or messages == "":
        messages = []
    if not isinstance(messages, list):
        raise InvalidRequest(f"{what} must be a list of {{role, content}} messages, got {type(messages).__name__}")
    if required and not messages:
        raise InvalidRequest(f"{what} must not be empty")
    if len(messages) > limits.history_turns:
        raise TooLarge(f"{what} has {len(messages):,} messages; the limit is {limits.history_turns:,}. "
                       "Start a new conversation or send fewer earlier turns.")
    clean, total = [], 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in roles:
            raise InvalidRequest(f"{what} message {index} must be {{'role': {' | '.join(roles)}, "
                                 f"'content': text}}, got {quote(message, 100)}")
        content = check_text(f"{what} message {index}", message.get("content"), limits.text_chars, required=False)
        total += len(content)
        clean.append({"role": message["role"], "content": content})
    if total > limits.history_chars:
        raise TooLarge(f"{what} holds {total:,} characters; the limit is {limits.history_chars:,}. "
                       "Start a new conversation.")
    return clean
