"""Request bodies of the web server: strict JSON, every field typed and bounded.

Owns ``parse_json`` (no NaN / Infinity / out-of-range floats, objects only), ``check_generate``
(a ``/generate`` body -> ``Pipeline.__call__`` keyword arguments plus ``nrow``), the A/B
configuration check ``check_config`` and the small typed readers they share.  Knows the
Pipeline only through ``resolve_params`` (called last, so a request that passes here is one
the Pipeline accepts); knows nothing of HTTP.  Every refusal is a ``RequestError`` whose
message names the field and what was expected.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CONFIG_FIELDS",
    "GENERATE_FIELDS",
    "MAX_SEED",
    "RequestError",
    "check_config",
    "check_generate",
    "parse_json",
]

GENERATE_FIELDS = (
    "n",
    "class_labels",
    "prompt",
    "sampler",
    "steps",
    "guidance_scale",
    "guidance_rescale",
    "guidance_interval",
    "apg",
    "eta",
    "seed",
    "spacing",
    "nrow",
    "negative_prompt",
    "negative_class",
    "height",
    "width",
)
# What an A/B side may change: the sampling settings, the checkpoint and the LoRA strength.
CONFIG_FIELDS = (
    "name",
    "sampler",
    "steps",
    "guidance_scale",
    "guidance_rescale",
    "guidance_interval",
    "apg",
    "eta",
    "spacing",
    "weights",
    "lora_scale",
    "run",
)
MAX_SEED = 2**53 - 1  # the largest integer a browser's JSON numbers hold exactly
MAX_TEXT = 2000  # characters of one prompt


class RequestError(ValueError):
    """A request the server refuses (HTTP 4xx, 400 unless ``status`` says otherwise)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _reject_constant(name: str) -> Any:
    raise RequestError(f"the body holds {name}; numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(f"the number {text} is out of range; numbers must be finite")
    return value


def parse_json(body: bytes) -> dict[str, Any]:
    """A JSON object from ``body`` (empty = ``{}``); NaN, Infinity and overflowing floats
    are refused."""
    try:
        data = json.loads(body or b"{}", parse_constant=_reject_constant, parse_float=_finite_float)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"the body is not JSON: {err}") from None
    except RecursionError:
        raise RequestError("the body is not JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(f"the body must be a JSON object, got {type(data).__name__}")
    return data


def is_number(value: Any) -> bool:
    """An int or a finite float, and not a bool (JSON's true is no number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) if isinstance(value, float) else True


def _integer(data: Mapping[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(f"{key} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def _number(data: Mapping[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if not is_number(value) or not lo <= value <= hi:
        raise RequestError(f"{key} must be a number in {lo:g}..{hi:g}, got {value!r}")
    return float(value)


def _text(data: Mapping[str, Any], key: str, n: int) -> str | list[str] | None:
    value = data.get(key)
    if value is None:
        return None
    texts = [value] if isinstance(value, str) else value
    if not (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)):
        raise RequestError(f"{key} must be a string or a list of {n} strings, got {value!r}")
    if isinstance(value, list) and len(value) != n:
        raise RequestError(f"{key} must be one string or {n} strings (n={n}), got {len(value)}")
    if any(len(t) > MAX_TEXT for t in texts):
        raise RequestError(f"{key} is longer than {MAX_TEXT} characters")
    return value


def _labels(data: Mapping[str, Any], key: str, n: int) -> int | list[int] | None:
    value = data.get(key)
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise RequestError(f"{key} must be an integer or a list of integers, got {value!r}")
    if isinstance(value, list) and len(value) not in (1, n):
        raise RequestError(f"{key} must hold 1 or n={n} labels, got {len(value)}")
    return value


def check_seed(value: Any) -> int:
    """A seed: an integer in 0..2**53-1, or ``"random"`` / -1 for a fresh one."""
    if value is None:
        return 0
    if value == "random" or (
        isinstance(value, int) and not isinstance(value, bool) and value == -1
    ):
        return secrets.randbelow(2**32)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        digits = f" ({len(str(abs(value)))} digits)" if isinstance(value, int) else ""
        raise RequestError(
            f'seed must be an integer in 0..{MAX_SEED} (2**53-1) or "random", got {value!r}{digits}'
        )
    return value


def _sampling_fields(data: Mapping[str, Any], out: dict[str, Any], max_steps: int) -> None:
    """The settings an A/B side shares with ``/generate``: checked into ``out``."""
    from ..samplers import SAMPLERS
    from ..schedules import SPACINGS

    for key in ("sampler", "spacing"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise RequestError(f"{key} must be a string, got {data[key]!r}")
    if data.get("sampler") is not None:
        SAMPLERS.resolve(data["sampler"])  # ValueError listing the choices
        out["sampler"] = data["sampler"]
    if data.get("spacing") is not None:
        if data["spacing"] not in SPACINGS:
            raise RequestError(
                f"unknown spacing {data['spacing']!r} (choices: {', '.join(SPACINGS)})"
            )
        out["spacing"] = data["spacing"]
    for key, (lo, hi) in {
        "guidance_scale": (0.0, 100.0),
        "guidance_rescale": (0.0, 1.0),
        "eta": (0.0, 10.0),
    }.items():
        value = _number(data, key, lo, hi)
        if value is not None:
            out[key] = value
    steps = _integer(data, "steps", 1, max_steps)
    if steps is not None:
        out["steps"] = steps
    interval = data.get("guidance_interval")
    if interval is not None:
        if not (
            isinstance(interval, list) and len(interval) == 2 and all(map(is_number, interval))
        ):
            raise RequestError(f"guidance_interval must be [sigma_lo, sigma_hi], got {interval!r}")
        out["guidance_interval"] = [float(v) for v in interval]
    apg = data.get("apg")
    if apg is not None:
        if not (isinstance(apg, dict) and all(map(is_number, apg.values()))):
            raise RequestError(
                f"apg must be an object of numbers (eta, momentum, ...), got {apg!r}"
            )
        out["apg"] = {k: float(v) for k, v in apg.items()}


def check_generate(
    data: Mapping[str, Any],
    pipe: Any,
    *,
    max_n: int,
    max_steps: int,
    max_side: int,
    extra: tuple[str, ...] = (),
) -> tuple[dict[str, Any], int | None]:
    """``(kwargs for Pipeline.__call__, nrow)`` of a ``/generate`` body; ``extra`` names
    fields the caller reads itself (left out of the kwargs).

    :raises RequestError: an unknown field, a wrong type, a value out of bounds, or anything
        ``pipe.resolve_params`` refuses (a class out of range, an unknown APG option, ...).
    """
    unknown = sorted(set(data) - set(GENERATE_FIELDS) - set(extra))
    if unknown:
        raise RequestError(
            f"unknown field {unknown[0]!r} (allowed: {', '.join(GENERATE_FIELDS + extra)})"
        )
    n = data.get("n", 4)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_n:
        raise RequestError(f"n must be an integer in 1..{max_n}, got {n!r}")
    kwargs: dict[str, Any] = {"n": n, "seed": check_seed(data.get("seed"))}
    _sampling_fields(data, kwargs, max_steps)
    nrow = _integer(data, "nrow", 1, n)
    for key in ("class_labels", "negative_class"):
        labels = _labels(data, key, n)
        if labels is not None:
            kwargs[key] = labels
    for key in ("prompt", "negative_prompt"):
        text = _text(data, key, n)
        if text is not None:
            kwargs[key] = text
    for key in ("height", "width"):
        side = _integer(data, key, 1, max_side)
        if side is not None:
            kwargs[key] = side
    try:
        size = (kwargs.get("height"), kwargs.get("width"))
        probe = {k: v for k, v in kwargs.items() if k not in ("height", "width")}
        pipe.resolve_params(**probe, size=None if size == (None, None) else size)
    except (ValueError, TypeError) as err:
        raise RequestError(str(err)) from None
    _check_condition(kwargs, pipe)
    return kwargs, nrow


def _check_condition(kwargs: Mapping[str, Any], pipe: Any) -> None:
    """The conditioning checks ``Pipeline`` makes only when it samples, made before queueing."""
    text = getattr(pipe, "context_dim", None) is not None
    if "prompt" in kwargs and not text:
        raise RequestError(
            "a prompt was given, but this model has no text conditioning (context_dim=None); "
            "use class_labels"
        )
    if text and "prompt" not in kwargs:
        raise RequestError("this model is text-conditional: pass prompt")
    if "negative_prompt" in kwargs and "prompt" not in kwargs:
        raise RequestError("negative_prompt needs a prompt for the positive side")
    if "negative_class" in kwargs and "class_labels" not in kwargs:
        raise RequestError("negative_class needs class_labels for the positive side")


def check_config(
    data: Any, *, max_steps: int, loras: bool, runs: Sequence[str] = ()
) -> dict[str, Any]:
    """One side of an A/B comparison: sampling settings, ``weights`` (``ema`` / ``raw``,
    the run's two checkpoints), ``lora_scale`` (the strength of the loaded adapters) and
    ``run`` (another model the server was started with, ``difflab serve --compare``), with
    an optional display ``name``."""
    if not isinstance(data, dict):
        raise RequestError(f"an A/B configuration must be an object, got {data!r}")
    unknown = sorted(set(data) - set(CONFIG_FIELDS))
    if unknown:
        raise RequestError(
            f"unknown configuration field {unknown[0]!r} (allowed: {', '.join(CONFIG_FIELDS)})"
        )
    out: dict[str, Any] = {}
    _sampling_fields(data, out, max_steps)
    weights = data.get("weights")
    if weights is not None:
        if weights not in ("ema", "raw"):
            raise RequestError(f"weights must be 'ema' or 'raw', got {weights!r}")
        out["weights"] = weights
    run = data.get("run")
    if run is not None:
        if run not in runs:
            allowed = ", ".join(runs) or "none: start difflab serve with --compare PATH"
            raise RequestError(f"run {run!r} is not one this server compares (allowed: {allowed})")
        out["run"] = run
    scale = _number(data, "lora_scale", -4.0, 4.0)
    if scale is not None:
        if not loras:
            raise RequestError("lora_scale needs a LoRA adapter loaded (difflab serve --lora)")
        out["lora_scale"] = scale
    name = data.get("name")
    if name is not None:
        if not isinstance(name, str) or not 0 < len(name) <= 80:
            raise RequestError(f"name must be a string of 1..80 characters, got {name!r}")
        out["name"] = name
    return out
