"""The sampler registry: canonical names, front-end aliases, and option checks.

Owns: ``SAMPLERS`` (a read-only mapping canonical name -> ``SamplerSpec``, gathered from the
``SPECS`` list of every algorithm module), alias lookup (A1111 / ComfyUI display names,
k-diffusion's ``k_*`` names, diffusers scheduler class names; case-insensitive), ``resolve``
(name -> spec + the spacing an alias implies) and ``check_options`` (user options against
the sampler function's keyword-only parameters).  Knows nothing of the algorithms' maths.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

from .._validate import unknown_message
from . import ddpm, dpm_solver, dpmpp, flow, karras, pndm, unipc
from .common import SamplerSpec

__all__ = [
    "OWN_GRID",
    "SAMPLERS",
    "SamplerRegistry",
    "check_options",
    "resolve",
    "sampler_options",
]


_MODULES = (ddpm, pndm, karras, dpm_solver, dpmpp, unipc, flow)

# Samplers that use only the two ends of ``levels`` and place their own intermediate levels
# (DPM-Solver-fast's order schedule, DPM-Solver's adaptive step size, Lu et al. 2022 §3.4):
# "N steps visit the N given timesteps" does not hold for them.
OWN_GRID: frozenset[str] = frozenset({"dpm_fast", "dpm_adaptive"})

# Keyword-only parameters every sampler has that ``dl.sample`` fills itself: not user options.
_RESERVED = frozenset({"cond", "callback", "generator"})

# Front-end names (A1111 display names, ComfyUI names, k-diffusion / old A1111 ``k_`` names,
# diffusers scheduler classes) -> (canonical name, implied spacing or None = the default).
# Entries whose canonical name is not registered are ignored.  Lookup is case-insensitive.
_FRONT_END: dict[str, tuple[str, str | None]] = {
    # A1111 (k-diffusion samplers; "Karras" / "Exponential" suffixes imply the sigma grid)
    "Euler a": ("euler_ancestral", None),
    "Euler": ("euler", None),
    "LMS": ("lms", None),
    "LMS Karras": ("lms", "karras"),
    "Heun": ("heun", None),
    "Heun Karras": ("heun", "karras"),
    "Euler Karras": ("euler", "karras"),
    "Euler a Karras": ("euler_ancestral", "karras"),
    "DPM2": ("dpm_2", None),
    "DPM2 Karras": ("dpm_2", "karras"),
    "DPM2 a": ("dpm_2_ancestral", None),
    "DPM2 a Karras": ("dpm_2_ancestral", "karras"),
    "DPM++ 2S a": ("dpmpp_2s_ancestral", None),
    "DPM++ 2S a Karras": ("dpmpp_2s_ancestral", "karras"),
    "DPM++ 2M": ("dpmpp_2m", None),
    "DPM++ 2M Karras": ("dpmpp_2m", "karras"),
    "DPM++ 3M": ("dpmpp_3m", None),
    "DPM++ 3M Karras": ("dpmpp_3m", "karras"),
    "DPM++ SDE": ("dpmpp_sde", None),
    "DPM++ SDE Karras": ("dpmpp_sde", "karras"),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", None),
    "DPM++ 2M SDE Karras": ("dpmpp_2m_sde", "karras"),
    "DPM++ 2M SDE Exponential": ("dpmpp_2m_sde", "exponential"),
    "DPM++ 3M SDE": ("dpmpp_3m_sde", None),
    "DPM++ 3M SDE Karras": ("dpmpp_3m_sde", "karras"),
    "DPM++ 3M SDE Exponential": ("dpmpp_3m_sde", "exponential"),
    "DPM fast": ("dpm_fast", None),
    "DPM adaptive": ("dpm_adaptive", None),
    "DDIM": ("ddim", None),
    "DDPM": ("ddpm", None),
    "PLMS": ("plms", None),
    "PNDM": ("pndm", None),
    "UniPC": ("unipc", None),
    "DPM-Solver": ("dpm_solver", None),
    "DPM-Solver++": ("dpmpp_2m", None),
    # ComfyUI names that differ from difflab's
    "uni_pc": ("unipc", None),
    "uni_pc_bh2": ("unipc", None),
    # k-diffusion function names and old A1111 internal names
    "k_euler": ("euler", None),
    "k_euler_a": ("euler_ancestral", None),
    "k_euler_ancestral": ("euler_ancestral", None),
    "k_heun": ("heun", None),
    "k_lms": ("lms", None),
    "k_dpm_2": ("dpm_2", None),
    "k_dpm_2_a": ("dpm_2_ancestral", None),
    "k_dpm_2_ancestral": ("dpm_2_ancestral", None),
    "k_dpmpp_2s_a": ("dpmpp_2s_ancestral", None),
    "k_dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", None),
    "k_dpmpp_2m": ("dpmpp_2m", None),
    "k_dpmpp_sde": ("dpmpp_sde", None),
    "k_dpmpp_2m_sde": ("dpmpp_2m_sde", None),
    "k_dpmpp_3m_sde": ("dpmpp_3m_sde", None),
    "k_dpm_fast": ("dpm_fast", None),
    "k_dpm_adaptive": ("dpm_adaptive", None),
    # diffusers scheduler classes (their default algorithm)
    "DDPMScheduler": ("ddpm", None),
    "DDIMScheduler": ("ddim", None),
    "PNDMScheduler": ("pndm", None),
    "EulerDiscreteScheduler": ("euler", None),
    "EulerAncestralDiscreteScheduler": ("euler_ancestral", None),
    "HeunDiscreteScheduler": ("heun", None),
    "KDPM2DiscreteScheduler": ("dpm_2", None),
    "KDPM2AncestralDiscreteScheduler": ("dpm_2_ancestral", None),
    "LMSDiscreteScheduler": ("lms", None),
    "DPMSolverMultistepScheduler": ("dpmpp_2m", None),
    "DPMSolverSDEScheduler": ("dpmpp_sde", None),
    "UniPCMultistepScheduler": ("unipc", None),
}


def _key(name: str) -> str:
    """Lookup key: case-insensitive, surrounding and repeated blanks ignored."""
    return " ".join(name.split()).lower()


class SamplerRegistry(Mapping[str, SamplerSpec]):
    """Read-only mapping canonical name -> ``SamplerSpec`` that also answers to aliases.

    Iteration, ``len`` and ``keys()`` cover canonical names only (each algorithm once);
    ``registry[name]`` and ``name in registry`` also accept any alias, case-insensitively.
    """

    def __init__(self, specs: Iterable[SamplerSpec]):
        by_name: dict[str, SamplerSpec] = {}
        for spec in specs:
            if spec.name in by_name:
                raise ValueError(f"sampler {spec.name!r} is registered twice")
            by_name[spec.name] = spec
        self._specs = MappingProxyType(by_name)
        lookup: dict[str, tuple[str, str | None]] = {}

        def add(alias: str, target: str, spacing: str | None) -> None:
            key = _key(alias)
            old = lookup.get(key)
            if old is not None and old != (target, spacing):
                raise ValueError(
                    f"alias {alias!r} means both {old[0]!r} ({old[1]}) and {target!r} ({spacing})"
                )
            lookup[key] = (target, spacing)

        for spec in by_name.values():
            add(spec.name, spec.name, None)
        for spec in by_name.values():
            for alias, spacing in spec.aliases.items():
                add(alias, spec.name, spacing)
        for alias, (target, spacing) in _FRONT_END.items():
            if target in by_name and _key(alias) not in lookup:
                add(alias, target, spacing)
        self._lookup = MappingProxyType(lookup)

    def __getitem__(self, name: str) -> SamplerSpec:
        return self.resolve(name)[0]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _key(name) in self._lookup

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"SamplerRegistry({', '.join(self._specs)})"

    @property
    def aliases(self) -> Mapping[str, tuple[str, str | None]]:
        """Every accepted name (lower-cased) -> (canonical name, implied spacing or None)."""
        return self._lookup

    def resolve(self, name: str | SamplerSpec) -> tuple[SamplerSpec, str | None]:
        """``(spec, implied_spacing)`` for a canonical name or alias; ValueError if unknown.

        >>> SAMPLERS.resolve("DPM++ 2M Karras")[1]
        'karras'
        """
        if isinstance(name, SamplerSpec):
            return name, None
        if not isinstance(name, str):
            raise ValueError(f"sampler must be a name (str), got {type(name).__name__}")
        hit = self._lookup.get(_key(name))
        if hit is None:
            raise ValueError(unknown_message("sampler", name, self._specs))
        target, spacing = hit
        return self._specs[target], spacing


SAMPLERS = SamplerRegistry(spec for module in _MODULES for spec in module.SPECS)


def resolve(name: str | SamplerSpec) -> tuple[SamplerSpec, str | None]:
    """``SAMPLERS.resolve``: (spec, the spacing its alias implies or None)."""
    return SAMPLERS.resolve(name)


def sampler_options(spec: SamplerSpec) -> dict[str, Any] | None:
    """The user options ``spec.fn`` accepts -> their defaults (None if it takes ``**kwargs``)."""
    params = inspect.signature(spec.fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {
        p.name: p.default
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _RESERVED
    }


def check_options(spec: SamplerSpec, options: Mapping[str, Any]) -> None:
    """Raise ValueError naming the sampler and its accepted options for any unused option."""
    accepted = sampler_options(spec)
    if accepted is None:
        return
    bad = [k for k in options if k not in accepted]
    if bad:
        takes = ", ".join(sorted(accepted)) or "none"
        raise ValueError(
            f"sampler {spec.name!r} does not take option(s) {', '.join(map(repr, bad))} "
            f"(its options: {takes})"
        )
