"""Training the KL autoencoder of latent diffusion (Rombach et al. 2022, sec. 3.1, appendix G).

Owns :func:`train_autoencoder`, a task of the core loop (:func:`difflab.train.loop.run_steps`,
the one the diffusion trainer runs too): the loss is LDM's pixel term — the L1
reconstruction error summed over each image — plus ``kl_weight`` times the KL of the
posterior to N(0, I) (LDM's KL-reg autoencoders use 1e-6), averaged over the batch.
AdamW with the trainer's warm-up + cosine schedule.  LDM's two further terms are optional:

* perceptual: an LPIPS-style distance from a LOCAL feature network
  (:mod:`difflab.train.perceptual`; nothing is downloaded, and without a weights file the
  term is off), added to every pixel's L1 error times ``perceptual_weight`` as LDM does;
* adversarial (``gan=GANConfig(...)``): a PatchGAN (:mod:`difflab.models.discriminator`)
  with hinge losses and LDM's adaptive weight at the decoder's ``conv_out`` weight
  (:mod:`difflab.train.gan_loss`).  Steps ``1..gan.start`` train exactly as without it (the
  discriminator is neither run nor stepped); afterwards each step updates the autoencoder
  with ``L_rec + kl_weight·KL + λ·L_G`` and then the discriminator (Adam, β = 0.5, 0.9) on
  the same batch and the same, detached, reconstructions.

``val_fraction`` of the images are held out of training; every ``eval_every`` steps and at
the end their posterior-mean reconstructions are scored (``event: eval`` rows of
``metrics.jsonl``: PSNR, L1 and, for the digits, the reconstruction FID in the digits
classifier's features of :mod:`difflab.eval.features`).

Afterwards the latent scale is fitted to the data, as Stable Diffusion's 0.18215 was:
``scaling_factor = 1 / std`` of posterior samples over (up to 2048) training images, so the
diffusion model sees unit-variance latents. The folder holds ``config.json`` +
``diffusion_pytorch_model.safetensors`` (the SD VAE layout), ``metrics.jsonl`` and
``reconstructions.png`` (originals above their reconstructions).

Every ``save_every`` steps (and at the end) the run is checkpointed into ``checkpoint/`` with
:mod:`difflab.train.checkpoint` (atomic; weights, optimiser, LR schedule, step, data position
and both generators; with a discriminator also its weights, as ``discriminator.*`` keys
beside the autoencoder's, and its Adam state, as parameter groups after the autoencoder's),
so ``resume=True`` continues an interrupted run bit for bit on CPU.  The autoencoder itself
(``config.json`` + weights) is written only when training finishes.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data import DataConfig, build_dataset
from ..models.discriminator import PatchDiscriminator
from ..models.vae import AutoencoderKL, VAEConfig
from ..samplers.common import progress as progress_bar
from .checkpoint import Checkpoint, find_checkpoint, load_checkpoint, save_checkpoint
from .config import LoopConfig
from .gan_loss import GANConfig, adaptive_weight, hinge_d_loss, hinge_g_loss
from .loop import run_steps
from .monitor import MetricsLog, truncate_metrics
from .optim import build_optimizer, step_lr_schedule
from .perceptual import PerceptualLoss
from .stream import BatchStream
from .validation import _item, split_dataset

__all__ = ["AutoencoderRun", "train_autoencoder"]


@dataclass
class AutoencoderRun:
    """What :func:`train_autoencoder` produced and measured.

    :param l1: mean absolute reconstruction error per pixel (posterior means, [-1, 1] scale).
    :param psnr: reconstruction PSNR in dB for the [-1, 1] range (peak-to-peak 2).
    :param latent_std: std of the unscaled posterior samples; ``scaling_factor = 1 / it``.
    :param held_out_psnr: the last evaluation's PSNR on the held-out images (None: none held).
    :param rfid: the last evaluation's reconstruction FID (digits-classifier features; None
        when not computed).
    """

    folder: Path
    steps: int
    seconds: float
    final_loss: float
    l1: float
    psnr: float
    latent_std: float
    scaling_factor: float
    held_out_psnr: float | None = None
    rfid: float | None = None


@dataclass
class _Parts:
    """The trained networks and their optimisers (the discriminator's when there is one)."""

    model: AutoencoderKL
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    disc: PatchDiscriminator | None = None
    d_opt: torch.optim.Optimizer | None = None
    perceptual: PerceptualLoss | None = None


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
    gan: GANConfig | None = None,
    perceptual_weights: str | Path | None = None,
    perceptual_weight: float = 1.0,
    val_fraction: float = 0.05,
    eval_every: int = 500,
    fid: bool | None = None,
    seed: int = 0,
    progress: bool | None = None,
    log_every: int = 50,
    save_every: int = 500,
    resume: bool = False,
    device: str | torch.device | None = None,
    stop_at: int | None = None,
) -> AutoencoderRun | None:
    """Train an :class:`AutoencoderKL` on ``data`` and save it to ``out`` (see module doc).

    :param gan: the PatchGAN discriminator and its schedule (None: no adversarial term).
    :param perceptual_weights: a local LPIPS-style network (:mod:`difflab.train.perceptual`);
        None leaves the perceptual term out.
    :param perceptual_weight: its factor (LDM: 1.0).
    :param val_fraction: images held out of training for the evaluations
        (``split_dataset(data, val_fraction, seed)``; 0: none, no evaluations).
    :param eval_every: evaluate on the held-out images every this many steps and at the end.
    :param fid: log the reconstruction FID with the digits classifier's features (None: when
        the data are the digits).
    :param save_every: checkpoint every this many steps (0: only at the end).
    :param resume: continue from ``out/checkpoint`` (a fresh start when there is none).
    :param device: torch device (default: CUDA when available, else CPU).
    :param stop_at: checkpoint and return None after this step, as an interrupted run would.
    :raises ValueError: bad sizes (image side not a multiple of the downsampling factor,
        channel mismatch, images too small for the discriminator) or arguments, a checkpoint
        in ``out`` without ``resume``, or a resumed checkpoint of other settings.
    """
    if steps < 1 or batch_size < 1 or lr <= 0 or kl_weight < 0 or save_every < 0:
        raise ValueError(
            f"need steps >= 1, batch_size >= 1, lr > 0, kl_weight >= 0, save_every >= 0; got "
            f"{steps}, {batch_size}, {lr}, {kl_weight}, {save_every}"
        )
    if perceptual_weight < 0 or eval_every < 1 or not 0 <= val_fraction < 1:
        raise ValueError(
            f"need perceptual_weight >= 0, eval_every >= 1 and 0 <= val_fraction < 1; got "
            f"{perceptual_weight}, {eval_every}, {val_fraction}"
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
    if fid and data.channels != 1:
        raise ValueError(f"fid=True scores with the digits classifier: it needs 1-channel "
                         f"images, got data.channels={data.channels}")  # fmt: skip
    out = Path(out)
    ckpt_dir = out / "checkpoint"
    settings = {
        "data": data.to_dict(), "vae": vae.to_diffusers(), "batch_size": batch_size, "lr": lr,
        "warmup_steps": warmup_steps, "kl_weight": kl_weight, "seed": seed,
        "gan": gan.to_dict() if gan is not None else None, "val_fraction": val_fraction,
        "perceptual": None if perceptual_weights is None
        else {"weights": str(perceptual_weights), "weight": perceptual_weight},
    }  # fmt: skip
    if find_checkpoint(ckpt_dir) is not None and not resume:
        raise ValueError(
            f"{ckpt_dir} holds a checkpoint of an earlier run; resume it (--resume) or start "
            "over in a new folder (--overwrite deletes this one)"
        )
    dev = torch.device(device) if device is not None else _default_device()
    parts = _build(vae, data, lr, warmup_steps, steps, gan, perceptual_weights, seed, dev)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    data_gen = torch.Generator().manual_seed(seed + 1)
    dataset, report = build_dataset(data, generator=data_gen)
    print(report)
    dataset, held_set = split_dataset(dataset, val_fraction, seed)
    held = _HeldOut(held_set, seed, data, fid, dev) if held_set is not None else None
    stream = BatchStream(dataset, batch_size, seed=seed)
    first = 1
    if resume and find_checkpoint(ckpt_dir) is not None:
        first = 1 + _restore(ckpt_dir, settings, steps, parts, stream, gen, data_gen)
    out.mkdir(parents=True, exist_ok=True)
    if first > 1:  # resumed: the steps after the checkpoint are logged again
        truncate_metrics(out, first - 1)
    log = MetricsLog(out, tensorboard=False)
    task = _AutoencoderTask(
        parts, stream, gen, data_gen, log, ckpt_dir, held, settings, steps=steps,
        kl_weight=kl_weight, perceptual_weight=perceptual_weight, gan=gan,
        log_every=log_every, eval_every=eval_every, step=first - 1,
    )  # fmt: skip
    last = steps if stop_at is None or stop_at < first else min(stop_at, steps)
    try:
        bar = progress_bar(range(first, steps + 1), total=steps - first + 1, desc="autoencoder",
                           disable=None if progress is None else not progress)  # fmt: skip
        run_steps(task, bar, last, save_every=save_every, signals=False)
        if stop_at is not None and first <= stop_at == task.step:  # cut off: no autoencoder
            return None
        model = parts.model.eval()
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
        final_loss=task.loss,
        l1=stats["l1"],
        psnr=stats["psnr"],
        latent_std=stats["latent_std"],
        scaling_factor=model.config.scaling_factor,
        held_out_psnr=task.evaluation.get("psnr_held_out"),
        rfid=task.evaluation.get("rfid_digits"),
    )


class _AutoencoderTask:
    """The autoencoder as a task of the core loop (:func:`difflab.train.loop.run_steps`):
    its step (:func:`_train_step`), metrics and held-out evaluation, and checkpoint."""

    def __init__(
        self, parts: _Parts, stream: BatchStream, gen: torch.Generator,
        data_gen: torch.Generator, log: MetricsLog, ckpt_dir: Path, held: _HeldOut | None,
        settings: dict[str, Any], *, steps: int, kl_weight: float, perceptual_weight: float,
        gan: GANConfig | None, log_every: int, eval_every: int, step: int,
    ) -> None:  # fmt: skip
        self.parts, self.stream, self.gen, self.data_gen = parts, stream, gen, data_gen
        self.log, self.run_dir, self.held, self.settings = log, ckpt_dir, held, settings
        self.steps, self.kl_weight, self.perceptual_weight = steps, kl_weight, perceptual_weight
        self.gan, self.log_every, self.eval_every = gan, log_every, eval_every
        self.step = step
        self.loss = float("nan")
        self.evaluation: dict[str, float] = {}

    def train_step(self) -> dict[str, Any]:
        """One step on the next batch; a non-finite loss stops the run."""
        step = self.step + 1
        x = self.stream.next()["image"].float().to(next(self.parts.model.parameters()).device)
        adversarial = self.gan is not None and step > self.gan.start
        record = _train_step(
            self.parts, x, self.gen, kl_weight=self.kl_weight,
            perceptual_weight=self.perceptual_weight,
            disc_weight=self.gan.weight if adversarial and self.gan is not None else None,
        )  # fmt: skip
        self.step, self.loss = step, record["loss"]
        if not math.isfinite(self.loss):
            raise FloatingPointError(f"autoencoder loss is {self.loss} at step {step}")
        return record

    def after_step(self, record: dict[str, Any], last: int) -> int:
        """Log every ``log_every`` steps and at the end; evaluate the held-out images."""
        step = self.step
        if step % self.log_every == 0 or step == self.steps:
            lr = self.parts.optimizer.param_groups[0]["lr"]
            self.log.log({"step": step, **record, "lr": lr})
        if self.held is not None and (step % self.eval_every == 0 or step == self.steps):
            self.evaluation = self.held.evaluate(self.parts.model)
            self.log.log({"event": "eval", "step": step, **self.evaluation})
        return last

    def save(self) -> None:
        """Checkpoint the networks, optimisers, LR schedule, data position and generators."""
        model_state, opt_state = _state_dicts(self.parts)
        save_checkpoint(self.run_dir, Checkpoint(
            model=model_state, ema={}, optimizer=opt_state,
            rng={"noise": self.gen.get_state(), "data": self.data_gen.get_state()},
            meta={"step": self.step, "steps": self.steps, "settings": self.settings,
                  "data_position": self.stream.position,
                  "lr_schedule": self.parts.schedule.state_dict()},
        ))  # fmt: skip

    def stopping(self, stop: list[int]) -> bool:
        return bool(stop)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _build(
    vae: VAEConfig, data: DataConfig, lr: float, warmup_steps: int, steps: int,
    gan: GANConfig | None, perceptual_weights: str | Path | None, seed: int, dev: torch.device,
) -> _Parts:  # fmt: skip
    """The autoencoder (weights from ``seed``), its AdamW + schedule, and when asked the
    discriminator (weights from ``seed + 2``) with Adam(β = 0.5, 0.9) and the perceptual net."""
    model = AutoencoderKL(vae, generator=torch.Generator().manual_seed(seed)).to(dev).train()
    optimizer, schedule = build_optimizer(
        model, LoopConfig(lr=lr, warmup_steps=min(warmup_steps, steps), max_steps=steps)
    )
    parts = _Parts(model, optimizer, schedule)
    if gan is not None:
        disc = PatchDiscriminator(vae.in_channels, gan.channels, gan.layers, gan.norm,
                                  generator=torch.Generator().manual_seed(seed + 2))  # fmt: skip
        disc.check_image_side(data.image_size)
        parts.disc = disc.to(dev).train()
        parts.d_opt = torch.optim.Adam(disc.parameters(), lr=gan.lr or lr, betas=(0.5, 0.9))
    if perceptual_weights is not None:
        parts.perceptual = PerceptualLoss.from_file(perceptual_weights).to(dev)
    return parts


def _train_step(
    parts: _Parts, x: Tensor, gen: torch.Generator, *, kl_weight: float,
    perceptual_weight: float, disc_weight: float | None,
) -> dict[str, float]:  # fmt: skip
    """One step of LDM's autoencoder loss (appendix G); the adversarial part (generator,
    then discriminator update) only when ``disc_weight`` is given.  Returns the numbers."""
    model = parts.model
    rec, posterior = model(x, generator=gen)
    l1 = (rec - x).abs().flatten(1).sum(1)  # (B,) summed over each image
    record: dict[str, float] = {}
    if parts.perceptual is None:
        rec_loss = l1.mean()
    else:  # LDM adds the distance to every pixel's error before the sum over the image
        dist = parts.perceptual(x, rec)  # (B,)
        rec_loss = (l1 + perceptual_weight * x[0].numel() * dist).mean()
        record["perceptual"] = float(dist.detach().mean())
    kl = posterior.kl().mean()
    loss = rec_loss + kl_weight * kl
    if disc_weight is not None:
        assert parts.disc is not None and parts.d_opt is not None
        g_loss = hinge_g_loss(parts.disc(rec))
        weight = adaptive_weight(rec_loss, g_loss, model.decoder.conv_out.weight,
                                 disc_weight=disc_weight)  # fmt: skip
        loss = loss + weight * g_loss
    parts.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    parts.optimizer.step()
    step_lr_schedule(parts.schedule)
    record = {"loss": float(loss.detach()),
              "l1_per_pixel": float(l1.detach().mean()) / x[0].numel(),
              "kl": float(kl.detach()), **record}  # fmt: skip
    if disc_weight is not None:  # the discriminator's step, on the same reconstructions
        assert parts.d_opt is not None and parts.disc is not None  # set with a GAN
        parts.d_opt.zero_grad(set_to_none=True)  # drops what g_loss left on it
        real, fake = parts.disc(x), parts.disc(rec.detach())
        d_loss = hinge_d_loss(real, fake)
        d_loss.backward()
        parts.d_opt.step()
        record.update(g_loss=float(g_loss.detach()), d_weight=float(weight),
                      d_loss=float(d_loss.detach()), logits_real=float(real.detach().mean()),
                      logits_fake=float(fake.detach().mean()))  # fmt: skip
    return record


# ------------------------------------------------------------------ checkpoint of the parts
_DISC = "discriminator."  # prefix of the discriminator's weights in the checkpoint's model


def _state_dicts(parts: _Parts) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The checkpoint's weights and optimiser state: the autoencoder's, and the
    discriminator's under ``discriminator.`` / as extra parameter groups after them."""
    model, opt = dict(parts.model.state_dict()), parts.optimizer.state_dict()
    if parts.disc is None or parts.d_opt is None:
        return model, opt
    model.update({_DISC + k: v for k, v in parts.disc.state_dict().items()})
    d_opt = parts.d_opt.state_dict()
    n = sum(len(g["params"]) for g in opt["param_groups"])
    return model, {
        "state": {**opt["state"], **{n + k: v for k, v in d_opt["state"].items()}},
        "param_groups": [*opt["param_groups"],
                         *({**g, "params": [n + p for p in g["params"]]}
                           for g in d_opt["param_groups"])],
    }  # fmt: skip


def _load_state_dicts(parts: _Parts, model: dict[str, Tensor], opt: dict[str, Any]) -> None:
    """Inverse of :func:`_state_dicts` into the live parts."""
    parts.model.load_state_dict({k: v for k, v in model.items() if not k.startswith(_DISC)})
    groups = len(parts.optimizer.param_groups)
    n = sum(len(g["params"]) for g in opt["param_groups"][:groups])
    state = {int(k): v for k, v in opt["state"].items()}
    parts.optimizer.load_state_dict({
        "state": {k: v for k, v in state.items() if k < n},
        "param_groups": opt["param_groups"][:groups],
    })  # fmt: skip
    if parts.disc is None or parts.d_opt is None:
        return
    parts.disc.load_state_dict({k[len(_DISC):]: v for k, v in model.items()
                                if k.startswith(_DISC)})  # fmt: skip
    parts.d_opt.load_state_dict({
        "state": {k - n: v for k, v in state.items() if k >= n},
        "param_groups": [{**g, "params": [p - n for p in g["params"]]}
                         for g in opt["param_groups"][groups:]],
    })  # fmt: skip


# What checkpoints written before these settings existed were trained with.
_LEGACY_SETTINGS = {"gan": None, "perceptual": None, "val_fraction": 0.0}


def _restore(
    ckpt_dir: Path,
    settings: dict[str, Any],
    steps: int,
    parts: _Parts,
    stream: BatchStream,
    gen: torch.Generator,
    data_gen: torch.Generator,
) -> int:
    """Load the checkpoint into the live objects; returns its step."""
    ck = load_checkpoint(ckpt_dir, optimizer_like=_state_dicts(parts)[1])
    meta = ck.meta
    saved = {**_LEGACY_SETTINGS, **meta["settings"]}
    changed = sorted(k for k in settings if saved.get(k) != settings[k])
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
    _load_state_dicts(parts, ck.model, ck.optimizer)
    parts.schedule.load_state_dict(meta["lr_schedule"])
    stream.epoch = int(meta["data_position"]["epoch"])
    stream.index = int(meta["data_position"]["index"])
    gen.set_state(ck.rng["noise"])
    data_gen.set_state(ck.rng["data"])
    return int(meta["step"])


# ------------------------------------------------------------------ held-out evaluation
class _HeldOut:
    """The held-out images (flips fixed per image, as the trainer's validation) and, for
    the digits, the classifier features' statistics of the originals."""

    def __init__(
        self, held_set: Any, seed: int, data: DataConfig, fid: bool | None, dev: torch.device
    ) -> None:
        self.images = torch.stack([_item(held_set, i, seed)["image"]
                                   for i in range(len(held_set))]).float()  # fmt: skip
        self.dev = dev
        self.extractor = self.reference = None
        if (data.source == "digits" if fid is None else fid) and len(self.images) >= 2:
            from ..eval.features import DigitsClassifier
            from ..eval.metrics import FeatureStats, to_uint8

            self.extractor = DigitsClassifier(device=dev)
            feats = self.extractor(to_uint8(self.images))
            self.reference = FeatureStats.from_features(feats, self.extractor.id)

    @torch.no_grad()
    def evaluate(self, model: AutoencoderKL) -> dict[str, float]:
        """PSNR (dB, [-1, 1] range) and mean L1 of the posterior-mean reconstructions, and
        their FID against the originals (digits-classifier features) when set up."""
        model.eval()
        rec = torch.cat([model.decode(model.encode(x.to(self.dev)).mean).float().cpu()
                         for x in self.images.split(256)])  # fmt: skip
        model.train()
        err = rec - self.images
        result = {"n_held_out": len(self.images), "l1_held_out": float(err.abs().mean()),
                  "psnr_held_out": _psnr(float((err**2).mean()))}  # fmt: skip
        if self.extractor is not None and self.reference is not None:
            from ..eval.metrics import FeatureStats, frechet_distance, to_uint8

            ref = self.reference
            got = FeatureStats.from_features(self.extractor(to_uint8(rec)), ref.extractor)
            result["rfid_digits"] = frechet_distance(ref.mean, ref.cov, got.mean, got.cov)
        return result


def _psnr(mse: float) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2): ``10 log10(4 / mse)``."""
    return 10 * math.log10(4.0 / max(mse, 1e-12))


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
        "psnr": _psnr(mse),
    }


@torch.no_grad()
def _save_reconstructions(model: AutoencoderKL, dataset: Any, path: Path, n: int = 8) -> None:
    from ..images import save_grid

    x = torch.stack([dataset[i]["image"] for i in range(min(n, len(dataset)))]).float()
    rec = model.decode(model.encode(x.to(next(model.parameters()).device)).mean).clamp(-1, 1)
    save_grid(
        torch.cat([x, rec.cpu()]), path, nrow=len(x), params={"what": "originals / reconstructions"}
    )
