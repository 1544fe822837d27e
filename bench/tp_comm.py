"""When does tensor parallelism pay off? Split GEMMs vs all-reduce bytes, per preset.

Computed, not timed: every model is built on the meta device and run once under
``FlopCounterMode`` (one sample, forward).  For each model it reports the layers TP would
split (attention q/k/v/out and the block MLP: ``AttentionBlock`` / ``CrossAttention`` /
``Mlp`` / ``FeedForward``), their share of the model's FLOPs (the rest, the U-Net's
convolutions and embeddings, is not split and runs whole on every TP rank), the largest
split GEMM, and the activation all-reduce bytes Megatron-style TP adds: one ``[N, D]``
all-reduce after each split attention and MLP in the forward pass and one in the backward
(bf16, per sample; a ring all-reduce over t ranks moves 2(t-1)/t of it per rank).  The last
columns compare that traffic with the split compute at t=2 on one H100 node (NVLink 4:
~450 GB/s per direction, ~60% reached by an all-reduce; ~400 TFLOP/s bf16 reached of the
989 peak), and give the step's speed-up on 2 GPUs over 1 when the all-reduces are not
overlapped (Amdahl: the unsplit FLOPs run whole on both ranks).
``python bench/tp_comm.py --write`` appends the table to bench/results/memory_scale.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
LINK = 450e9 * 0.6  # bytes/s an NVLink-4 all-reduce reaches per direction
GEMM = 400e12  # bf16 FLOP/s a large GEMM reaches on an H100
TP = 2


def _models() -> list[tuple[str, torch.nn.Module, tuple[int, ...]]]:
    """(name, meta-device model, input shape of one sample)."""
    from difflab.models.dit import DiT, DiTConfig
    from difflab.models.unet import UNet, UNetConfig

    out = []
    with torch.device("meta"):
        for name, kw in (("base", {}), ("xl", {"model_channels": 256})):
            out.append((f"U-Net {name} (64 px)", UNet(UNetConfig.preset("base", dropout=0.0, **kw)),
                        (3, 64, 64)))  # fmt: skip
        for name, side in (("XL/2", 32), ("XL/2", 64), ("XL/2", 128)):
            cfg = DiTConfig.preset(name, image_size=side)
            out.append((f"DiT {name} ({side * 8} px, f8)", DiT(cfg), (4, side, side)))
        big = DiTConfig(image_size=128, in_channels=16, patch_size=2, hidden_size=3072,
                        depth=38, num_heads=24)  # fmt: skip  # an SD3-8B / Flux-sized DiT
        out.append(("DiT D=3072 x 38 (1024 px, f8)", DiT(big), (16, 128, 128)))
    return out


def _split_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from difflab.models.dit import Mlp
    from difflab.models.layers import AttentionBlock, CrossAttention, FeedForward

    kinds = (AttentionBlock, CrossAttention, Mlp, FeedForward)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def row(name: str, model: torch.nn.Module, shape: tuple[int, ...]) -> str:
    x = torch.zeros(1, *shape, device="meta")
    t = torch.zeros(1, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x, t)
    counts = counter.get_flop_counts()
    total = sum(counts["Global"].values())
    split = _split_layers(model)
    sizes = {}  # module -> (tokens, width) seen by its forward

    def hook(mod, args, out):
        b, c = out.shape[:2]  # [B, C, H, W] (ADM attention) or [B, N, D] (tokens)
        sizes[mod] = (out[0, 0].numel(), c) if out.ndim == 4 else (c, out.shape[2])

    handles = [m.register_forward_hook(hook) for _, m in split]
    model(x, t)
    for h in handles:
        h.remove()
    root = type(model).__name__
    split_flops = sum(sum(counts.get(f"{root}.{n}", {}).values()) for n, _ in split)
    # one [N, D] all-reduce forward + one backward per split layer, bf16
    ar_bytes = sum(2 * 2 * n * d for n, d in sizes.values())
    per_rank_bytes = ar_bytes * 2 * (TP - 1) / TP
    n_max, d_max = max(sizes.values(), key=lambda nd: nd[0] * nd[1] * nd[1])
    work = 3 * split_flops / TP  # forward + backward of the split part, per rank
    ratio = (per_rank_bytes / LINK) / (work / GEMM)
    share = split_flops / total
    speedup = 1 / ((1 - share) + share / TP * (1 + ratio))  # unsplit part runs on every rank
    return (f"| {name} | {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M | "
            f"{total / 1e9:.1f} | {split_flops / total:.0%} | {len(split)} | "
            f"{n_max} x {d_max} x {d_max} | {ar_bytes / 2**20:.1f} | "
            f"{3 * split_flops / ar_bytes:.0f} | {ratio:.2f} | {speedup:.2f}x |")  # fmt: skip


HEADER = [
    "| model | params | GFLOP fwd / sample | FLOPs in split layers | split layers | "
    "largest split GEMM (N x D x D) | all-reduce MiB / sample / step | split FLOP per "
    "all-reduce byte | comm / split compute, TP=2 | step speed-up, TP=2 |",
    "|---|---|---|---|---|---|---|---|---|---|",
]


def main() -> None:
    lines = ["", "## Tensor parallelism: split GEMMs vs all-reduce bytes (`bench/tp_comm.py`)", "",
             f"torch {torch.__version__}; computed on meta-device models (one sample, bf16 "
             "activations; the U-Nets at the 64 px they are sized for).", "",
             *HEADER]  # fmt: skip
    lines += [row(name, model, shape) for name, model, shape in _models()]
    text = "\n".join(lines) + "\n"
    print(text)
    if "--write" in sys.argv:
        with open(HERE / "results" / "memory_scale.md", "a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
