"""What a run reports while it trains: ``metrics.jsonl``, TensorBoard, fixed-seed sample grids.

Owns the metric log (one JSON object per line, appended and flushed), the plain log line
printed in place of the progress bar when output goes to a file (``log_line``), the picture
of a run's metrics (``plot_metrics``: ``metrics.png``, training loss, learning rate,
validation loss and periodic evaluations against the step), the optional
TensorBoard writer (used when ``torch.utils.tensorboard`` imports), and the sample grids
drawn from the raw and the EMA weights with the same seed every time
(``samples/step_XXXXXX_{raw,ema}.png``).  Grids go through ``difflab.samplers.sample``;
knows no sampler internals.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..images import new_figure, save_figure, save_grid
from ..schedules import NoiseSchedule
from .config import TrainConfig

__all__ = ["MetricsLog", "log_line", "plot_metrics", "sample_grid", "truncate_metrics"]


class MetricsLog:
    """Appends metric dicts to ``run_dir/metrics.jsonl`` (and TensorBoard when enabled)."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        """Write one line; non-finite floats become strings so the line stays valid JSON."""
        clean = {
            k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def truncate_metrics(run_dir: str | Path, step: int) -> int:
    """Drop the records of ``run_dir/metrics.jsonl`` logged after ``step`` (a resumed run
    replays them from its checkpoint) and any line a kill cut short; returns how many.

    The file is rewritten atomically; records without a step are kept.
    """
    from ..runs import atomic_write_bytes

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        later = isinstance(record, dict) and isinstance(record.get("step"), int)
        if not isinstance(record, dict) or (later and record["step"] > step):
            dropped += bool(line.strip())
            continue
        kept.append(line + "\n")
    if dropped:
        atomic_write_bytes(path, "".join(kept).encode("utf-8"))
    return dropped


def log_line(
    record: dict[str, Any],
    total_steps: int,
    elapsed_s: float,
    start_step: int,
    *,
    time_left: float | None = None,
) -> str:
    """One line per logged step for a log file, where a progress bar would be noise:
    ``step 40/60 (67%)  loss 0.5138  lr 8.00e-04  grad 1.27  1480 img/s  epoch 2  ema 0.820
    eta 0:00:01``. The ETA extrapolates this session's steps per second (``start_step`` is
    where it started, e.g. after a resume); ``time_left`` (``train.max_time``) caps it."""
    step = int(record["step"])
    parts = [f"step {step}/{total_steps} ({100 * step / max(total_steps, 1):.0f}%)"]
    for key, fmt in (
        ("loss", "loss {:.4f}"), ("loss_instance", "instance {:.4f}"),
        ("loss_prior", "prior {:.4f}"), ("loss_mix", "mix {:.4f}"), ("lr", "lr {:.2e}"),
        ("grad_norm", "grad {:.3g}"),
        ("imgs_per_s", "{:.0f} img/s"), ("epoch", "epoch {}"), ("ema_decay", "ema {:.3f}"),
    ):  # fmt: skip
        if record.get(key) is not None:
            parts.append(fmt.format(record[key]))
    done = step - start_step
    if done > 0 and step < total_steps:
        left = round(elapsed_s / done * (total_steps - step))
        if time_left is not None:
            left = min(left, round(time_left))
        parts.append(f"eta {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}")
    return "  ".join(parts)


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Draw ``run_dir/metrics.jsonl`` as ``metrics.png`` (or ``out``): one panel each for the
    training loss (log scale; DreamBooth's instance and prior losses too; steps skipped for a
    non-finite loss marked), the learning rate, the validation loss (raw and EMA weights) and
    every periodic-evaluation metric, against the optimiser step. Returns the path, or None
    when the log holds no training step yet."""
    from ..eval.sweep import metric_columns

    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    train = [r for r in records if "event" not in r and isinstance(r.get("loss"), (int, float))]
    if not train:
        return None
    validation = [r for r in records if r.get("event") == "validation"]
    evals = [r for r in records if r.get("event") == "eval"]
    skipped = [r["step"] for r in records if r.get("event") == "nonfinite" or r.get("skipped")]
    panels: list[tuple[str, list[tuple[str, list[dict[str, Any]], str]]]] = [
        ("training loss", [("loss", train, "loss"), ("instance", train, "loss_instance"),
                           ("prior", train, "loss_prior")]),
        ("learning rate", [("lr", train, "lr")]),
    ]  # fmt: skip
    if validation:
        panels.append(("validation loss", [("raw", validation, "val_loss"),
                                           ("EMA", validation, "val_loss_ema")]))  # fmt: skip
    panels += [(key, [(key, evals, key)]) for key in metric_columns(evals)]
    fig, axes = new_figure(1, len(panels), width=3.4, height=2.6)
    for ax, (title, lines) in zip(axes[0], panels):
        for label, rows, key in lines:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            pts = [(x, y) for x, y in pts if math.isfinite(y)]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=label)
        if title == "training loss":
            ax.set_yscale("log")
            for step in skipped:
                ax.axvline(step, color="tab:red", alpha=0.3, linewidth=0.8)
        if sum(1 for _, rows, key in lines if any(key in r for r in rows)) > 1:
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    return save_figure(fig, out or Path(run_dir) / "metrics.png")


@torch.no_grad()
def sample_grid(
    model: nn.Module,
    config: TrainConfig,
    schedule: NoiseSchedule,
    path: Path,
    *,
    device: torch.device,
    null_label: int | None,
    prompts: list[str] | None = None,
    text_encoder: Any = None,
    vae: Any = None,
    formulation: Any = None,
) -> Path:
    """Draw ``config.sample.num_images`` images with a fixed seed and save them as a grid.

    Class-conditional models get labels ``0, 1, 2, ...`` (mod the class count) with
    classifier-free guidance against the null label; text-conditional ones get ``prompts``
    (encoded by ``text_encoder``: ``prompts -> (context, mask)``) against the empty prompt.
    x̂0 is clipped to [-1, 1] as ``Pipeline`` does by default (without it a cosine schedule's
    first step saturates). A latent model's samples are decoded by ``vae`` (and its latents
    are not clipped). The global RNG state is preserved, so drawing grids never changes the
    training run.
    """
    from ..samplers import sample

    mcfg = config.model_config()
    n = config.sample.num_images
    shape = (n, mcfg.in_channels, mcfg.image_size, mcfg.image_size)
    cond = uncond = None
    guidance = 1.0
    if null_label is not None:
        labels = torch.arange(n, device=device) % null_label
        cond = {"class_labels": labels}
        uncond = {"class_labels": torch.full_like(labels, null_label)}
        guidance = config.sample.guidance_scale
    was_training = model.training
    model.eval()
    try:
        rich = getattr(text_encoder, "conditioning", None)  # SDXL: context and vector
        if prompts is not None and rich is not None:  # as Pipeline: no negative prompt
            side = mcfg.image_size * (1 if vae is None else vae.config.downsample_factor)
            cond, uncond = rich(prompts, None, size=(side, side))
            guidance = config.sample.guidance_scale
        elif prompts is not None:
            (ctx, ctx_mask), (empty, empty_mask) = text_encoder(prompts), text_encoder([""] * n)
            cond = {**(cond or {}), "context": ctx, "context_mask": ctx_mask}
            uncond = {**(uncond or {}), "context": empty, "context_mask": empty_mask}
            guidance = config.sample.guidance_scale
        with torch.random.fork_rng(devices=[]):
            images = sample(
                model,
                shape,
                schedule=schedule,
                sampler=config.sample.sampler,
                steps=config.sample.steps,
                prediction=config.diffusion.prediction,
                variance=config.diffusion.variance,
                guidance_scale=guidance,
                cond=cond,
                uncond=uncond,
                generator=torch.Generator().manual_seed(config.seed),
                clip_x0=vae is None,  # as Pipeline: x̂0 clipped to the data range [-1, 1]
                progress=False,
                formulation=formulation,  # edm / flow networks (difflab.formulations)
            )
        if vae is not None:
            with torch.no_grad():
                images = vae.images(images).clamp(-1.0, 1.0)
    finally:
        model.train(was_training)
    params = {
        "sampler": config.sample.sampler,
        "steps": config.sample.steps,
        "guidance_scale": guidance,
        "seed": config.seed,
        "clip_x0": vae is None,
    }
    if prompts is not None:
        params["prompts"] = prompts
    return save_grid(images, path, params=params)
