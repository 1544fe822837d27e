"""Sampling throughput: ``dl.sample`` with difflab's U-Net against diffusers' ``UNet2DModel``
stepped by its ``DDIMScheduler``, at equal architecture and the same DDIM steps.

Both networks are built from one :class:`difflab.models.UNetConfig` (as in
``train_throughput.py``) and sample a batch from the same noise with deterministic DDIM
(Song et al. 2021, eq. 12 with η = 0) on DDPM's linear schedule. In ``bf16``/``fp16`` the
weights are cast: difflab keeps the sampler state in float32 and runs the network in the
half dtype (``model_dtype``), diffusers runs everything in the half dtype, as its pipelines
do. Each (model, precision) is timed in windows taken in turn; the best window counts. On
CUDA, windows are timed after ``torch.cuda.synchronize()``.

Usage::

    python bench/sample_throughput.py --device cuda --batch-size 256 --steps 50
    python bench/sample_throughput.py --preset digits --batch-size 64 --steps 20 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from train_throughput import build, device_name

import difflab as dl
from difflab.models import UNetConfig

RESULTS = Path(__file__).parent / "results" / "sample_throughput.md"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_sampler(name: str, precision: str, args: argparse.Namespace) -> Any:
    """A callable drawing one batch of ``args.steps`` DDIM steps with model ``name``."""
    cfg = UNetConfig.preset(args.preset)
    dtype, device = DTYPES[precision], torch.device(args.device)
    model, _ = build(name, cfg)
    model.eval().to(device, dtype)
    shape = (args.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    if name == "difflab":
        schedule = dl.NoiseSchedule.linear(1000)

        def run() -> torch.Tensor:
            return dl.sample(
                model, schedule=schedule, sampler="ddim", steps=args.steps, spacing="leading",
                noise=noise, model_dtype=dtype, progress=False,
            )  # fmt: skip

        return run
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
        set_alpha_to_one=False, timestep_spacing="leading",
    )  # fmt: skip
    scheduler.set_timesteps(args.steps)

    def run() -> torch.Tensor:
        x = noise.to(dtype)
        for t in scheduler.timesteps:
            eps = model(x, t.to(device)).sample
            x = scheduler.step(eps, t, x).prev_sample
        return x

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    p.add_argument("--models", default="difflab,diffusers")
    p.add_argument("--repeats", type=int, default=3, help="timed windows; the best counts")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    rows = []
    for precision in args.precisions.split(","):
        runs = {name: make_sampler(name, precision, args) for name in args.models.split(",")}
        best = dict.fromkeys(runs, float("inf"))
        with torch.inference_mode():
            for run in runs.values():  # warm-up: kernels, allocator, cuDNN heuristics
                run()
            for _ in range(args.repeats):
                for name, run in runs.items():
                    sync()
                    start = time.perf_counter()
                    x = run()
                    sync()
                    best[name] = min(best[name], time.perf_counter() - start)
                    assert torch.isfinite(x).all(), f"{name} {precision}: non-finite samples"
        for name, seconds in best.items():
            rows.append(
                dict(model=name, precision=precision, images_per_s=args.batch_size / seconds)
            )
        del runs
        print(f"done: {precision}", file=sys.stderr)

    base = {r["precision"]: r["images_per_s"] for r in rows if r["model"] == "diffusers"}
    lines = [
        f"Preset `{args.preset}`, batch {args.batch_size}, {args.steps} DDIM steps, best of "
        f"{args.repeats} windows after one warm-up batch, torch {torch.__version__}, "
        f"{device_name(args.device)}" + ("" if cuda else f", {args.threads} threads") + ".",
        "",
        "| model | precision | images/s | vs diffusers |",
        "|---|---|---:|---:|",
    ]
    for r in rows:
        ratio = r["images_per_s"] / base[r["precision"]] if r["precision"] in base else float("nan")
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['images_per_s']:.1f} | {ratio:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(
        ["python bench/sample_throughput.py", *(sys.argv[1:] if argv is None else argv)]
    )
    args.out.write_text(f"# Sampling throughput\n\n`{command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
