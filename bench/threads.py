"""Training throughput of ``configs/small_images.yaml`` at 1 and 2 torch threads, on an idle
machine and beside ``--busy`` busy-loop processes: the measurement behind ``--threads``'s
default (``difflab.cli.common.free_cores``).

Usage::

    python bench/threads.py                  # idle and with one busy process, ~8 minutes
    python bench/threads.py --busy 0 --steps 30
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import small_data  # noqa: E402  (the digits28 maker and the folder writer)

from difflab.train import Trainer, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "threads.md"


def _spin() -> None:
    while True:
        pass


def img_per_s(threads: int, data: Path, run_dir: Path, steps: int) -> float:
    """Wall images/s of ``steps`` recipe steps at ``threads`` torch threads."""
    torch.set_num_threads(threads)
    cfg = load_config(ROOT / "configs" / "small_images.yaml", [
        f"data.path={data}", f"run_dir={run_dir}", "train.max_time=100h",
        f"train.max_steps={steps}", "train.log_every=1000000", "train.tensorboard=false",
        "train.plot_metrics=false"])  # fmt: skip
    trainer = Trainer.from_config(cfg, progress=False)
    start = time.perf_counter()
    try:
        trainer.run()
    finally:
        trainer.close()
    return steps * cfg.train.batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--busy", type=int, default=1, help="also measure beside N busy processes")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="threads_"))
    rows = []
    try:
        small_data.write_class_folders(*small_data.MAKERS["digits28"](2000, 0), work / "d")
        for busy in sorted({0, args.busy}):
            spinners = [mp.Process(target=_spin, daemon=True) for _ in range(busy)]
            for s in spinners:
                s.start()
            load = os.getloadavg()[0]
            try:
                speeds = {t: [] for t in (1, 2)}
                for r in range(args.repeats):
                    for t in (1, 2):
                        run = work / f"run_{busy}_{t}_{r}"
                        speeds[t].append(img_per_s(t, work / "d", run, args.steps))
                        print(f"busy {busy}, {t} threads: {speeds[t][-1]:.1f} img/s",
                              file=sys.stderr, flush=True)  # fmt: skip
            finally:
                for s in spinners:
                    s.terminate()
            rows.append((busy, load, speeds))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        "# Torch threads on this machine: training img/s (wall)", "",
        f"`python bench/threads.py {' '.join(sys.argv[1:] if argv is None else argv)}`: "
        f"`configs/small_images.yaml` at 28 px, batch 64, {args.steps} steps per run, "
        f"{args.repeats} runs each; {os.cpu_count()} cores.", "",
        "| other busy processes | load average at start | 1 thread | 2 threads | 2 vs 1 |",
        "|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for busy, load, s in rows:
        one, two = max(s[1]), max(s[2])
        lines.append(f"| {busy} | {load:.1f} | {min(s[1]):.1f}-{one:.1f} | "
                     f"{min(s[2]):.1f}-{two:.1f} | {two / one:.2f}x |")  # fmt: skip
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
