"""Validation of numbers that may arrive from the API as anything (strings, NaN, booleans, None)."""

from __future__ import annotations

import math


def check_number(name: str, value, low: float, high: float, integer: bool = False, context: str = ""):
    """``value`` as an int (``integer``) or float within [low, high], else a ValueError for the user.

    ``context`` is appended to the limits, e.g. " for tiny-sd" or " (-1 picks a random seed)".
    """
    expected = f"{name} must be a number between {low} and {high}{context}"
    if isinstance(value, bool) or value is None:
        raise ValueError(expected)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{expected}, got {value!r}") from None
    if math.isnan(number):
        raise ValueError(f"{expected}, got NaN")
    if not low <= number <= high:
        raise ValueError(f"{name} must be between {low} and {high}{context}, got {value!r}")
    if integer:
        if number != int(number):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return int(number)
    return number
