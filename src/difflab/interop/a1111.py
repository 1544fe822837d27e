"""AUTOMATIC1111's ``parameters`` text: difflab's generation parameters in the web UI's format.

Owns ``format_parameters`` (difflab's resolved parameters -> A1111's text) and
``parse_parameters`` (A1111's text -> difflab's parameter names), the two-way table of A1111
sampler names and the mapping of A1111's schedule types onto difflab's spacings.  Sampler
names are resolved through ``difflab.samplers.SAMPLERS``; this module knows no sampler maths
and no PNG files (``difflab.images`` stores the text in a PNG ``parameters`` tEXt chunk).

The format, as the web UI writes it into every PNG (``modules/processing.py``,
``create_infotext``) and reads it back in its "PNG Info" tab::

    <prompt, possibly several lines>
    Negative prompt: <negative prompt, possibly several lines>
    Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x512, Model: name

The last line is ``key: value`` pairs separated by ``", "``; a value holding a comma, colon,
quote or newline is written as a JSON string (``Lora hashes: "a: 1f2e, b: 3d4c"``).  Older
versions put the schedule in the sampler's name (``DPM++ 2M Karras``); 1.9 and later write
``Sampler: DPM++ 2M, Schedule type: Karras``.  Both are read; the older, more widely read
form is written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._validate import unknown_message
from ..samplers.registry import SAMPLERS

__all__ = ["A1111_SAMPLERS", "SCHEDULE_TYPES", "format_parameters", "parse_parameters"]

# difflab sampler -> A1111's display name (the k-diffusion and compvis samplers of the web
# UI).  difflab samplers the web UI lacks are written under an alias the registry reads back.
A1111_SAMPLERS: dict[str, str] = {
    "euler_ancestral": "Euler a",
    "euler": "Euler",
    "lms": "LMS",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a",
    "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "dpm_fast": "DPM fast",
    "dpm_adaptive": "DPM adaptive",
    "ddim": "DDIM",
    "plms": "PLMS",
    "unipc": "UniPC",
    # not in the web UI (forks and other front ends use these names)
    "ddpm": "DDPM",
    "pndm": "PNDM",
    "dpmpp_3m": "DPM++ 3M",
    "dpm_solver": "DPM-Solver",
}

# A1111 1.9+ "Schedule type" -> difflab spacing (None: the sampler's default); read
# case-insensitively.
# "Uniform" (k-diffusion's ``get_sigmas``: t evenly from T-1 to 0) and "SGM Uniform" (N of
# the N+1 evenly spaced t from T-1 to 0, the last dropped) are difflab's ``linspace`` and
# ``trailing`` up to the rounding of t to integers.
SCHEDULE_TYPES: dict[str, str | None] = {
    "Automatic": None,
    "Karras": "karras",
    "Exponential": "exponential",
    "Uniform": "linspace",
    "SGM Uniform": "trailing",
}

# Keys difflab writes that A1111 does not know (the web UI keeps unknown keys as they are).
SPACING_KEY = "Spacing"
_RESCALE_KEYS = ("CFG Rescale", "CFG Rescale phi", "Rescale CFG")  # extensions' names
_ETA_KEYS = ("Eta", "Eta DDIM")
_REQUIRED = ("sampler", "steps", "seed")
_CLASS_PROMPT = re.compile(r"class (\d+)")
# One ``key:`` of the parameters line: a word, then words, blanks and - / . ( ) + '.
_KEY = re.compile(r"\s*(\w[\w \-/.()+']*?)\s*:\s*")


def can_format(params: Mapping[str, Any]) -> bool:
    """Whether ``params`` hold what the A1111 line needs: a registered sampler (or alias),
    integer steps and seed."""
    sampler, steps, seed = (params.get(key) for key in _REQUIRED)
    numbers = all(isinstance(v, int) and not isinstance(v, bool) for v in (steps, seed))
    return numbers and isinstance(sampler, str) and sampler in SAMPLERS


def format_parameters(params: Mapping[str, Any]) -> str:
    """A1111's ``parameters`` text for difflab's resolved parameters.

    ``params`` are ``Pipeline.resolve_params``' keys (``sampler``, ``spacing``, ``steps``,
    ``guidance_scale``, ``seed``, ``prompt``, ``negative_prompt``, ``class_labels``, ``eta``,
    ``guidance_rescale``, ``strength``, ``run``, ``difflab_version``), plus ``width`` and
    ``height`` of one image for the ``Size`` field.  As the web UI does for a batch, the text
    describes the first image: its prompt and its seed (image ``i`` of a difflab call uses
    ``seed + i``).  A class-conditional run's label is written as the prompt ``class K``
    (``parse_parameters`` reads it back as ``class_labels=[K]``).  A spacing that no A1111
    sampler name or schedule type expresses goes in an extra ``Spacing`` field.

    :raises ValueError: ``sampler``, ``steps`` or ``seed`` missing, or an unknown sampler.
    """
    missing = [key for key in _REQUIRED if params.get(key) is None]
    if missing:
        raise ValueError(f"A1111 parameters need {', '.join(missing)}; got {sorted(params)}")
    fields: dict[str, Any] = {"Steps": int(params["steps"])}
    fields.update(_sampler_fields(params["sampler"], params.get("spacing")))
    if params.get("guidance_scale") is not None:
        fields["CFG scale"] = _number(params["guidance_scale"])
    fields["Seed"] = int(params["seed"])
    if params.get("width") is not None and params.get("height") is not None:
        fields["Size"] = f"{int(params['width'])}x{int(params['height'])}"
    if params.get("run"):
        fields["Model"] = Path(str(params["run"])).name
    if params.get("clip_skip") is not None:
        fields["Clip skip"] = int(params["clip_skip"])
    if params.get("strength") is not None:
        fields["Denoising strength"] = _number(params["strength"])
    if params.get("eta") is not None:
        fields["Eta"] = _number(params["eta"])
    if params.get("guidance_rescale"):
        fields["CFG Rescale"] = _number(params["guidance_rescale"])
    if params.get("difflab_version"):
        fields["Version"] = f"difflab {params['difflab_version']}"
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in fields.items())
    negative = _first(params.get("negative_prompt"))
    negative = f"\nNegative prompt: {negative}" if negative else ""
    return f"{_prompt_line(params)}{negative}\n{line}".strip()


def parse_parameters(text: str) -> dict[str, Any]:
    """difflab's parameters from A1111's ``parameters`` text.

    Returns the keys found among ``prompt`` (``None`` when empty), ``negative_prompt``,
    ``class_labels`` (``[K]`` for the prompt ``class K``), ``steps``, ``sampler`` (difflab's
    canonical name), ``spacing`` (from a ``Karras`` / ``Exponential`` name suffix, ``Schedule
    type`` or difflab's ``Spacing``), ``guidance_scale``, ``seed``, ``width``, ``height``,
    ``eta``, ``guidance_rescale``, ``strength`` (img2img's ``Denoising strength``; with Hires
    fix it is the upscaling pass's and stays in ``extra``), ``clip_skip``, ``model``,
    ``model_hash``, ``n`` (1: the text describes one image) and ``extra``: every other field
    (Hires fix, ADetailer, Lora hashes, Version, ...) as its raw string, quotes removed.

    :raises ValueError: an unknown sampler or schedule type (listing the accepted names), or
        a field that does not hold the number it should.
    """
    lines = text.strip().replace("\r\n", "\n").split("\n")
    fields = _fields(lines[-1])
    if len(fields) >= 3 or "Steps" in fields:  # else the last line is still prompt text
        lines = lines[:-1]
    else:
        fields = {}
    prompt: list[str] = []
    negative: list[str] | None = None
    for line in lines:
        if negative is None and line.startswith("Negative prompt:"):
            negative = [line[len("Negative prompt:") :].strip()]
        elif negative is not None:
            negative.append(line)
        else:
            prompt.append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt).strip() or None, "n": 1}
    match = _CLASS_PROMPT.fullmatch(out["prompt"] or "")
    if match:
        out.update(prompt=None, class_labels=[int(match.group(1))])
    if negative is not None:
        out["negative_prompt"] = "\n".join(negative).strip()
    out.update(_known_fields(fields))
    return out


# ------------------------------------------------------------------ formatting helpers
def _sampler_fields(sampler: str, spacing: Any) -> dict[str, Any]:
    """``Sampler`` (and ``Schedule type`` or ``Spacing``) for a difflab sampler + spacing."""
    spec, _ = SAMPLERS.resolve(sampler)
    name = A1111_SAMPLERS.get(spec.name, spec.name)
    if spacing is None or spacing == spec.default_spacing:
        return {"Sampler": name}
    if spacing in ("karras", "exponential"):
        suffixed = f"{name} {spacing.title()}"
        if suffixed in SAMPLERS:
            other, implied = SAMPLERS.resolve(suffixed)
            if (other.name, implied) == (spec.name, spacing):
                return {"Sampler": suffixed}
        return {"Sampler": name, "Schedule type": spacing.title()}
    if not isinstance(spacing, str):  # a custom timestep list
        spacing = json.dumps([float(t) for t in spacing])
    return {"Sampler": name, SPACING_KEY: spacing}


def _prompt_line(params: Mapping[str, Any]) -> str:
    """The first image's prompt, or ``class K`` for its class label, or ``""``."""
    prompt = _first(params.get("prompt", params.get("prompts")))
    if prompt is not None:
        return str(prompt)
    label = _first(params.get("class_labels"))
    return "" if label is None else f"class {int(label)}"


def _first(value: Any) -> Any:
    """The first element of a list or tuple, the value itself otherwise."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _number(value: Any) -> str:
    """A float as A1111 shows it: ``7`` for 7.0, ``7.5``; exact (``repr``) otherwise."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _quote(value: Any) -> str:
    """A field value, as a JSON string when it holds a separator (, : newline or quote)."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if re.search(r'[,:\n"]', text) else text


# ------------------------------------------------------------------ parsing helpers
def _fields(line: str) -> dict[str, str]:
    """``key: value`` pairs of A1111's last line, in order; quoted values unquoted.

    A segment without a key (e.g. a bare word) is skipped up to the next comma.
    """
    out: dict[str, str] = {}
    pos, end = 0, len(line)
    decoder = json.JSONDecoder()
    while pos < end:
        key = _KEY.match(line, pos)
        if key is None:
            comma = line.find(",", pos)
            pos = end if comma < 0 else comma + 1
            continue
        pos = key.end()
        value: str | None = None
        if line.startswith('"', pos):
            try:
                value, pos = decoder.raw_decode(line, pos)
            except json.JSONDecodeError:
                value = None
        if value is None:
            comma = line.find(",", pos)
            stop = end if comma < 0 else comma
            value, pos = line[pos:stop].strip(), stop
        out[key.group(1)] = str(value)
        while pos < end and line[pos] in " ,":  # the separator
            pos += 1
    return out


def _known_fields(fields: Mapping[str, str]) -> dict[str, Any]:
    """A1111 fields -> difflab's names; the rest under ``extra`` as raw strings."""
    extra = dict(fields)
    out: dict[str, Any] = {}

    def take(key: str, name: str, kind: Any) -> None:
        if key in extra:
            out[name] = _convert(key, extra.pop(key), kind)

    take("Steps", "steps", int)
    take("CFG scale", "guidance_scale", float)
    take("Seed", "seed", int)
    take("Clip skip", "clip_skip", int)
    take("Model", "model", str)
    take("Model hash", "model_hash", str)
    for key in _ETA_KEYS:
        take(key, "eta", float)
    for key in _RESCALE_KEYS:
        take(key, "guidance_rescale", float)
    if not any(key.startswith("Hires") for key in extra):  # else it is the upscaling pass's
        take("Denoising strength", "strength", float)
    if "Size" in extra:
        out["width"], out["height"] = _size(extra.pop("Size"))
    sampler, spacing = extra.pop("Sampler", None), None
    if sampler is not None:
        out["sampler"], spacing = _resolve_sampler(sampler)
    schedule = extra.pop("Schedule type", None)
    if schedule is not None:
        known = {name.lower(): value for name, value in SCHEDULE_TYPES.items()}
        if schedule.lower() not in known:
            raise ValueError(unknown_message("A1111 schedule type", schedule, SCHEDULE_TYPES))
        spacing = known[schedule.lower()] or spacing
    own = extra.pop(SPACING_KEY, None)
    if own is not None:
        spacing = json.loads(own) if own.startswith("[") else own
    if spacing is not None:
        out["spacing"] = spacing
    out["extra"] = extra
    return out


def _resolve_sampler(name: str) -> tuple[str, str | None]:
    """(difflab sampler, implied spacing) for an A1111 sampler name; ValueError if unknown."""
    if name not in SAMPLERS:
        raise ValueError(unknown_message("A1111 sampler", name, A1111_SAMPLERS.values()))
    spec, spacing = SAMPLERS.resolve(name)
    return spec.name, spacing


def _convert(key: str, text: str, kind: Any) -> Any:
    try:
        return kind(text)
    except ValueError:
        what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
        raise ValueError(f"A1111 parameters: {key!r} must be {what}, got {text!r}") from None


def _size(text: str) -> tuple[int, int]:
    """``"512x768"`` -> ``(512, 768)`` (width, height)."""
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
    if match is None:
        raise ValueError(f"A1111 parameters: 'Size' must be WIDTHxHEIGHT, got {text!r}")
    return int(match.group(1)), int(match.group(2))
