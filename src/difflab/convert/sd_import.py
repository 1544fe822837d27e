"""A Stable Diffusion checkpoint written as a difflab base run, so that fine-tuning (LoRA /
LoCon ranks on the U-Net, DreamBooth's prior, textual inversion) runs on it unchanged.

Owns :func:`import_stable_diffusion`: ``config.yaml`` (the SD U-Net's ``UNetConfig``, the
scheduler's betas and prediction type, ``latent.vae`` = the autoencoder folder written here,
``text.encoder: clip`` with ``text.path`` = a folder holding the text model and its
tokenizer, ``mask_padding: false`` and ``max_length: 77``: Stable Diffusion's recipe,
Rombach et al. 2022 sec. 4.3.2), and the U-Net weights as ``ema.safetensors`` /
``model.safetensors``.  SDXL's two text encoders are written as a ``text/`` folder read by
``text.encoder: sdxl`` (:mod:`difflab.interop.sd_text_train`: the pooled embedding and the
size ids become the U-Net's ``vector``); the refiner is refused.  Reading the checkpoint is
:mod:`difflab.interop.sd`'s.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

__all__ = ["import_stable_diffusion"]

BASE_WEIGHTS = ("ema.safetensors", "model.safetensors")


def import_stable_diffusion(
    path: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    prediction: str | None = None,
    variant: str | None = None,
) -> Path:
    """Write the SD 1.x / 2.x / XL model at ``path`` (a diffusers folder or an original single
    ``.safetensors`` file with ``tokenizer``) as a difflab run directory ``out``.

    The run's ``data`` section is a placeholder (captions at the model's image size, no
    path): fine-tuning sets ``data.path``.
    :raises ValueError: an SDXL refiner, or anything ``load_stable_diffusion`` refuses.
    """
    from ..interop.scheduler import default_sampler, schedule_from_diffusers
    from ..interop.sd import load_stable_diffusion
    from ..train import TrainConfig, save_config

    out = Path(out)
    parts = load_stable_diffusion(path, tokenizer=tokenizer, prediction=prediction, variant=variant)
    encoder: Any = parts.conditioner.encoder
    if parts.family == "sdxl" and len(encoder.models) != 2:
        raise ValueError(
            f"{path} is an SDXL refiner (text_encoder_2 alone); fine-tuning takes SDXL base "
            "with its two text encoders"
        )
    out.mkdir(parents=True, exist_ok=True)
    vae_dir = parts.vae.save_pretrained(out / "vae")
    text = _write_text_encoders(encoder, out, parts.family)
    ucfg: Any = parts.unet.config
    f = int(parts.vae.config.downsample_factor)
    schedule = schedule_from_diffusers(parts.scheduler)
    model = ucfg.to_dict()
    model.pop("use_checkpoint", None)
    config = TrainConfig.from_dict({
        "run_dir": str(out),
        "model": model,
        "diffusion": {"schedule": schedule.to_config(), "prediction": parts.prediction},
        "data": {"source": "captions", "path": "-", "image_size": ucfg.image_size * f,
                 "channels": int(parts.vae.config.in_channels)},
        "latent": {"vae": str(vae_dir)},
        "text": text,
        "train": {"batch_size": 1, "lr": 1.0e-4, "warmup_steps": 0, "max_steps": 500,
                  "log_every": 10, "sample_every": 0, "save_every": 0, "tensorboard": False,
                  "plot_metrics": False},
        "sample": {"sampler": default_sampler(parts.scheduler),
                   "steps": parts.sample_defaults["steps"],
                   "guidance_scale": parts.sample_defaults["guidance_scale"]},
    }).resolve()  # fmt: skip
    config.data.path = None  # a placeholder: fine-tuning names the data
    save_config(config, out / "config.yaml")
    _write_weights(parts.unet.state_dict(), out, source=str(path), family=parts.family)
    return out


def _write_text_encoders(encoder: Any, out: Path, family: str) -> dict[str, Any]:
    """The text model(s) and tokenizer(s) as ``save_pretrained`` folders; the run's ``text``
    section that reads them (SD 1.x / 2.x: ``clip`` from ``text_encoder/``; SDXL: ``sdxl``
    from ``text/`` with diffusers' ``text_encoder{,_2}/`` and ``tokenizer{,_2}/``)."""
    if family != "sdxl":
        folder = out / "text_encoder"
        if folder.exists():
            shutil.rmtree(folder)
        encoder.models[0].save_pretrained(folder)
        encoder.tokenizers[0].save_pretrained(folder)
        return {"encoder": "clip", "path": str(folder), "max_length": encoder.max_length,
                "mask_padding": False}  # fmt: skip
    folder = out / "text"
    if folder.exists():
        shutil.rmtree(folder)
    for i, suffix in enumerate(("", "_2")):
        encoder.models[i].save_pretrained(folder / f"text_encoder{suffix}")
        encoder.tokenizers[i].save_pretrained(folder / f"tokenizer{suffix}")
    zeros = {"force_zeros_for_empty_prompt": encoder.force_zeros_for_empty_prompt}
    (folder / "model_index.json").write_text(json.dumps(zeros), encoding="utf-8")
    return {"encoder": "sdxl", "path": str(folder), "max_length": encoder.max_length,
            "mask_padding": False}  # fmt: skip


def _write_weights(state: dict[str, torch.Tensor], out: Path, **meta: str) -> None:
    """The U-Net as ``ema.safetensors``, and ``model.safetensors`` as a hard link to it
    (a copy where links are not possible): an imported model has one set of weights."""
    from safetensors.torch import save

    from ..runs import atomic_write_bytes

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    ema, raw = (out / name for name in BASE_WEIGHTS)
    atomic_write_bytes(ema, save(tensors, metadata={"format": "pt", **meta}))
    raw.unlink(missing_ok=True)
    try:
        os.link(ema, raw)
    except OSError:
        shutil.copyfile(ema, raw)
