"""Training throughput: difflab's U-Net against diffusers' ``UNet2DModel`` at equal architecture.

Both networks are built from one :class:`difflab.models.UNetConfig` (same widths, depths,
attention resolutions, heads, GroupNorm groups, scale-shift conditioning, dropout) and
trained with the DDPM objective (Ho et al. 2020): MSE between the predicted and the true
noise, one AdamW step per batch (``--optimizer same``: torch's default AdamW for both, so
only the networks differ; ``native``: each library's training step as its users run it,
difflab's trainer optimiser against the default AdamW of diffusers' examples). Throughput
is timed in one fresh process per precision, the models taking turns window by window so
that load from other processes on a shared machine hits them alike; the best window
counts. Peak memory is read in a fresh process per (model, precision) from
``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the growth of the peak resident set size
over the warm-up steps plus one (model, optimiser and data already built before).

Model FLOPs per image are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one
eager forward + backward at the run's precision (the compiled network does the same maths),
and each row's achieved FLOP/s is given as a share of the device's peak: dense bf16/fp16
tensor-core peaks from the vendors' data sheets (H100/H200 SXM 989 TFLOP/s, A100 312; fp32
rows against the TF32 peak, 495 and 156, which cuDNN's convolutions use by default), and on
CPU a peak measured in the timing process: the best of five 1024^3 GEMMs, run as 1x1
convolutions (oneDNN), at the run's thread count and dtype.

Usage::

    python bench/train_throughput.py --preset cifar10 --batch-size 8 --iters 10
    python bench/train_throughput.py --preset digits --channels-last
    python bench/train_throughput.py --preset digits --modes eager,compiled --no-memory
    python bench/train_throughput.py --device cuda --batch-size 128 --precisions fp32,bf16,fp16

On CUDA the windows are timed after ``torch.cuda.synchronize()``, peak memory is the growth
of ``torch.cuda.max_memory_allocated`` over the warm-up steps (read in the timing process)
and fp16 trains with a ``GradScaler``; torch's
default TF32 settings apply to both models alike.

With ``--modes ...,compiled`` the compiled rows' warm-up column holds the compilation time,
which the images/s exclude.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from difflab.models import UNet, UNetConfig

RESULTS = Path(__file__).parent / "results" / "train_throughput.md"

# Dense peak FLOP/s per data-sheet device name fragment: (bf16/fp16 tensor, TF32 tensor).
GPU_PEAKS = {"H100": (989e12, 495e12), "H200": (989e12, 495e12), "A100": (312e12, 156e12)}


def peak_flops(device: str, precision: str, threads: int) -> float:
    """The device's peak FLOP/s for ``precision``: the data-sheet table on GPUs (NaN when
    unknown), a measured GEMM peak on CPU."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        for key, (half, tf32) in GPU_PEAKS.items():
            if key in name:
                return tf32 if precision == "fp32" else half
        return float("nan")
    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    # A 1024^3 GEMM run as a 1x1 convolution: oneDNN, the kernels the networks' convolutions
    # use (torch's CPU bf16 `matmul` can take a reference kernel, 50x slower).
    n = 1024
    x, w = torch.randn(1, n, 32, 32).to(dtype), torch.randn(n, n, 1, 1).to(dtype)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        F.conv2d(x, w)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def diffusers_kwargs(cfg: UNetConfig) -> dict[str, Any]:
    """``UNet2DModel`` arguments with the same architecture as ``UNet(cfg)``."""
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [r in cfg.attention_resolutions for r in cfg.level_resolutions]
    attn_widths = {w for w, a in zip(widths, attn) if a} | {widths[-1]}  # + middle block
    if cfg.num_head_channels is not None:
        head_dim = cfg.num_head_channels
    elif cfg.num_heads == 1:
        head_dim = None  # diffusers: one head spanning all channels
    elif len({w // cfg.num_heads for w in attn_widths}) == 1:
        head_dim = attn_widths.pop() // cfg.num_heads
    else:
        raise ValueError("diffusers fixes the head width; use num_head_channels or num_heads=1")
    if cfg.num_classes is not None or cfg.context_dim is not None:
        raise ValueError("the benchmark compares unconditional models")
    resample = "resnet" if cfg.resblock_updown else "conv"
    return dict(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.resolved_out_channels,
        block_out_channels=tuple(widths),
        layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=head_dim,
        norm_num_groups=cfg.norm_groups,
        attn_norm_num_groups=cfg.norm_groups,  # else diffusers drops the middle GroupNorm
        resnet_time_scale_shift="scale_shift" if cfg.use_scale_shift_norm else "default",
        downsample_type=resample,
        upsample_type=resample,
        dropout=cfg.dropout,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def build(name: str, cfg: UNetConfig) -> tuple[torch.nn.Module, Any]:
    """The model and a callable ``forward(x_t, t) -> prediction``."""
    if name == "difflab":
        model = UNet(cfg, generator=torch.Generator().manual_seed(0))
        return model, model
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(**diffusers_kwargs(cfg))
    return model, lambda x, t: model(x, t).sample


def max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def make_step(
    name: str, precision: str, args: argparse.Namespace, compiled: bool = False
) -> tuple[Any, int, Any]:
    """One DDPM training step of model ``name`` (``step()``), its parameter count and
    ``flops()``: model FLOPs per image of one eager forward + backward."""
    cfg = UNetConfig.preset(
        args.preset, **({"image_size": args.image_size} if args.image_size else {})
    )
    model, forward = build(name, cfg)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    device = torch.device(args.device)
    model.train().to(device, memory_format=fmt)  # in place: ``forward`` still calls this model
    eager_forward = forward
    if compiled:
        forward = torch.compile(forward)
    if args.optimizer == "native" and name == "difflab":
        from difflab.train.config import LoopConfig
        from difflab.train.optim import build_optimizer

        opt, _ = build_optimizer(model, LoopConfig(lr=1e-4))  # what `difflab train` steps with
    else:  # diffusers' training examples: torch.optim.AdamW's default implementation
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size)
    x0 = torch.randn(shape, generator=g).contiguous(memory_format=fmt).to(device)
    noise = torch.randn(shape, generator=g).contiguous(memory_format=fmt).to(device)
    t = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)
    alpha = torch.rand(args.batch_size, 1, 1, 1, generator=g).to(device)
    x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise  # eq. 4 of Ho et al. with a random ᾱ
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step() -> None:
        with autocast:
            pred = forward(x_t, t.float() if name == "difflab" else t)
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def flops() -> float:
        with FlopCounterMode(display=False) as counter:
            with autocast:
                pred = eager_forward(x_t, t.float() if name == "difflab" else t)
            F.mse_loss(pred.float(), noise).backward()
        opt.zero_grad(set_to_none=True)
        return counter.get_total_flops() / args.batch_size

    return step, sum(p.numel() for p in model.parameters()), flops


def sync(args: argparse.Namespace) -> None:
    """Wait for queued GPU work, so that a host clock times it."""
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def speed_worker(precision: str, args: argparse.Namespace, queue: Any) -> None:
    """Images/s of every model, timed in alternating windows so that load from other
    processes on a shared machine hits all models alike; the best window counts."""
    torch.set_num_threads(args.threads)
    names = [(model, mode) for mode in args.modes.split(",") for model in args.models.split(",")]
    steps = {
        (model, mode): make_step(model, precision, args, mode == "compiled")
        for model, mode in names
    }
    flops = {key: steps[key][2]() for key in names}  # before any step: eager, equal weights
    peak = peak_flops(args.device, precision, args.threads)
    warmup_s, peak_mib = {}, {}
    cuda = args.device.startswith("cuda")
    for name, (step, _, _) in steps.items():
        if cuda:  # the allocator's peak is exact per model: no fresh process needed
            sync(args)
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync(args)
        warmup_s[name] = time.perf_counter() - start  # includes compilation with --compile
        if cuda:
            peak_mib[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
    best = dict.fromkeys(names, float("inf"))
    for _ in range(args.repeats):
        for name, (step, _, _) in steps.items():
            sync(args)
            start = time.perf_counter()
            for _ in range(args.iters):
                step()
            sync(args)
            best[name] = min(best[name], time.perf_counter() - start)
    queue.put([
        dict(model=name[0], mode=name[1], precision=precision, params=steps[name][1],
             images_per_s=args.iters * args.batch_size / best[name], warmup_s=warmup_s[name],
             flops_per_image=flops[name], peak_flops=peak,
             **({"peak_mib": peak_mib[name]} if name in peak_mib else {}))
        for name in names
    ])  # fmt: skip


def memory_worker(
    name: str, mode: str, precision: str, args: argparse.Namespace, queue: Any
) -> None:
    """Growth of the peak RSS over warm-up plus one step, in a fresh process."""
    torch.set_num_threads(args.threads)
    step, _, _ = make_step(name, precision, args, mode == "compiled")
    rss0 = max_rss_bytes()
    for _ in range(args.warmup + 1):
        step()
    queue.put((max_rss_bytes() - rss0) / 2**20)


def in_subprocess(target: Any, *args: Any) -> Any:
    """Run ``target(*args, queue)`` in a fresh spawned process; return what it queued."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except Exception:  # queue.Empty: keep waiting while the worker lives
            if not proc.is_alive():
                raise RuntimeError(
                    f"{target.__name__} failed (exit code {proc.exitcode})"
                ) from None
    proc.join()
    return result


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or "cpu"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cifar10", help="UNetConfig preset (tiny, digits, ...)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--iters", type=int, default=5, help="training steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows; the best is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument(
        "--precisions", default="fp32,bf16", help="comma list of fp32, bf16, fp16 (CUDA only)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--models", default="difflab,diffusers")
    p.add_argument(
        "--modes",
        default="eager",
        help="comma list of eager, compiled (torch.compile); every model runs in each mode",
    )
    p.add_argument("--channels-last", action="store_true", help="channels_last for both models")
    p.add_argument(
        "--optimizer",
        choices=("same", "native"),
        default="same",
        help="same: torch.optim.AdamW's default for both (compares the networks alone); "
        "native: each library's own training step, difflab's trainer optimiser (fused AdamW) "
        "against the default AdamW of diffusers' training examples",
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure peak memory (one more fresh process, and compile, per row)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    rows = []
    for precision in args.precisions.split(","):
        for row in in_subprocess(speed_worker, precision, args):
            if "peak_mib" not in row:  # CPU: RSS, read in a fresh process per row
                row["peak_mib"] = (
                    in_subprocess(memory_worker, row["model"], row["mode"], precision, args)
                    if args.memory
                    else float("nan")
                )
            rows.append(row)
        print(f"done: {precision}", file=sys.stderr)

    base = {
        (r["mode"], r["precision"]): r["images_per_s"] for r in rows if r["model"] == "diffusers"
    }
    lines = [
        f"Preset `{args.preset}`, batch {args.batch_size}, best of {args.repeats} windows of "
        f"{args.iters} steps after {args.warmup} warm-up, modes={args.modes}, "
        f"channels_last={args.channels_last}, optimizer={args.optimizer}, "
        f"{args.threads} CPU threads, "
        f"torch {torch.__version__}, {device_name(args.device)}.",
        "Images/s: best window, models timed in alternation in one process (after the "
        "warm-up steps, so compilation is excluded; the warm-up column shows its cost). "
        + (
            "Peak memory: growth of torch.cuda.max_memory_allocated over the warm-up steps."
            if args.device.startswith("cuda")
            else "Peak memory: growth of max RSS (getrusage) over the warm-up steps plus one, "
            "in a fresh process."
        ),
        "Model FLOPs: FlopCounterMode over one eager forward + backward, per image; share of "
        "peak: achieved FLOP/s over "
        + (
            "the data-sheet dense peak (bf16/fp16 tensor cores; TF32 for fp32)."
            if args.device.startswith("cuda")
            else "a measured GEMM peak (1024^3 as a 1x1 conv, same threads and dtype)."
        ),
        "",
        "| model | mode | precision | params (M) | GFLOP/image | images/s | vs diffusers "
        "| TFLOP/s | peak TFLOP/s | share of peak | peak memory (MiB) | warm-up (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        key = (r["mode"], r["precision"])
        ratio = r["images_per_s"] / base[key] if key in base else float("nan")
        achieved = r["flops_per_image"] * r["images_per_s"]
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['precision']} | {r['params'] / 1e6:.2f} | "
            f"{r['flops_per_image'] / 1e9:.2f} | {r['images_per_s']:.1f} | {ratio:.2f}x | "
            f"{achieved / 1e12:.3g} | {r['peak_flops'] / 1e12:.3g} | "
            f"{100 * achieved / r['peak_flops']:.1f}% | {r['peak_mib']:.0f} | "
            f"{r['warmup_s']:.1f} |"
        )
    if len({r["params"] for r in rows}) > 1:
        note = "Parameter counts differ: diffusers' `DownBlock2D` ignores `downsample_type`,"
        lines += ["", f"{note} so `resblock_updown` is only matched at attention levels."]
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(
        ["python bench/train_throughput.py", *(sys.argv[1:] if argv is None else argv)]
    )
    args.out.write_text(f"# Training throughput\n\n`{command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
