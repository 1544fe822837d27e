"""difflab runs written as Stable Diffusion files: a diffusers folder, an original single file,
a kohya LoRA file.

Owns ``difflab export``: what of a text-to-image latent run (a difflab U-Net, a KL
autoencoder, a frozen CLIP text encoder; Rombach et al. 2022) diffusers'
``StableDiffusionPipeline`` can hold, and writing it:

* ``unet/``: ``config.json`` (:func:`~difflab.interop.unet.unet_config_to_diffusers`; ADM's
  scale-shift ResBlocks are ``resnet_time_scale_shift="scale_shift"``) and the weights, with
  difflab's fused q/k/v split, a fine-tuning run's LoRA/DoRA adapters folded in, and a
  class-conditional run's null-label embedding folded into the time embedding's last bias
  (the pipeline passes no class labels; difflab samples prompts with the null label too);
* ``vae/``, ``text_encoder/`` + ``tokenizer/`` (read from ``text.path``; the tokenizer pads
  to the run's ``text.max_length``; a textual-inversion run's word becomes a new token row);
* ``scheduler/``: a ``DDIMScheduler`` config whose ``trained_betas`` are the run's
  ``NoiseSchedule`` betas and whose "trailing" spacing with ``set_alpha_to_one`` walks the
  timesteps difflab's own ``ddim`` walks, with the run's prediction type;
* ``model_index.json``.

The single file is the CompVis layout (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.*``: SD 1.x's places).  Knows nothing of samplers or training.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "EXPORT_FORMATS",
    "check_exportable",
    "export_diffusers",
    "export_kohya_lora",
    "export_single_file",
    "scheduler_config_for",
]

EXPORT_FORMATS = ("diffusers", "single-file", "kohya")
_PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SD_TRANSFORMER_NORM_EPS = 1e-6  # diffusers' Transformer2DModel GroupNorm


def check_exportable(cfg: Mapping[str, Any], run: str | Path) -> None:
    """Raise a one-line ``ValueError`` when a run's config has no Stable Diffusion pipeline
    form: a pixel-space run, a text encoder other than a frozen CLIP, a DiT backbone,
    learned variances, or residual up/down-sampling."""
    model = cfg.get("model") or {}
    text = cfg.get("text") or {}
    encoder = text.get("encoder", "none")
    where = f"{run}"
    if model.get("arch", "unet") != "unet":
        raise ValueError(
            f"{where} has a {model.get('arch')!r} backbone; a Stable Diffusion pipeline runs "
            "a U-Net (UNet2DConditionModel)"
        )
    if (cfg.get("latent") or {}).get("vae") is None:
        raise ValueError(
            f"{where} is a pixel-space run (no latent.vae); a Stable Diffusion pipeline "
            "samples the latents of a KL autoencoder"
        )
    if encoder == "transformer":
        raise ValueError(
            f"{where} conditions on difflab's own word-tokenizer text encoder (text.encoder: "
            "transformer), which diffusers cannot load; export needs text.encoder: clip"
        )
    if encoder != "clip":
        raise ValueError(
            f"{where} has text.encoder: {encoder}; a Stable Diffusion pipeline conditions on "
            "a frozen CLIP text encoder (text.encoder: clip)"
        )
    if (cfg.get("finetune") or {}).get("text_encoder"):
        raise ValueError(
            f"{where} trains adapters on its text encoder (finetune.text_encoder), which this "
            "export does not fold in; export the adapters with --to kohya"
        )
    variance = (cfg.get("diffusion") or {}).get("variance", "fixedsmall")
    if variance in ("learned", "learned_range") or model.get("learn_sigma"):
        raise ValueError(
            f"{where} learns its variances (diffusion.variance: {variance}); diffusers' "
            "StableDiffusionPipeline expects a U-Net with one prediction, no variance channels"
        )
    if model.get("resblock_updown"):
        raise ValueError(
            f"{where} down/upsamples with residual blocks (model.resblock_updown), which "
            "diffusers' CrossAttnDownBlock2D / CrossAttnUpBlock2D cannot hold"
        )


def scheduler_config_for(schedule: Any, prediction: str) -> dict[str, Any]:
    """A diffusers ``DDIMScheduler`` config of ``schedule`` (a ``NoiseSchedule``): its betas
    as ``trained_betas``; "trailing" spacing from T-1 with ``set_alpha_to_one`` is difflab's
    ``ddim`` grid (exactly, when N divides T)."""
    betas = [float(b) for b in schedule.betas.tolist()]
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": len(betas),
        "beta_start": betas[0],
        "beta_end": betas[-1],
        "beta_schedule": "linear",  # ignored: trained_betas wins
        "trained_betas": betas,
        "prediction_type": _PREDICTION_TYPES[prediction],
        "clip_sample": False,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": False,
    }


@dataclass
class _Exported:
    """What a run exports: the U-Net (config without class labels, difflab-keyed weights),
    the autoencoder, the CLIP text model and tokenizer, the scheduler config."""

    unet_cfg: Any
    unet_state: dict[str, Tensor]
    vae: nn.Module
    text_model: Any
    tokenizer: Any
    scheduler: dict[str, Any]


def _plain_state(model: nn.Module) -> dict[str, Tensor]:
    """The U-Net's weights with LoRA/DoRA/LoHa/LoKr adapters folded in, under the plain
    layer names."""
    from ..finetune.lora import fuse_lora, lora_layers

    if any(True for _ in lora_layers(model)):
        fuse_lora(model)
    state = {}
    for key, value in model.state_dict().items():
        if _ADAPTER_KEY.search(key) or key.endswith("_unfused_weight"):
            continue
        state[key.replace(".base.", ".")] = value.detach().clone()
    return state


def _read_run(run: Path, weights: str) -> _Exported:
    from ..finetune.inversion import WORD_PARAM
    from ..pipeline import Pipeline, read_run_config

    cfg = read_run_config(run)
    check_exportable(cfg, run)
    if (cfg.get("text") or {}).get("mask_padding", True):
        warnings.warn(
            f"{run} was trained with text.mask_padding: true, but diffusers does not mask "
            "padding tokens out of cross-attention: the exported model's images differ from "
            "the run's (train with text.mask_padding: false for identical images)",
            stacklevel=3,
        )
    pipe = Pipeline.from_run(run, weights=weights)
    state = _plain_state(pipe.model)
    word_vector = state.pop(WORD_PARAM, None)
    ucfg: Any = pipe.model.config  # a UNetConfig
    if ucfg.num_classes is not None:
        warnings.warn(
            f"{run} is also class-conditional ({ucfg.num_classes} classes); "
            "StableDiffusionPipeline passes no class labels, so the export always uses the "
            "null label (folded into the time embedding), as difflab does for prompts alone",
            stacklevel=3,
        )
        null = state.pop("class_embed.weight")[ucfg.num_classes]
        state["time_embed.2.bias"] = state["time_embed.2.bias"] + null  # emb += e_null
        ucfg = dataclasses.replace(ucfg, num_classes=None)
    if ucfg.transformer_norm_eps != SD_TRANSFORMER_NORM_EPS:
        warnings.warn(
            f"{run}'s transformer GroupNorm eps is {ucfg.transformer_norm_eps:g}; diffusers "
            f"fixes it at {SD_TRANSFORMER_NORM_EPS:g}, so outputs differ slightly (set "
            "model.transformer_norm_eps: 1.0e-6 for identical ones)",
            stacklevel=3,
        )
        ucfg = dataclasses.replace(ucfg, transformer_norm_eps=SD_TRANSFORMER_NORM_EPS)
    encoder: Any = pipe.text_encoder
    text_model, tokenizer = encoder.model, encoder.tokenizer
    tokenizer.model_max_length = int(encoder.max_length)  # diffusers pads to this
    if encoder.words:  # a textual-inversion word: a real row of the exported token table
        text_model.resize_token_embeddings(len(tokenizer))
        table = text_model.get_input_embeddings().weight
        with torch.no_grad():
            for token, vector in encoder.words.items():
                table[token] = vector.to(table)
    elif word_vector is not None:  # pragma: no cover - from_run always adds the word
        raise ValueError(f"{run} has a trained word but its text encoder does not know it")
    scheduler = scheduler_config_for(pipe.schedule, pipe.prediction)
    return _Exported(ucfg, state, pipe.vae, text_model, tokenizer, scheduler)  # type: ignore[arg-type]


def _save_tensors(state: Mapping[str, Tensor], path: Path) -> None:
    from safetensors.torch import save

    from ..runs import atomic_write_bytes

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _prepare(out: Path, overwrite: bool, what: str) -> None:
    if out.exists():
        if not overwrite:
            raise ValueError(f"{out} already exists; pass overwrite=True (--overwrite)")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    if what == "folder":
        out.mkdir(parents=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)


def export_diffusers(
    run_dir: str | Path, out: str | Path, *, weights: str = "ema", overwrite: bool = False
) -> Path:
    """Write a difflab text-to-image latent run as a diffusers Stable Diffusion folder that
    ``diffusers.StableDiffusionPipeline.from_pretrained(out)`` and
    ``difflab.Pipeline.from_pretrained(out)`` load.

    :param weights: ``"ema"``, ``"raw"`` or another weights file of the run.
    :raises ValueError: a run diffusers cannot hold (:func:`check_exportable`).
    """
    from ..interop.unet import unet_config_to_diffusers, unet_state_to_diffusers

    run, out = Path(run_dir), Path(out)
    with torch.random.fork_rng(devices=[]):
        parts = _read_run(run, weights)
    unet_json = unet_config_to_diffusers(parts.unet_cfg)  # raises before anything is written
    _prepare(out, overwrite, "folder")
    _write_json(out / "unet" / "config.json", unet_json)
    _save_tensors(
        unet_state_to_diffusers(parts.unet_state, parts.unet_cfg),
        out / "unet" / "diffusion_pytorch_model.safetensors",
    )
    parts.vae.save_pretrained(out / "vae")  # type: ignore[operator]
    parts.text_model.save_pretrained(out / "text_encoder")
    parts.tokenizer.save_pretrained(out / "tokenizer")
    _write_json(out / "scheduler" / "scheduler_config.json", parts.scheduler)
    _write_json(
        out / "model_index.json",
        {
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", type(parts.text_model).__name__],
            "tokenizer": ["transformers", type(parts.tokenizer).__name__],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    return out


def export_single_file(
    run_dir: str | Path, out: str | Path, *, weights: str = "ema", overwrite: bool = False
) -> Path:
    """Write a run as one original-layout (CompVis) ``.safetensors`` checkpoint: the U-Net
    under ``model.diffusion_model.``, the autoencoder under ``first_stage_model.``, the CLIP
    text model (Hugging Face layout, SD 1.x's place) under ``cond_stage_model.transformer.``.

    The file records no configs: tools infer SD 1.x from its keys, and difflab reads it with
    ``Pipeline.from_pretrained(out, tokenizer=FOLDER)`` where FOLDER is the run's
    :func:`export_diffusers` folder (its unet/vae/scheduler configs and tokenizer).
    """
    from ..interop.unet import LDM_PREFIX, unet_config_to_diffusers, unet_state_to_ldm
    from ..interop.vae import vae_state_to_ldm

    run, out = Path(run_dir), Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"the single file {str(out)!r} must end in .safetensors")
    with torch.random.fork_rng(devices=[]):
        parts = _read_run(run, weights)
    unet_config_to_diffusers(parts.unet_cfg)  # the same limits as the folder
    unet = unet_state_to_ldm(parts.unet_state, parts.unet_cfg)
    state = {LDM_PREFIX + k: v for k, v in unet.items()}
    vae_state = vae_state_to_ldm(parts.vae.state_dict())
    state.update({"first_stage_model." + k: v for k, v in vae_state.items()})
    for key, value in parts.text_model.state_dict().items():
        if key.endswith("position_ids"):
            continue
        name = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + name] = value
    _prepare(out, overwrite, "file")
    _save_tensors(state, out)
    return out


def export_kohya_lora(
    run_dir: str | Path, out: str | Path | None = None, *, weights: str = "ema"
) -> Path:
    """Write a fine-tuning run's U-Net LoRA in kohya's layout with diffusers module names
    (``lora_unet_down_blocks_0_attentions_0_..._to_q``), as SD 1.x / 2.x LoRA files name
    them, for ``diffusers``' ``load_lora_weights`` and A1111 / ComfyUI; a LoHa / LoKr run's
    in LyCORIS' layout (``hada_*`` / ``lokr_*``) for LyCORIS-reading tools.  A run with
    ``finetune.text_encoder`` adds its CLIP adapters as ``lora_te_text_model_encoder_...``
    (SDXL: ``lora_te1_`` and ``lora_te2_``).

    :param out: default ``RUN/lora_kohya.safetensors``.
    :raises ValueError: not a LoRA run, DoRA adapters, or fused q/k/v (difflab's own
        runs: kohya's files adapt ``to_q``/``to_k``/``to_v`` apart).
    """
    from ..finetune.lycoris import AdapterTarget, save_kohya
    from ..finetune.text_encoder import detach_text_encoders
    from ..interop.unet import diffusers_module_map
    from ..pipeline import Pipeline, read_run_config

    run = Path(run_dir)
    cfg = read_run_config(run)
    ft = cfg.get("finetune") or {}
    adapted_text = bool(ft.get("text_encoder"))
    if ft.get("base_run") is None or (ft.get("targets") == "none" and not adapted_text):
        raise ValueError(f"{run} is not a LoRA fine-tuning run (finetune.base_run, targets)")
    if (cfg.get("model") or {}).get("fuse_qkv", True):
        raise ValueError(
            f"{run} has fused q/k/v projections (model.fuse_qkv); kohya files adapt to_q, "
            "to_k and to_v apart (fine-tune an imported Stable Diffusion model instead)"
        )
    with torch.random.fork_rng(devices=[]):
        pipe = Pipeline.from_run(run, weights=weights)
    ucfg: Any = pipe.model.config
    name_map = diffusers_module_map(ucfg)
    path = run / "lora_kohya.safetensors" if out is None else Path(out)
    meta = {"difflab_run": str(run)}
    # finetune.text_encoder: the CLIP encoders' adapters, lora_te_ (SDXL: lora_te1_, te2_)
    text = detach_text_encoders(pipe.model)
    targets: dict[str, nn.Module | AdapterTarget] = {"unet": AdapterTarget(pipe.model, name_map)}
    targets |= dict(zip(("text_encoder", "text_encoder_2"), text))
    save_kohya(path, targets, metadata=meta)
    if ucfg.transformer_conv_proj:  # SD 1.x's proj_in/proj_out are 1x1 convolutions
        _as_conv1x1(path, _CONV_PROJ)
    return path


# SD 1.x's proj_in / proj_out factors that LyCORIS and kohya give a 1x1 convolution's shape
# (LoHa's are flat either way; LoKr's whole w2 is (out_k, in_n, 1, 1)).
_CONV_PROJ = re.compile(r"attentions_\d+_proj_(in|out)\.(lora_(down|up)\.weight|lokr_w2)$")
_ADAPTER_KEY = re.compile(r"\.(lora|hada|lokr)_")  # an adapter tensor in a wrapped state dict


def _as_conv1x1(path: Path, keys: re.Pattern[str]) -> None:
    """Rewrite the ``[O, I]`` LoRA factors of ``keys`` as the ``[O, I, 1, 1]`` of the 1x1
    convolutions they adapt in the file's (diffusers / SD 1.x) layout."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    for key, value in tensors.items():
        if keys.search(key) and value.ndim == 2:
            tensors[key] = value[:, :, None, None].contiguous()
    from safetensors.torch import save

    from ..runs import atomic_write_bytes

    atomic_write_bytes(path, save(tensors, metadata=meta))
