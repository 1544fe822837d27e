"""Memory per rank and step time under DDP and FSDP (difflab.train.fsdp) with 1, 2, 4 ranks.

Two parts, written to ``bench/results/memory_scale.md``:

1. Computed (``difflab.train.memory``) for the ``base`` U-Net preset (131 M parameters) and
   ``xl`` (``base`` at width 256: 525 M), built on the meta device: parameters, gradients,
   AdamW state and EMA per rank, FSDP's gathered unit, and activations of a per-rank
   micro-batch measured on fake tensors (global batch 16 at 64 px, fp32, dropout off).
2. Measured on this CPU (gloo, torchrun): ``base`` at 32 px, 2 images per rank, 3 AdamW
   steps (+EMA) after one warm-up: peak RSS per rank (``ru_maxrss``, the whole process:
   torch itself is ~0.3 GB), the model state each rank really holds (local shards of
   parameters, gradients, AdamW moments and EMA, summed from the tensors) and the mean step
   time.  4 ranks are not measured on this 2-core machine (computed only).

Usage: ``PYTHONPATH=src python bench/memory_scale.py [--skip-measured]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PRESETS = {"base": {}, "xl": {"model_channels": 256}}  # xl: made for this benchmark
GLOBAL_BATCH = 16


def _unet(preset: str, **overrides):
    from difflab.models.unet import UNet, UNetConfig

    return UNet(UNetConfig.preset("base", **{**PRESETS[preset], **overrides}))


def computed_rows() -> list[str]:
    from difflab.train.memory import memory_report, model_activation_bytes

    rows = []
    for preset in PRESETS:
        with torch.device("meta"):
            net = _unet(preset, dropout=0.0)
        per_image = model_activation_bytes(net, 1)  # activations are linear in the batch
        for parallel in ("ddp", "fsdp"):
            for n in (1, 2, 4):
                acts = None if per_image is None else per_image * GLOBAL_BATCH // n
                r = memory_report(net, parallel=parallel, world_size=n, activations=acts)
                gib = lambda b: f"{(b or 0) / 2**30:.2f}"  # noqa: E731
                rows.append(
                    f"| {preset} | {r.num_params / 1e6:.0f} M | {parallel} | {n} | "
                    f"{gib(r.model_state)} | {gib(r.gathered)} | {gib(r.activations)} | "
                    f"{gib(r.total)} |"
                )
    return rows


WORKER = "--worker"


def worker(parallel: str) -> None:
    """One rank of the measured part (run by torchrun)."""
    import torch.distributed as dist

    from difflab.train.amp import resolve_precision
    from difflab.train.config import load_config
    from difflab.train.distributed import setup_distributed
    from difflab.train.ema import EMA
    from difflab.train.fsdp import clip_grad_norm, parallelize

    torch.set_num_threads(1)
    info = setup_distributed("cpu")
    cfg = load_config(None, [f"train.parallel={parallel}", "train.sample_every=0",
                             f"train.batch_size={2 * info.world_size}"])  # fmt: skip
    model = _unet("base", image_size=32, dropout=0.0).train()
    ema = EMA(model)
    net = parallelize(cfg, model, ema, info, resolve_precision("no", info.device))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(info.rank)
    times = []
    for step in range(4):
        x = torch.randn(2, 3, 32, 32, generator=gen)
        t = torch.rand(2, generator=gen) * 1000
        began = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        net(x, t).square().mean().backward()
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        if info.distributed:
            dist.barrier()
        if step:
            times.append(time.perf_counter() - began)

    def local(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    state = sum(local(p) for p in model.parameters())
    state += sum(local(p.grad) for p in model.parameters() if p.grad is not None)
    state += sum(local(v) for st in opt.state.values() for v in st.values() if v.dim())
    state += sum(local(p) for p in ema.model.parameters())
    mine = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "state": state,
            "step": sum(times) / len(times)}  # fmt: skip
    every = [mine]
    if info.distributed:
        every = [None] * info.world_size
        dist.all_gather_object(every, mine)
    if info.rank == 0:
        print("RESULT", json.dumps(every), flush=True)
    if info.distributed:
        dist.destroy_process_group()


def measured_rows() -> list[str]:
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for parallel in ("ddp", "fsdp"):
        for n in (1, 2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), __file__,
                   WORKER, parallel]  # fmt: skip
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            ranks = json.loads(out.stdout.split("RESULT", 1)[1].splitlines()[0])
            rss = max(r["rss"] for r in ranks) / 2**30
            state = max(r["state"] for r in ranks) / 2**30
            step = max(r["step"] for r in ranks)
            rows.append(f"| base (32 px) | {parallel} | {n} | {state:.2f} | {rss:.2f} | "
                        f"{step:.2f} |")  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-measured", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "memory_scale.md"))
    args = parser.parse_args()
    lines = [
        "# Memory per rank: DDP vs FSDP (`bench/memory_scale.py`)",
        "",
        f"torch {torch.__version__}, CPU. Computed with `difflab.train.memory` on meta-device "
        f"models (fp32, AdamW, EMA; global batch {GLOBAL_BATCH} at 64 px split over the "
        "ranks; activations measured on fake tensors for one image and scaled).",
        "",
        "| preset | params | parallel | ranks | model state GiB | FSDP gathered unit GiB "
        "| activations GiB | total GiB |",
        "|---|---|---|---|---|---|---|---|",
        *computed_rows(),
    ]
    print("\n".join(lines), flush=True)
    if not args.skip_measured:
        lines += [
            "",
            "Measured on this CPU (gloo, 1 thread per rank, 2 cores shared with other jobs): "
            "`base` at 32 px, 2 images per rank, mean of 3 AdamW+EMA steps; model state = "
            "the local shards each rank holds (max over ranks); peak RSS = the whole process.",
            "",
            "| model | parallel | ranks | model state GiB | peak RSS GiB | step s |",
            "|---|---|---|---|---|---|",
            *measured_rows(),
        ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == WORKER:
        worker(sys.argv[2])
    else:
        main()
