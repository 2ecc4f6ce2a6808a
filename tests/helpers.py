"""Helpers shared by the tests: text normalisation and word error rate for speech round trips."""

from __future__ import annotations

import re
import unicodedata

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(number: int) -> str:
    """English words for 0 <= number < 1 000 000 ("forty two", "three hundred five")."""
    if number < 20:
        return _ONES[number]
    if number < 100:
        tens, ones = divmod(number, 10)
        return _TENS[tens] + (f" {_ONES[ones]}" if ones else "")
    if number < 1000:
        hundreds, rest = divmod(number, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")
    thousands, rest = divmod(number, 1000)
    return f"{number_words(thousands)} thousand" + (f" {number_words(rest)}" if rest else "")


_CONTRACTIONS = [(r"\b(what|where|who|how|it|that|there|here|he|she)'s\b", r"\1 is"), (r"\bcan't\b", "cannot"),
                 (r"\bwon't\b", "will not"), (r"n't\b", " not"), (r"'re\b", " are"), (r"\bi'm\b", "i am"),
                 (r"'ll\b", " will"), (r"'ve\b", " have"), (r"'d\b", " would")]


def normalize(text: str) -> list[str]:
    """Lower-case words without punctuation, contractions expanded, digits spelled out.

    "It's 42." -> ["it", "is", "forty", "two"]
    """
    text = unicodedata.normalize("NFKC", text).lower().replace(",", "").replace("’", "'")
    for pattern, replacement in _CONTRACTIONS:
        text = re.sub(pattern, replacement, text)
    text = re.sub(r"\d+", lambda match: f" {number_words(int(match.group()))} ", text)
    text = text.replace("-", " ").replace("'", "")
    return re.sub(r"[^\w\s]", " ", text).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over normalised words, divided by the reference's word count."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, 1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word))
        previous = current
    return previous[-1] / max(1, len(ref))
