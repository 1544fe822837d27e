"""Training the KL autoencoder of latent diffusion (Rombach et al. 2022, sec. 3.1).

Owns :func:`train_autoencoder`: the loss is LDM's pixel term — the L1 reconstruction error
summed over each image — plus ``kl_weight`` times the KL of the posterior to N(0, I)
(LDM's KL-reg autoencoders use 1e-6), averaged over the batch. LDM adds a perceptual
(LPIPS) and an adversarial term; both need pretrained networks that cannot be downloaded
here, so they are left out. AdamW with the trainer's warm-up + cosine schedule.

Afterwards the latent scale is fitted to the data, as Stable Diffusion's 0.18215 was:
``scaling_factor = 1 / std`` of posterior samples over (up to 2048) training images, so the
diffusion model sees unit-variance latents. The folder holds ``config.json`` +
``diffusion_pytorch_model.safetensors`` (the SD VAE layout), ``metrics.jsonl`` and
``reconstructions.png`` (originals above their reconstructions).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import DataConfig, build_dataset
from ..models.vae import AutoencoderKL, VAEConfig
from ..samplers.common import progress as progress_bar
from .config import LoopConfig
from .monitor import MetricsLog
from .optim import build_optimizer, step_lr_schedule
from .stream import BatchStream

__all__ = ["AutoencoderRun", "train_autoencoder"]


@dataclass
class AutoencoderRun:
    """What :func:`train_autoencoder` produced and measured.

    :param l1: mean absolute reconstruction error per pixel (posterior means, [-1, 1] scale).
    :param psnr: reconstruction PSNR in dB for the [-1, 1] range (peak-to-peak 2).
    :param latent_std: std of the unscaled posterior samples; ``scaling_factor = 1 / it``.
    """

    folder: Path
    steps: int
    seconds: float
    final_loss: float
    l1: float
    psnr: float
    latent_std: float
    scaling_factor: float


def train_autoencoder(
    out: str | Path,
    data: DataConfig,
    vae: VAEConfig,
    *,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup_steps: int = 50,
    kl_weight: float = 1e-6,
    seed: int = 0,
    progress: bool | None = None,
    log_every: int = 50,
) -> AutoencoderRun:
    """Train an :class:`AutoencoderKL` on ``data`` and save it to ``out`` (see module doc).

    :raises ValueError: bad sizes (image side not a multiple of the downsampling factor,
        channel mismatch) or arguments.
    """
    if steps < 1 or batch_size < 1 or lr <= 0 or kl_weight < 0:
        raise ValueError(
            f"need steps >= 1, batch_size >= 1, lr > 0, kl_weight >= 0; got {steps}, "
            f"{batch_size}, {lr}, {kl_weight}"
        )
    if data.channels != vae.in_channels or vae.out_channels != vae.in_channels:
        raise ValueError(
            f"data.channels={data.channels} but the autoencoder maps {vae.in_channels} -> "
            f"{vae.out_channels} channels; they must all agree"
        )
    factor = vae.downsample_factor
    if data.image_size % factor:
        raise ValueError(
            f"data.image_size={data.image_size} is not a multiple of the autoencoder's "
            f"downsampling factor {factor} ({len(vae.block_out_channels)} levels)"
        )
    out = Path(out)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    dataset, report = build_dataset(data, generator=torch.Generator().manual_seed(seed + 1))
    print(report)
    stream = BatchStream(dataset, batch_size, seed=seed)
    model = AutoencoderKL(vae, generator=torch.Generator().manual_seed(seed)).train()
    optimizer, schedule = build_optimizer(
        model, LoopConfig(lr=lr, warmup_steps=min(warmup_steps, steps), max_steps=steps)
    )
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out, tensorboard=False)
    loss_value = float("nan")
    try:
        for step in progress_bar(range(1, steps + 1), total=steps, desc="autoencoder",
                                 disable=None if progress is None else not progress):  # fmt: skip
            x = stream.next()["image"].float()
            rec, posterior = model(x, generator=gen)
            l1 = (rec - x).abs().flatten(1).sum(1).mean()
            kl = posterior.kl().mean()
            loss = l1 + kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step_lr_schedule(schedule)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"autoencoder loss is {loss_value} at step {step}")
            if step % log_every == 0 or step == steps:
                record = {
                    "step": step,
                    "loss": loss_value,
                    "l1_per_pixel": float(l1.detach()) / x[0].numel(),
                    "kl": float(kl.detach()),
                    "lr": optimizer.param_groups[0]["lr"],
                }
                log.log(record)
        model.eval()
        stats = _fit_scale(model, dataset, gen)
        model.config.scaling_factor = 1.0 / stats["latent_std"]
        model.save_pretrained(out)
        _save_reconstructions(model, dataset, out / "reconstructions.png")
        log.log({"event": "done", **stats, "scaling_factor": model.config.scaling_factor})
    finally:
        log.close()
    return AutoencoderRun(
        folder=out,
        steps=steps,
        seconds=time.perf_counter() - start,
        final_loss=loss_value,
        l1=stats["l1"],
        psnr=stats["psnr"],
        latent_std=stats["latent_std"],
        scaling_factor=model.config.scaling_factor,
    )


@torch.no_grad()
def _fit_scale(model: AutoencoderKL, dataset: Any, gen: torch.Generator) -> dict[str, float]:
    """Latent std over up to 2048 images (posterior samples), and the reconstruction error
    (posterior means) over up to 512."""
    n = min(len(dataset), 2048)
    latents, l1, sq, count = [], 0.0, 0.0, 0
    for lo in range(0, n, 256):
        x = torch.stack([dataset[i]["image"] for i in range(lo, min(n, lo + 256))]).float()
        posterior = model.encode(x)
        latents.append(posterior.sample(gen))
        if lo < 512:
            err = model.decode(posterior.mean) - x
            l1 += float(err.abs().sum())
            sq += float((err**2).sum())
            count += err.numel()
    mse = sq / count
    return {
        "latent_std": float(torch.cat(latents).std()),
        "l1": l1 / count,
        "psnr": 10 * math.log10(4.0 / max(mse, 1e-12)),
    }


@torch.no_grad()
def _save_reconstructions(model: AutoencoderKL, dataset: Any, path: Path, n: int = 8) -> None:
    from ..images import save_grid

    x = torch.stack([dataset[i]["image"] for i in range(min(n, len(dataset)))]).float()
    rec = model.decode(model.encode(x).mean).clamp(-1, 1)
    save_grid(
        torch.cat([x, rec]), path, nrow=len(x), params={"what": "originals / reconstructions"}
    )
