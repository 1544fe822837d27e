"""The floor of FID/KID[digits-cnn] on the embedded digits: real images scored as if generated.

A generated set cannot be expected to score better than real digits the model never saw.
Prints (and writes ``bench/results/digits_floor.md``) the metrics of

* the classifier's held-out real digits against its training digits, and
* the held-out real digits against all 1,797 digits (the reference ``difflab sweep`` and
  ``difflab eval`` use for a digits run), and
* ``n`` real digits drawn with replacement against all digits, for the ``n`` of a sweep,

in the feature space of the digits classifier (``difflab.eval.DigitsClassifier``).

    python bench/digits_floor.py [--n 2000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from difflab.eval import DigitsClassifier, evaluate
from difflab.eval.features import digits_data, digits_split

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="size of the resampled real set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results" / "digits_floor.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()

    clf = DigitsClassifier()
    images, labels = digits_data()
    train, held = digits_split(len(images))
    gen = torch.Generator().manual_seed(args.seed)
    resampled = torch.randint(len(images), (args.n,), generator=gen)
    cases = [
        ("held-out real vs classifier-train real", images[held], labels[held], images[train]),
        ("held-out real vs all real", images[held], labels[held], images),
        (f"{args.n} real (with replacement) vs all real", images[resampled],
         labels[resampled], images),
    ]  # fmt: skip
    rows = []
    for name, fake, fake_labels, real in cases:
        res = evaluate(
            fake,
            real,
            extractor=clf,
            classifier=clf,
            labels=fake_labels,
            metrics=("fid", "kid", "accuracy"),
            kid_subsets=100,
            generator=args.seed,
        )
        rows.append((name, res["n"], res["n_ref"], res["fid[digits-cnn]"],
                     res["kid[digits-cnn]"], res["accuracy[digits-cnn]"]))  # fmt: skip

    lines = [
        "# FID/KID floor of the embedded digits (bench/digits_floor.py)",
        "",
        f"Digits classifier held-out accuracy {clf.accuracy:.4f}; "
        f"torch {torch.__version__}; {time.perf_counter() - start:.0f} s.",
        "",
        "| real set scored as 'generated' | n | n_ref | FID[digits-cnn] | KID[digits-cnn] "
        "| accuracy[digits-cnn] |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, n, n_ref, fid, kid_, acc in rows:
        lines.append(f"| {name} | {n} | {n_ref} | {fid:.3f} | {kid_:.4f} | {acc:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
