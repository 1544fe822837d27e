"""DreamBooth on the digits, measured: five upside-down sevens become "sks" sevens, with and
without prior preservation (Ruiz et al. 2023).

1. The text demo (``difflab demo --text``: captions through a text encoder trained with the
   U-Net), or ``--base``.
2. Instance data: 5 sevens flipped upside down, captioned "a handwritten digit sks seven"
   ("sks" is no caption word of the base run, so it encodes as the rarely seen ``<unk>``
   token: DreamBooth's rare-token identifier).
3. LoRA fine-tuning on them, once with prior preservation (100 base-run samples of "a
   handwritten digit seven", λ = 1) and once without.
4. 100 samples per prompt, scored by the demo's SVM: "sks seven" samples flipped back
   (did it learn the instance?), "seven" samples as drawn (is the class prior intact?),
   and "three" as drawn (are other prompts untouched?).

Usage::

    python bench/dreambooth_digits.py            # ~6 min on one CPU thread
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difflab import Pipeline
from difflab.cli import finetune_config, run_demo
from difflab.data import digits_accuracy, load_digits_dataset
from difflab.images import save_grid
from difflab.train import train

RESULTS = Path(__file__).parent / "results" / "dreambooth_digits.md"
INSTANCE = "a handwritten digit sks seven"


def instance_folder(folder: Path, n: int = 5) -> Path:
    """``n`` real sevens flipped upside down, as a captioned folder (metadata.jsonl)."""
    data, _ = load_digits_dataset(8)
    sevens = [i for i in range(len(data)) if data[i]["class_label"] == 7][:n]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as fh:
        for k, i in enumerate(sevens):
            img = ((data[i]["image"][0].flip(0) + 1) * 127.5).round().byte().numpy()
            Image.fromarray(np.asarray(img)).save(folder / f"{k}.png")
            fh.write(json.dumps({"file_name": f"{k}.png", "text": INSTANCE}) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, default=None, help="an existing `demo --text` run")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="dreambooth_digits_"))
    base = args.base
    if base is None:
        base = work / "base"
        run_demo(base, text=True, log=lambda _: None, progress=False)
    data = instance_folder(work / "instance")
    overrides = ["data.source=captions", f"data.path={data}", "data.image_size=8",
                 f"train.max_steps={args.steps}", "train.warmup_steps=20", f"train.lr={args.lr}",
                 "train.log_every=50"]  # fmt: skip
    labels = torch.full((100,), 7)
    rows, seconds = [], {}
    for name, prior in (
        ("with prior preservation", "a handwritten digit seven"),
        ("without", None),
    ):
        out = work / ("prior" if prior else "noprior")
        batch = ["train.batch_size=32"] if prior else ["train.batch_size=5"]  # 5 images alone
        cfg = finetune_config(base, out, rank=4, targets="attention+conv",
                              overrides=[*overrides, *batch], prior=prior,
                              prior_images=100)  # fmt: skip
        start = time.perf_counter()
        train(cfg, progress=False)
        seconds[name] = time.perf_counter() - start
        pipe = Pipeline.from_run(out)
        sks = pipe(n=100, prompt=INSTANCE, seed=0)
        seven = pipe(n=100, prompt="a handwritten digit seven", seed=0)
        three = pipe(n=100, prompt="a handwritten digit three", seed=0)
        save_grid(torch.cat([sks[:10], seven[:10], three[:10]]), work / f"{out.name}.png", nrow=10)
        rows.append((
            name,
            digits_accuracy(sks.flip(-2), labels),
            digits_accuracy(seven, labels),
            digits_accuracy(three, torch.full((100,), 3)),
        ))  # fmt: skip
    base_pipe = Pipeline.from_run(base)
    base_row = (
        "base run (no fine-tuning)",
        digits_accuracy(base_pipe(n=100, prompt=INSTANCE, seed=0).flip(-2), labels),
        digits_accuracy(base_pipe(n=100, prompt="a handwritten digit seven", seed=0), labels),
        digits_accuracy(base_pipe(n=100, prompt="a handwritten digit three", seed=0),
                        torch.full((100,), 3)),
    )  # fmt: skip
    lines = [
        "# DreamBooth on the digits: five upside-down sevens",
        "",
        f"`python bench/dreambooth_digits.py --steps {args.steps} --lr {args.lr:g}` "
        f"({args.threads} thread, "
        f"torch {torch.__version__}). Base: `difflab demo --text`. Instance data: 5 real "
        f'sevens flipped upside down, captioned "{INSTANCE}". LoRA rank 4 on attention + '
        f"convolutions, {args.steps} steps at lr {args.lr:g}, batch 32 with the prior (about "
        "half of it instance images), 5 without (the five images; fine-tuning took "
        + ", ".join(f"{s:.0f} s {n}" for n, s in seconds.items())
        + '). Prior: 100 base-run samples of "a handwritten digit seven", λ = 1. 100 '
        "samples per prompt (DPM-Solver++(2M), 20 steps, CFG 2), scored by the demo's SVM.",
        "",
        '| model | "sks seven", flipped back: is a 7 | "seven" as drawn: is a 7 | '
        '"three" as drawn: is a 3 |',
        "|---|---:|---:|---:|",
    ]
    for name, sks, seven, three in [base_row, *rows]:
        lines.append(f"| {name} | {100 * sks:.0f}% | {100 * seven:.0f}% | {100 * three:.0f}% |")
    lines += ["", "First column: how much of the instance (upside-down sevens) the identifier "
              "learned; second: whether the class prompt kept drawing upright sevens (prior "
              "preservation's purpose); third: an unrelated prompt."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
