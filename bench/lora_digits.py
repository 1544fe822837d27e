"""LoRA fine-tuning, measured: teach the digits demo model to draw its digits upside down.

1. Train the ``difflab demo`` model (class-conditional, 800 steps) or reuse ``--base``.
2. Fine-tune LoRA adapters (Hu et al. 2021) on the same digits flipped upside down, with
   ``difflab.cli.finetune_config`` (only the adapters train).
3. Sample 100 class-conditional digits per setting and score them with the demo's SVM,
   upright and flipped back: at LoRA scale 0 the base model must come out exactly (upright
   digits), at scale 1 upside-down digits of the requested class.

Usage::

    python bench/lora_digits.py                       # ~4 min on one CPU thread
    python bench/lora_digits.py --base runs/demo --rank 8 --steps 500
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from difflab import Pipeline
from difflab.cli import finetune_config, run_demo
from difflab.data import digits_accuracy
from difflab.finetune import LORA_FILE
from difflab.images import save_grid
from difflab.train import train

RESULTS = Path(__file__).parent / "results" / "lora_digits.md"


def flipped_digits(path: Path) -> Path:
    """The 1,797 digits upside down, as an ``npz`` data source (uint8, labels)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images[:, ::-1, :] / 16 * 255).astype(np.uint8)
    np.savez(path, images=images, labels=d.target)
    return path


def side_by_side(paths: list[Path], out: Path, pad: int = 8, zoom: int = 3) -> None:
    """The PNG grids ``paths`` next to each other, ``zoom`` times enlarged."""
    from PIL import Image

    images = [Image.open(p) for p in paths]
    w, h = images[0].size
    canvas = Image.new(images[0].mode, (len(images) * (w + pad) - pad, h), color=255)
    for i, img in enumerate(images):
        canvas.paste(img, (i * (w + pad), 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.resize((canvas.width * zoom, canvas.height * zoom), Image.NEAREST).save(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, default=None, help="an existing demo run to adapt")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--targets", default="attention+conv")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="lora_digits_"))
    base = args.base
    start = time.perf_counter()
    if base is None:
        base = work / "base"
        run_demo(base, log=lambda _: None, progress=False)
    base_s = time.perf_counter() - start

    data = flipped_digits(work / "flipped.npz")
    overrides = ["data.source=npz", f"data.path={data}", f"train.max_steps={args.steps}",
                 f"train.lr={args.lr}", "train.warmup_steps=20"]  # fmt: skip
    cfg = finetune_config(base, work / "lora", rank=args.rank, targets=args.targets,
                          overrides=overrides)  # fmt: skip
    start = time.perf_counter()
    train(cfg, progress=False)
    lora_s = time.perf_counter() - start
    adapter = work / "lora" / LORA_FILE

    labels = torch.arange(10).repeat_interleave(10)
    kw = dict(n=100, class_labels=labels, sampler="dpmpp_2m", steps=20, guidance_scale=2.0,
              seed=0)  # fmt: skip
    reference = Pipeline.from_run(base)(**kw)
    rows = []
    for scale in (0.0, 0.5, 1.0):
        pipe = Pipeline.from_run(base)
        pipe.load_lora(adapter, scale=scale)
        images = pipe(**kw)
        save_grid(images, work / f"scale_{scale:g}.png", nrow=10, params=pipe.resolve_params(**kw))
        rows.append((
            scale,
            digits_accuracy(images, labels),
            digits_accuracy(images.flip(-2), labels),
            bool(torch.equal(images, reference)),
        ))  # fmt: skip
    trainable = sum(t.numel() for t in load_file(adapter).values())
    lines = [
        "# LoRA fine-tuning: the digits demo model learns upside-down digits",
        "",
        f"`python bench/lora_digits.py --rank {args.rank} --targets {args.targets} "
        f"--steps {args.steps} --lr {args.lr}` ({args.threads} thread, torch "
        f"{torch.__version__}). Base: the `difflab demo` model "
        f"({'trained here in ' + format(base_s, '.0f') + ' s' if args.base is None else base}); "
        f"LoRA: rank {args.rank} on `{args.targets}`, {trainable:,} adapter weights, "
        f"{args.steps} steps on the 1,797 digits flipped upside down, {lora_s:.0f} s. "
        "100 class-conditional samples (10 per digit, DPM-Solver++(2M), 20 steps, CFG 2, "
        "seed 0) scored by the demo's SVM as drawn and flipped back upright.",
        "",
        "| LoRA scale | SVM accuracy as drawn (upright digits) | flipped back (upside-down "
        "digits) | identical to the base model |",
        "|---:|---:|---:|---|",
    ]
    for scale, upright, flipped, same in rows:
        lines.append(f"| {scale:g} | {100 * upright:.0f}% | {100 * flipped:.0f}% | {same} |")
    picture = args.out.with_suffix(".png")
    side_by_side([work / f"scale_{scale:g}.png" for scale, *_ in rows], picture)
    lines += [
        "",
        f"![grids at LoRA scale 0, 0.5 and 1, one row per digit]({picture.name})",
        "",
        "The grids at scale 0, 0.5 and 1 (left to right; one row per digit, 3x enlarged).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
