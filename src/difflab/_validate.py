"""Argument checks shared by every module: closed choices with did-you-mean messages.

Owns nothing but error wording, so every "unknown X" in difflab reads the same way.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def check_choice(kind: str, value: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``; else raise a ValueError listing them.

    >>> check_choice("spacing", "trailing", ["leading", "trailing"])
    'trailing'
    """
    choices = list(choices)
    if value in choices:
        return value
    raise ValueError(unknown_message(kind, value, choices))


def unknown_message(kind: str, value: object, choices: Iterable[str]) -> str:
    """``unknown sampler 'dpm++2m'; did you mean 'dpmpp_2m'? (choices: ...)``."""
    choices = sorted(choices)
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {value!r}{hint} (choices: {', '.join(choices)})"
