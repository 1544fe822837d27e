"""The KL autoencoder's weights in the original CompVis layout (Rombach et al. 2022,
``ldm/modules/diffusionmodules/model.py``) <-> difflab's (= diffusers' ``AutoencoderKL``).

Owns the key mapping and the config inference for the ``first_stage_model.*`` part of a
Stable Diffusion checkpoint, with that prefix stripped; reading the single checkpoint file
and splitting it between the networks belongs elsewhere.  The two layouts differ in names
only, except the middle attention's q/k/v/proj_out, which are 1x1 convolutions
``[C, C, 1, 1]`` in LDM and linear layers ``[C, C]`` here:

- ``encoder.down.{i}.block.{j}`` / ``.downsample`` -> ``encoder.down_blocks.{i}.resnets.{j}``
  / ``.downsamplers.0``;
- ``decoder.up.{L-1-i}.block.{j}`` / ``.upsample`` -> ``decoder.up_blocks.{i}.resnets.{j}``
  / ``.upsamplers.0`` (LDM numbers the ``L`` up levels from the finest, diffusers in the
  order they run);
- ``{encoder,decoder}.mid.block_{m+1}`` -> ``...mid_block.resnets.{m}``;
- ``...mid.attn_1.{norm,q,k,v,proj_out}`` ->
  ``...mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}``;
- ``{encoder,decoder}.norm_out`` -> ``...conv_norm_out``; ``nin_shortcut`` -> ``conv_shortcut``.

(``conv_in``, ``conv_out``, ``quant_conv``, ``post_quant_conv`` and the residual blocks'
``norm1/conv1/norm2/conv2`` keep their names.)  LDM checkpoints may also carry the
autoencoder's training loss (``loss.*``: LPIPS and discriminator); it is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from ..models.vae import VAEConfig

__all__ = ["vae_config_from_ldm", "vae_state_from_ldm", "vae_state_to_ldm"]

LDM_SCALING_FACTOR = 0.18215  # SD v1/v2's scale_factor (the LDM config's, not in the weights)

# (LDM module path, difflab module path); {p}: encoder/decoder, {i}: level, {u} = L-1-{i}:
# the decoder's level as LDM counts it, {j}: block, {n} = {m}+1: middle block.
_MODULES = [
    ("{p}.norm_out", "{p}.conv_norm_out"),
    ("encoder.down.{i}.block.{j}", "encoder.down_blocks.{i}.resnets.{j}"),
    ("encoder.down.{i}.downsample", "encoder.down_blocks.{i}.downsamplers.0"),
    ("decoder.up.{u}.block.{j}", "decoder.up_blocks.{i}.resnets.{j}"),
    ("decoder.up.{u}.upsample", "decoder.up_blocks.{i}.upsamplers.0"),
    ("{p}.mid.block_{n}", "{p}.mid_block.resnets.{m}"),
    ("{p}.mid.attn_1.norm", "{p}.mid_block.attentions.0.group_norm"),
    ("{p}.mid.attn_1.q", "{p}.mid_block.attentions.0.to_q"),
    ("{p}.mid.attn_1.k", "{p}.mid_block.attentions.0.to_k"),
    ("{p}.mid.attn_1.v", "{p}.mid_block.attentions.0.to_v"),
    ("{p}.mid.attn_1.proj_out", "{p}.mid_block.attentions.0.to_out.0"),
]
_SAME = re.compile(
    r"((encoder|decoder)\.(conv_in|conv_out)|quant_conv|post_quant_conv)\.(weight|bias)"
)
_GROUPS = {"p": r"(?P<p>encoder|decoder)", "i": r"(?P<i>\d+)", "u": r"(?P<u>\d+)",
           "j": r"(?P<j>\d+)", "n": r"(?P<n>[12])", "m": r"(?P<m>[01])"}  # fmt: skip
_LDM_ATTENTION_WEIGHT = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")
_DIFFLAB_ATTENTION_WEIGHT = re.compile(
    r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight"
)


def _pattern(template: str) -> re.Pattern[str]:
    """A module-path template as a regex matching a key's prefix (up to a dot)."""
    body = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
    return re.compile(body.format(**_GROUPS) + r"(?=\.)")


_LDM_TO_DIFFLAB = [(_pattern(a), b) for a, b in _MODULES]
_DIFFLAB_TO_LDM = [(_pattern(b), a) for a, b in _MODULES]
_SHORTCUT = {"LDM": (".nin_shortcut.", ".conv_shortcut."),  # a residual block's 1x1 conv
             "difflab": (".conv_shortcut.", ".nin_shortcut.")}  # fmt: skip


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]], levels: int, layout: str) -> str:
    """``key`` with its module path rewritten by the first rule that matches."""
    for pattern, target in rules:
        match = pattern.match(key)
        if match is None:
            continue
        values = {k: v for k, v in match.groupdict().items() if v is not None}
        if "u" in values:  # LDM counts the decoder's levels from the finest
            values["i"] = str(levels - 1 - int(values["u"]))
        if "i" in values:
            values["u"] = str(levels - 1 - int(values["i"]))
        if "n" in values:
            values["m"] = str(int(values["n"]) - 1)
        if "m" in values:
            values["n"] = str(int(values["m"]) + 1)
        key = target.format(**values) + key[match.end() :].replace(*_SHORTCUT[layout])
        break
    else:
        if not _SAME.fullmatch(key):
            raise ValueError(
                f"unexpected key {key!r} in a {layout} autoencoder state (keys of the "
                "first_stage_model.* part of an SD checkpoint, with that prefix stripped)"
            )
    return key


def _levels(state: Mapping[str, Tensor], pattern: str, layout: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    if not found or found != set(range(len(found))):
        raise ValueError(
            f"the {layout} autoencoder state has encoder levels {sorted(found)}; expected "
            f"keys matching {pattern!r} numbered from 0"
        )
    return len(found)


def vae_state_from_ldm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """difflab's (= diffusers') ``AutoencoderKL`` state from an LDM ``first_stage_model``
    state with the prefix stripped (see the module docstring); ``loss.*`` is dropped."""
    if any(k.startswith("first_stage_model.") for k in state):
        raise ValueError("strip the 'first_stage_model.' prefix from the LDM autoencoder's keys")
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    levels = _levels(state, r"encoder\.down\.(\d+)\.", "LDM")
    out = {}
    for key, value in state.items():
        if _LDM_ATTENTION_WEIGHT.fullmatch(key) and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv -> linear
        out[_rename(key, _LDM_TO_DIFFLAB, levels, "LDM")] = value
    return out


def vae_state_to_ldm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The LDM ``first_stage_model`` state (prefix stripped) of a difflab/diffusers
    ``AutoencoderKL`` state: the inverse of :func:`vae_state_from_ldm`."""
    levels = _levels(state, r"encoder\.down_blocks\.(\d+)\.", "difflab")
    out = {}
    for key, value in state.items():
        if _DIFFLAB_ATTENTION_WEIGHT.fullmatch(key) and value.ndim == 2:
            value = value[:, :, None, None]  # linear -> 1x1 conv
        out[_rename(key, _DIFFLAB_TO_LDM, levels, "difflab")] = value
    return out


def _get(state: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise ValueError(
            f"the LDM autoencoder state lacks {key!r} (expected the keys of an SD checkpoint's "
            "first_stage_model.*, with that prefix stripped)"
        )
    return state[key]


def vae_config_from_ldm(
    state: Mapping[str, Tensor], *, scaling_factor: float | None = None, norm_groups: int = 32
) -> VAEConfig:
    """The :class:`VAEConfig` of an LDM ``first_stage_model`` state, read from its keys and
    shapes.  ``scaling_factor`` is not in the weights (LDM's config ``scale_factor``; None:
    SD's 0.18215); nor is the GroupNorm group count (32 in every LDM autoencoder)."""
    levels = _levels(state, r"encoder\.down\.(\d+)\.", "LDM")
    widths = tuple(
        int(_get(state, f"encoder.down.{i}.block.0.conv1.weight").shape[0]) for i in range(levels)
    )
    blocks = {
        int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))
    }
    up_blocks = {
        int(m.group(1)) for k in state if (m := re.match(r"decoder\.up\.0\.block\.(\d+)\.", k))
    }
    if len(up_blocks) != len(blocks) + 1:
        raise ValueError(
            f"the LDM decoder has {len(up_blocks)} blocks per level, the encoder {len(blocks)}; "
            "expected one more in the decoder"
        )
    return VAEConfig(
        in_channels=int(_get(state, "encoder.conv_in.weight").shape[1]),
        out_channels=int(_get(state, "decoder.conv_out.weight").shape[0]),
        block_out_channels=widths,
        layers_per_block=len(blocks),
        latent_channels=int(_get(state, "post_quant_conv.weight").shape[0]),
        norm_groups=norm_groups,
        scaling_factor=LDM_SCALING_FACTOR if scaling_factor is None else float(scaling_factor),
        mid_attention="encoder.mid.attn_1.q.weight" in state,
    )
