"""Stable Diffusion checkpoints as difflab networks: diffusers folders and original single files.

Owns: telling what a path holds (a difflab run, a diffusers folder with ``model_index.json``,
an original-layout ``.safetensors`` file), reading diffusers' weight files (plain, ``fp16``
variants, sharded with an index), detecting the family of a single file from its keys and
shapes (SD 1.x, SD 2.x, SDXL), each family's defaults (scheduler, VAE scale, image size,
guidance), building difflab's own U-Net and autoencoder from them
(``interop.unet`` / ``interop.vae`` map the keys), the prompt encoders
(``interop.text``), and :class:`SDConditioner`, which turns prompts into the U-Net's keyword
conditioning (``context``; SDXL's ``vector`` of pooled text and size ids).  It returns the
parts; ``Pipeline.from_pretrained`` assembles them.  Only local paths: nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..models import UNet
    from ..models.vae import AutoencoderKL
    from .text import Family

__all__ = [
    "FAMILIES",
    "SDConditioner",
    "StableDiffusionParts",
    "detect_family",
    "load_stable_diffusion",
    "path_kind",
    "read_safetensors",
    "read_diffusers_weights",
]

FAMILIES = ("sd1", "sd2", "sdxl")

# The scheduler, sampling and autoencoder defaults of each family's reference release, used
# for single files (a diffusers folder brings its own scheduler_config.json).
_SCALED_LINEAR = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd1": {
        "scheduler": {"_class_name": "PNDMScheduler", "skip_prk_steps": True,
                      "prediction_type": "epsilon", **_SCALED_LINEAR},
        "image_size": 512, "vae_scale": 0.18215, "guidance_scale": 7.5, "steps": 50,
    },
    "sd2": {
        "scheduler": {"_class_name": "DDIMScheduler", **_SCALED_LINEAR},
        "image_size": 768, "vae_scale": 0.18215, "guidance_scale": 7.5, "steps": 50,
    },
    "sdxl": {
        "scheduler": {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading",
                      "interpolation_type": "linear", "use_karras_sigmas": False,
                      "prediction_type": "epsilon", **_SCALED_LINEAR},
        "image_size": 1024, "vae_scale": 0.13025, "guidance_scale": 5.0, "steps": 50,
        "force_zeros_for_empty_prompt": True,
    },
}  # fmt: skip
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


# ---------------------------------------------------------------------------- files
def path_kind(path: str | Path) -> str:
    """``"run"`` (a difflab run: ``config.yaml``), ``"diffusers"`` (``model_index.json``) or
    ``"single_file"`` (a ``.safetensors`` file); anything else raises a one-line error."""
    p = Path(path)
    if p.is_dir():
        if (p / "config.yaml").is_file():
            return "run"
        if (p / "model_index.json").is_file():
            return "diffusers"
        raise FileNotFoundError(
            f"{str(p)!r} is neither a difflab run (config.yaml) nor a diffusers folder "
            "(model_index.json)"
        )
    if p.is_file():
        if p.suffix == ".safetensors":
            return "single_file"
        if p.suffix in (".ckpt", ".pt", ".pth", ".bin"):
            raise ValueError(
                f"{str(p)!r} is a pickle file, which can carry code and is not loaded; "
                "convert it to .safetensors first"
            )
        raise ValueError(f"{str(p)!r} is not a .safetensors checkpoint")
    raise FileNotFoundError(f"{str(p)!r} does not exist")


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a ``.safetensors`` file, with a one-line error for a truncated or
    foreign file."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {str(p)!r} does not exist")
    try:
        return load_file(str(p))
    except Exception as err:  # safetensors raises its own SafetensorError
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"{str(p)!r} is not a readable .safetensors file ({reason}); is it truncated?"
        ) from None


def read_diffusers_weights(folder: str | Path, stem: str, variant: str | None = None) -> dict:
    """The weights of one diffusers component folder: ``STEM[.VARIANT].safetensors`` or the
    shards listed in ``STEM[.VARIANT].safetensors.index.json``.  ``variant=None`` takes the
    full-precision file when present, else the ``fp16`` one."""
    folder = Path(folder)
    variants = [variant] if variant is not None else [None, "fp16"]
    for v in variants:
        name = stem if v is None else f"{stem}.{v}"
        single = folder / f"{name}.safetensors"
        if single.is_file():
            return read_safetensors(single)
        index = folder / f"{name}.safetensors.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text("utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as err:
                raise ValueError(f"{index} is not a weight index ({err})") from None
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(read_safetensors(folder / shard))
            return state
    pickles = sorted(q.name for q in folder.glob(f"{stem}*.bin"))
    if pickles:
        raise ValueError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}), which can carry code "
            "and are not loaded; save the component as .safetensors"
        )
    raise FileNotFoundError(f"{folder} has no {stem}.safetensors (nor an fp16 variant or shards)")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text("utf-8"))
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


# ---------------------------------------------------------------------------- families
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def detect_family(state: Mapping[str, Tensor], path: str | Path = "checkpoint") -> Family:
    """SD 1.x, SD 2.x or SDXL, from an original-layout checkpoint's keys and shapes.

    The text encoder's layout tells: SD 1.x has a CLIP ViT-L in transformers' layout
    (``cond_stage_model.transformer``; 768-wide cross-attention in the releases), SD 2.x an
    OpenCLIP ViT-H (``cond_stage_model.model``; 1024), SDXL two embedders
    (``conditioner.embedders.0/1``; 2048) and the pooled-text/size embedding (``label_emb``).
    """
    unet = [k for k in state if k.startswith(UNET_PREFIX)]
    if not unet:
        prefixes = sorted({k.split(".")[0] for k in state})
        raise ValueError(
            f"{path} is not a Stable Diffusion checkpoint: no {UNET_PREFIX}* keys "
            f"(found top-level keys {', '.join(prefixes[:8]) or 'none'})"
        )
    width = None
    for key in unet:
        if key.endswith("attn2.to_k.weight"):
            width = int(state[key].shape[1])
            break
    in_ch = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    channels = None if in_ch is None else int(in_ch.shape[1])
    found = f"cross-attention width {width}, {channels} input channels"
    if channels not in (None, 4):
        raise ValueError(
            f"{path}: a U-Net with {channels} input channels (an inpainting or depth model?) "
            "is not supported; difflab loads text-to-image SD 1.x, 2.x and SDXL checkpoints"
        )
    has = lambda prefix: any(k.startswith(prefix) for k in state)  # noqa: E731
    if has("conditioner.embedders.1.model."):
        if not has("conditioner.embedders.0.transformer."):
            raise ValueError(f"{path}: an SDXL refiner (one text encoder) is not supported")
        return "sdxl"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    encoders = sorted({".".join(k.split(".")[:3]) for k in state if k.startswith(("cond", "con"))})
    raise ValueError(
        f"{path}: cannot tell the Stable Diffusion family ({found}; text encoder keys "
        f"{', '.join(encoders[:4]) or 'none'}); expected SD 1.x (768, cond_stage_model."
        "transformer), SD 2.x (1024, cond_stage_model.model) or SDXL (2048, conditioner.embedders)"
    )


def _split(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------- conditioning
class SDConditioner:
    """Prompts -> the U-Net's keyword conditioning of an SD model (``Pipeline``'s
    ``conditioning`` hook).

    ``context`` is the text encoder's token embeddings; SDXL adds ``vector``: the pooled
    embedding of the second encoder concatenated with sinusoidal embeddings of the
    ``(original size, crop top-left, target size)`` ids (Podell et al. 2023, sec. 2.2), with
    the generated size as both sizes and no crop, as diffusers does by default.  The
    unconditional side is ``SDTextEncoder.uncond``: the negative prompts' encoding, the
    empty prompt's, or zeros for SDXL without a negative prompt
    (``force_zeros_for_empty_prompt``).  ``clip_skip`` is diffusers' (A1111's "Clip skip: N"
    is ``N - 1``); as in diffusers it applies to the prompts, not to the negative prompts.
    """

    def __init__(self, encoder: Any, family: str, *, time_embed_dim: int = 256) -> None:
        self.encoder = encoder
        self.family = family
        self.time_embed_dim = time_embed_dim
        self.clip_skip: int | None = None

    def __call__(self, prompts: list[str]) -> tuple[Tensor, None]:
        """The token embeddings alone (``(context, None)``: the plain encoder contract)."""
        return self.encoder(prompts, clip_skip=self.clip_skip)["context"], None

    def _kwargs(self, encoded: Mapping[str, Tensor], size: tuple[int, int]) -> dict[str, Tensor]:
        out = {"context": encoded["context"]}
        if self.family == "sdxl":
            from ..models.unet import sdxl_vector

            pooled = encoded["pooled"].float()
            h, w = size
            ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=pooled.device)
            out["vector"] = sdxl_vector(pooled, ids.expand(pooled.shape[0], 6), self.time_embed_dim)
        return out

    def conditioning(
        self, prompts: list[str], negatives: list[str] | None, *, size: tuple[int, int]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(cond, uncond)`` for ``prompts`` and their negative prompts (``None``: none)."""
        with torch.no_grad():
            pos = self.encoder(prompts, clip_skip=self.clip_skip)
            neg = self.encoder.uncond(len(prompts), negatives)
        return self._kwargs(pos, size), self._kwargs(neg, size)


# ---------------------------------------------------------------------------- loading
@dataclass
class StableDiffusionParts:
    """What ``Pipeline.from_pretrained`` needs from an SD checkpoint."""

    family: Family
    unet: UNet
    vae: AutoencoderKL
    conditioner: SDConditioner
    scheduler: dict[str, Any]
    prediction: str
    image_size: int
    sample_defaults: dict[str, Any] = field(default_factory=dict)


def load_stable_diffusion(
    path: str | Path,
    *,
    tokenizer: str | Path | None = None,
    prediction: str | None = None,
    variant: str | None = None,
) -> StableDiffusionParts:
    """Load a diffusers folder or an original single ``.safetensors`` file (on the CPU, in
    float32; ``Pipeline.to`` moves and casts).

    :param tokenizer: single files only: a local folder with the tokenizer(s) (a diffusers
        folder of the same family, or a tokenizer folder); its ``scheduler/`` config, when
        present, replaces the family's default.
    :param prediction: ``"eps"`` / ``"v"`` / ``"x0"``, overriding the scheduler config (an
        SD 2.x single file does not record it: 512-base models predict eps, 768 ones v).
    :param variant: diffusers weight variant to prefer (e.g. ``"fp16"``).
    """
    kind = path_kind(path)
    if kind == "run":
        raise ValueError(f"{path} is a difflab run; use Pipeline.from_run")
    with torch.random.fork_rng(devices=[]):  # inits are overwritten: keep the caller's RNG
        if kind == "diffusers":
            parts = _from_diffusers(Path(path), variant)
        else:
            parts = _from_single_file(Path(path), tokenizer, prediction)
    if prediction is not None:
        from .._validate import check_choice

        check_choice("prediction", prediction, ("eps", "v", "x0"))
        parts.prediction = prediction
    return parts


def _prediction(scheduler: Mapping[str, Any], where: str) -> str:
    kind = scheduler.get("prediction_type", "epsilon")
    if kind not in _PREDICTIONS:
        raise ValueError(
            f"{where}: unknown prediction_type {kind!r} (choices: {', '.join(_PREDICTIONS)})"
        )
    return _PREDICTIONS[kind]


def _family_of_unet(config: Mapping[str, Any]) -> Family:
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    dim = config.get("cross_attention_dim")
    return "sd2" if dim == 1024 or config.get("use_linear_projection") else "sd1"


def _from_diffusers(folder: Path, variant: str | None) -> StableDiffusionParts:
    from ..models import UNet
    from ..models.vae import AutoencoderKL, VAEConfig
    from .text import SDTextEncoder
    from .unet import unet_config_from_diffusers, unet_state_from_diffusers

    _read_json(folder / "model_index.json")  # present and readable (path_kind checked it)
    unet_json = _read_json(folder / "unet" / "config.json")
    family = _family_of_unet(unet_json)
    cfg = unet_config_from_diffusers(unet_json)
    unet = UNet(cfg)
    state = unet_state_from_diffusers(
        read_diffusers_weights(folder / "unet", "diffusion_pytorch_model", variant), cfg
    )
    _load_exact(unet, state, folder / "unet")
    vae_json = _read_json(folder / "vae" / "config.json")
    vae = AutoencoderKL(VAEConfig.from_diffusers(vae_json))
    _load_exact(
        vae,
        read_diffusers_weights(folder / "vae", "diffusion_pytorch_model", variant),
        folder / "vae",
    )
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    encoder = SDTextEncoder.from_diffusers(folder, family)
    defaults = FAMILY_DEFAULTS[family]
    conditioner = SDConditioner(
        encoder, family, time_embed_dim=int(unet_json.get("addition_time_embed_dim") or 256)
    )
    f = vae.config.downsample_factor
    return StableDiffusionParts(
        family=family, unet=unet.eval(), vae=vae.eval(), conditioner=conditioner,
        scheduler=scheduler, prediction=_prediction(scheduler, str(folder / "scheduler")),
        image_size=int(unet_json.get("sample_size", defaults["image_size"] // f)) * f,
        sample_defaults={"steps": defaults["steps"], "guidance_scale": defaults["guidance_scale"]},
    )  # fmt: skip


def _from_single_file(
    path: Path, tokenizer: str | Path | None, prediction: str | None
) -> StableDiffusionParts:
    from ..models import UNet
    from ..models.vae import AutoencoderKL, VAEConfig
    from .text import SDTextEncoder
    from .unet import unet_config_from_diffusers, unet_config_from_ldm, unet_state_from_ldm
    from .vae import vae_config_from_ldm, vae_state_from_ldm

    state = read_safetensors(path)
    family = detect_family(state, path)
    if tokenizer is None:
        raise ValueError(
            f"{path} is a single-file {family} checkpoint: name a local folder with its "
            "tokenizer (a diffusers folder of the same family, or a CLIP tokenizer folder) "
            "with tokenizer= / --tokenizer"
        )
    defaults = FAMILY_DEFAULTS[family]
    config_dir = Path(tokenizer)
    if not config_dir.is_dir():
        raise FileNotFoundError(
            f"the tokenizer folder {str(config_dir)!r} for {path.name} does not exist"
        )
    encoder = SDTextEncoder.from_single_file(  # first: a missing tokenizer is the usual slip
        state, family, config_dir,
        force_zeros_for_empty_prompt=defaults.get("force_zeros_for_empty_prompt", False),
    )  # fmt: skip
    # The numbers weight shapes do not give (heads, GroupNorm groups, the VAE's scale) come
    # from the named folder's configs when it is a diffusers folder, else the family's.
    unet_sd = _split(state, UNET_PREFIX)
    unet_json = config_dir / "unet" / "config.json"
    if unet_json.is_file():
        cfg = unet_config_from_diffusers(_read_json(unet_json))
    else:
        cfg = unet_config_from_ldm(unet_sd, family=family)
    try:
        unet = UNet(cfg)
    except ValueError as err:
        raise ValueError(
            f"{path}: the U-Net with the {family} defaults does not build ({err}); name a "
            "diffusers folder of this model (with unet/config.json) as the tokenizer folder"
        ) from err
    _load_exact(unet, unet_state_from_ldm(unet_sd, cfg), path)
    vae_sd = _split(state, VAE_PREFIX)
    if not vae_sd:
        raise ValueError(f"{path} has no autoencoder ({VAE_PREFIX}* keys)")
    vae_json = config_dir / "vae" / "config.json"
    if vae_json.is_file():
        vae_cfg = VAEConfig.from_diffusers(_read_json(vae_json))
    else:
        vae_cfg = vae_config_from_ldm(vae_sd, scaling_factor=defaults["vae_scale"])
    vae = AutoencoderKL(vae_cfg)
    _load_exact(vae, vae_state_from_ldm(vae_sd), path)
    scheduler = dict(defaults["scheduler"])
    if (config_dir / "scheduler" / "scheduler_config.json").is_file():
        scheduler = _read_json(config_dir / "scheduler" / "scheduler_config.json")
    elif family == "sd2" and prediction is None:
        raise ValueError(
            f"{path} is an SD 2.x checkpoint, which does not record its prediction type "
            "(512-base models predict eps, 768 models v): pass prediction='eps' or 'v' "
            "(--prediction), or a diffusers folder with scheduler/ as the tokenizer folder"
        )
    time_dim = 256  # SDXL's; a folder's U-Net config may say otherwise
    if unet_json.is_file():
        time_dim = int(_read_json(unet_json).get("addition_time_embed_dim") or 256)
    conditioner = SDConditioner(encoder, family, time_embed_dim=time_dim)
    image_size = defaults["image_size"]
    if unet_json.is_file():  # the folder's sample size
        sample = _read_json(unet_json).get("sample_size")
        if isinstance(sample, int):
            image_size = sample * vae.config.downsample_factor
    elif family == "sd2" and (prediction or _prediction(scheduler, str(path))) == "eps":
        image_size = 512  # SD 2.x base
    return StableDiffusionParts(
        family=family, unet=unet.eval(), vae=vae.eval(), conditioner=conditioner,
        scheduler=scheduler, prediction=_prediction(scheduler, str(path)), image_size=image_size,
        sample_defaults={"steps": defaults["steps"], "guidance_scale": defaults["guidance_scale"]},
    )  # fmt: skip


def _load_exact(model: nn.Module, state: Mapping[str, Tensor], where: str | Path) -> None:
    """Load ``state`` into ``model``; every key and shape must match (a one-line error that
    names ``where`` and the first mismatches otherwise)."""
    from ..runs import state_mismatch

    expected = model.state_dict()
    mismatch = state_mismatch(expected, state)
    if mismatch:
        raise ValueError(f"{where}: the weights do not fit the architecture: {mismatch}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
