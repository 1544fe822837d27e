"""Pictures of the guidance refinements and of inpainting on the digits demo model.

Draws, from one trained run (``difflab demo``'s, or ``--run``), the same seeds under:

- CFG w = 1 (no guidance), CFG w = 4, w = 4 guided only at σ/α <= 1 (guidance interval,
  Kynkäänniemi et al. 2024), and w = 4 with APG (Sadat et al. 2025; η = 0, β = -0.5, r = 1),
  one row per class, written to ``docs/img/guidance_demo.png``;
- inpainting (``Pipeline.img2img(..., mask=)``): real digits, the hole (their lower half)
  and four completions each conditioned on the digit's own class, written to
  ``docs/img/inpaint_demo.png``.

The FID / accuracy of each guidance setting is measured by ``difflab sweep`` (tables in
docs/evaluation.md); these figures show what the numbers mean.

Usage::

    python bench/guidance_digits.py                 # trains the demo first (~2 min)
    python bench/guidance_digits.py --run runs/demo
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from difflab import Pipeline  # noqa: E402
from difflab.cli import run_demo  # noqa: E402
from difflab.data import digits_tensor  # noqa: E402
from difflab.images import make_grid  # noqa: E402

IMG = Path(__file__).parents[1] / "docs" / "img"

SETTINGS = [
    ("no guidance (w = 1)", dict(guidance_scale=1.0)),
    ("CFG w = 4", dict(guidance_scale=4.0)),
    ("w = 4 at σ ≤ 1 only (interval)", dict(guidance_scale=4.0, guidance_interval=(0.0, 1.0))),
    (
        "w = 4, APG (η 0, β -0.5, r 1)",
        dict(guidance_scale=4.0, apg={"eta": 0.0, "momentum": -0.5, "norm_threshold": 1.0}),
    ),
]


def guidance_figure(pipe: Pipeline, out: Path, per_class: int = 6) -> Path:
    labels = [k for k in range(10) for _ in range(per_class)]
    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(3.2 * len(SETTINGS), 5.4))
    for ax, (title, kw) in zip(axes, SETTINGS):
        images = pipe(len(labels), labels, None, "dpmpp_2m", 20, seed=0, progress=False, **kw)
        ax.imshow(np.asarray(make_grid(images, per_class)), cmap="gray", interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle("Same seeds, one row per class (dpmpp_2m, 20 steps)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def inpaint_figure(pipe: Pipeline, out: Path, n_digits: int = 6, variants: int = 4) -> Path:
    images, labels = digits_tensor(8)
    pick = torch.arange(n_digits) * 97 % len(images)  # a spread of real digits
    real, classes = images[pick], labels[pick]
    hole = torch.zeros(1, 1, 8, 8)
    hole[..., 4:, :] = 1.0  # regenerate the lower half
    rows = [real, real * (1 - hole) + hole * 0.0]  # the digits, then the hole in grey
    for v in range(variants):
        result = pipe.img2img(real, 1.0, classes, None, "dpmpp_2m", 20, seed=100 * v,
                              progress=False, mask=hole)  # fmt: skip
        rows.append(result.images)
    grid = torch.stack(rows, 1).flatten(0, 1)  # digit by digit: real, masked, completions
    fig, ax = plt.subplots(figsize=(1.0 * (variants + 2) + 0.6, 1.0 * n_digits + 0.6))
    ax.imshow(np.asarray(make_grid(grid, variants + 2)), cmap="gray", interpolation="nearest")
    ax.set_title("real | lower half to fill | 4 completions (class-conditional)", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=None, help="a trained digits run (default: train)")
    p.add_argument("--out", type=Path, default=IMG)
    args = p.parse_args()
    run = args.run
    if run is None:
        run = Path(tempfile.mkdtemp()) / "demo"
        run_demo(out=run, progress=False)
    pipe = Pipeline.from_run(run)
    args.out.mkdir(parents=True, exist_ok=True)
    print("wrote", guidance_figure(pipe, args.out / "guidance_demo.png"))
    print("wrote", inpaint_figure(pipe, args.out / "inpaint_demo.png"))


if __name__ == "__main__":
    main()
