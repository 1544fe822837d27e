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


def check_keys(kind: str, keys: Iterable[str], known: Iterable[str]) -> None:
    """Raise ``ValueError`` for keys outside ``known``, each with a did-you-mean hint:
    ``unknown UNetConfig key(s): 'chanel_mult' (did you mean 'channel_mult'?); valid keys: ...``."""
    known = list(known)
    unknown = [k for k in keys if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        valid = ", ".join(known)
        raise ValueError(f"unknown {kind} key(s): {', '.join(hints)}; valid keys: {valid}")
