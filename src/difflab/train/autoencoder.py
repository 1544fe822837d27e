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

Every ``save_every`` steps (and at the end) the run is checkpointed into ``checkpoint/`` with
:mod:`difflab.train.checkpoint` (atomic; weights, optimiser, LR schedule, step, data position
and both generators), so ``resume=True`` continues an interrupted run bit for bit on CPU.
The autoencoder itself (``config.json`` + weights) is written only when training finishes.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import DataConfig, build_dataset
from ..models.vae import AutoencoderKL, VAEConfig
from ..samplers.common import progress as progress_bar
from .checkpoint import Checkpoint, find_checkpoint, load_checkpoint, save_checkpoint
from .config import LoopConfig
from .monitor import MetricsLog, truncate_metrics
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
    save_every: int = 500,
    resume: bool = False,
    device: str | torch.device | None = None,
    stop_at: int | None = None,
) -> AutoencoderRun | None:
    """Train an :class:`AutoencoderKL` on ``data`` and save it to ``out`` (see module doc).

    :param save_every: checkpoint every this many steps (0: only at the end).
    :param resume: continue from ``out/checkpoint`` (a fresh start when there is none).
    :param device: torch device (default: CUDA when available, else CPU).
    :param stop_at: checkpoint and return None after this step, as an interrupted run would.
    :raises ValueError: bad sizes (image side not a multiple of the downsampling factor,
        channel mismatch) or arguments, a checkpoint in ``out`` without ``resume``, or a
        resumed checkpoint of other settings.
    """
    if steps < 1 or batch_size < 1 or lr <= 0 or kl_weight < 0 or save_every < 0:
        raise ValueError(
            f"need steps >= 1, batch_size >= 1, lr > 0, kl_weight >= 0, save_every >= 0; got "
            f"{steps}, {batch_size}, {lr}, {kl_weight}, {save_every}"
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
    ckpt_dir = out / "checkpoint"
    settings = {
        "data": data.to_dict(), "vae": vae.to_diffusers(), "batch_size": batch_size, "lr": lr,
        "warmup_steps": warmup_steps, "kl_weight": kl_weight, "seed": seed,
    }  # fmt: skip
    if find_checkpoint(ckpt_dir) is not None and not resume:
        raise ValueError(
            f"{ckpt_dir} holds a checkpoint of an earlier run; resume it (--resume) or start "
            "over in a new folder (--overwrite deletes this one)"
        )
    dev = torch.device(device) if device is not None else _default_device()
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    data_gen = torch.Generator().manual_seed(seed + 1)
    dataset, report = build_dataset(data, generator=data_gen)
    print(report)
    stream = BatchStream(dataset, batch_size, seed=seed)
    model = AutoencoderKL(vae, generator=torch.Generator().manual_seed(seed)).to(dev).train()
    optimizer, schedule = build_optimizer(
        model, LoopConfig(lr=lr, warmup_steps=min(warmup_steps, steps), max_steps=steps)
    )
    first = 1
    if resume and find_checkpoint(ckpt_dir) is not None:
        first = 1 + _restore(ckpt_dir, settings, steps, model, optimizer, schedule, stream,
                             gen, data_gen)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    if first > 1:  # resumed: the steps after the checkpoint are logged again
        truncate_metrics(out, first - 1)
    log = MetricsLog(out, tensorboard=False)

    def save(step: int) -> None:
        save_checkpoint(ckpt_dir, Checkpoint(
            model=model.state_dict(), ema={}, optimizer=optimizer.state_dict(),
            rng={"noise": gen.get_state(), "data": data_gen.get_state()},
            meta={"step": step, "steps": steps, "settings": settings,
                  "data_position": stream.position, "lr_schedule": schedule.state_dict()},
        ))  # fmt: skip

    loss_value = float("nan")
    try:
        for step in progress_bar(range(first, steps + 1), total=steps - first + 1,
                                 desc="autoencoder",
                                 disable=None if progress is None else not progress):  # fmt: skip
            x = stream.next()["image"].float().to(dev)
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
            if step == steps or step == stop_at or (save_every and step % save_every == 0):
                save(step)
            if step == stop_at:
                return None
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


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _restore(
    ckpt_dir: Path,
    settings: dict[str, Any],
    steps: int,
    model: AutoencoderKL,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    stream: BatchStream,
    gen: torch.Generator,
    data_gen: torch.Generator,
) -> int:
    """Load the checkpoint into the live objects; returns its step."""
    ck = load_checkpoint(ckpt_dir, optimizer_like=optimizer.state_dict())
    meta = ck.meta
    changed = sorted(k for k in settings if meta["settings"].get(k) != settings[k])
    if changed:
        raise ValueError(
            f"{ckpt_dir} was trained with other settings ({', '.join(changed)} differ); "
            "resume with the same ones, or start over"
        )
    if meta["steps"] != steps:
        warnings.warn(
            f"resuming a {meta['steps']}-step run with steps={steps}: the cosine LR schedule "
            "now decays to the new end",
            stacklevel=3,
        )
    model.load_state_dict(ck.model)
    optimizer.load_state_dict(ck.optimizer)
    schedule.load_state_dict(meta["lr_schedule"])
    stream.epoch = int(meta["data_position"]["epoch"])
    stream.index = int(meta["data_position"]["index"])
    gen.set_state(ck.rng["noise"])
    data_gen.set_state(ck.rng["data"])
    return int(meta["step"])


@torch.no_grad()
def _fit_scale(model: AutoencoderKL, dataset: Any, gen: torch.Generator) -> dict[str, float]:
    """Latent std over up to 2048 images (posterior samples), and the reconstruction error
    (posterior means) over up to 512."""
    n = min(len(dataset), 2048)
    latents, l1, sq, count = [], 0.0, 0.0, 0
    for lo in range(0, n, 256):
        x = torch.stack([dataset[i]["image"] for i in range(lo, min(n, lo + 256))]).float()
        x = x.to(next(model.parameters()).device)
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
    rec = model.decode(model.encode(x.to(next(model.parameters()).device)).mean).clamp(-1, 1)
    save_grid(
        torch.cat([x, rec.cpu()]), path, nrow=len(x), params={"what": "originals / reconstructions"}
    )
