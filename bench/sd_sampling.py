"""Stable-Diffusion-shaped sampling: difflab's U-Net against diffusers' ``UNet2DConditionModel``
with the same weights, seconds per image and peak memory, fp32 and bf16.

The network is Stable Diffusion 1.5's U-Net architecture (Rombach et al. 2022; diffusers'
``UNet2DConditionModel`` defaults: four levels, two residual blocks per level, cross-attention
transformers at the first three levels and in the middle, ``attention_head_dim=8`` heads)
at a reduced width (``--width``: the first level's channels, 320 in SD 1.5) and latent size
(``--latent``, 64 in SD 1.5), attending to a random ``[2, 77, 768]`` context (CLIP ViT-L's
width; no text encoder). diffusers' random initialisation is drawn once and converted into
difflab's :class:`~difflab.models.UNet` with ``difflab.interop.unet`` (the conversion the
SD pipelines use), so both compute the same function; the table reports how far apart their
final latents end.

Two measurements per (model, precision):

* **forward**: one U-Net call on the classifier-free-guidance pair (batch 2), as a sampler
  makes it at every step;
* **loop**: a whole guided denoising loop of ``--steps`` steps of diffusers' ``DDIMScheduler``
  (or ``EulerDiscreteScheduler``) with SD 1.5's scheduler config and guidance 7.5, per image
  (``--images`` latents, each run as a CFG pair). diffusers runs its pipeline's loop
  (concatenate, ``scale_model_input``, U-Net, split, guide, ``scheduler.step``), difflab runs
  ``dl.sample`` over ``interop.scheduler.sampling_plan`` of the same config, as
  ``dl.Pipeline`` does.

In bf16 the weights are cast: difflab keeps the sampler state in float32 and runs the network
in bf16 (``model_dtype``); diffusers runs everything in bf16, as its pipelines do. The two
models are timed in alternation in one process (so load from other processes hits both
alike), after one untimed forward each; the median of the repeats counts.

Peak memory, on CPU: in a fresh process per (model, precision), after the model is built and
one warm-up step has run, the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``
``5``), a ``--memory-steps`` loop runs, and the growth of ``getrusage`` ``ru_maxrss`` over the
RSS before the loop is the working memory (weights excluded; ``tracemalloc`` does not see
torch's allocations). Without ``clear_refs`` (not Linux) the peak since the process started
is reported instead, which includes building the models. On CUDA: the growth of
``torch.cuda.max_memory_allocated`` over the loop, in the timing process.

Usage::

    python bench/sd_sampling.py                        # CPU, the defaults below
    python bench/sd_sampling.py --device cuda --width 320 --latent 64 --steps 50
    python bench/sd_sampling.py --profile --precisions bf16 --no-memory --loop-repeats 0
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from train_throughput import device_name, in_subprocess

import difflab as dl
from difflab.interop.scheduler import initial_noise_scale, sampling_plan
from difflab.interop.unet import unet_config_from_diffusers, unet_state_from_diffusers
from difflab.models import UNet

RESULTS = Path(__file__).parent / "results" / "sd_sampling.md"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}
GUIDANCE = 7.5


def unet_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``UNet2DConditionModel`` arguments: SD 1.5's U-Net at ``--width``, ``--latent``."""
    w = args.width
    return dict(
        sample_size=args.latent,
        block_out_channels=(w, 2 * w, 4 * w, 4 * w),  # SD 1.5: (320, 640, 1280, 1280)
        cross_attention_dim=args.context_dim,
        attention_head_dim=args.heads,  # diffusers' name for the number of heads
    )


def scheduler_config(sampler: str) -> dict[str, Any]:
    """SD 1.5's scheduler config (scaled-linear betas, ``steps_offset=1``) for ``sampler``."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[sampler]
    kwargs = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  steps_offset=1, timestep_spacing="leading")  # fmt: skip
    if sampler == "ddim":
        kwargs |= dict(clip_sample=False, set_alpha_to_one=False)
    return dict(cls(**kwargs).config)


def build(name: str, precision: str, args: argparse.Namespace) -> torch.nn.Module:
    """Model ``name`` in eval mode on ``args.device`` in ``precision``; the same weights
    for both (diffusers' initialisation from seed 0, converted for difflab)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = UNet2DConditionModel(**unet_kwargs(args))
    model: torch.nn.Module = ref
    if name == "difflab":
        cfg = unet_config_from_diffusers(ref.config)
        model = UNet(cfg)
        model.load_state_dict(unet_state_from_diffusers(ref.state_dict(), cfg), strict=True)
        del ref
        gc.collect()
    # ``to(dtype)``: the bf16 cast of both, the "casting directly" diffusers warns about is
    # what its pipelines do with ``.to(torch.bfloat16)`` too.
    return model.eval().requires_grad_(False).to(args.device, DTYPES[precision])


def inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Initial latents ``[images, 4, latent, latent]`` and the cond / uncond contexts."""
    g = torch.Generator().manual_seed(1)
    shape = (args.images, 4, args.latent, args.latent)
    ctx = (args.images, args.context_len, args.context_dim)
    return {
        "latents": torch.randn(shape, generator=g).to(args.device),
        "cond": torch.randn(ctx, generator=g).to(args.device),
        "uncond": torch.randn(ctx, generator=g).to(args.device),
    }


def make_forward(name: str, model: torch.nn.Module, data: dict, dtype: torch.dtype) -> Callable:
    """One U-Net call on the CFG pair (batch ``2 * images``) at t = 500."""
    x = torch.cat([data["latents"]] * 2).to(dtype)
    ctx = torch.cat([data["cond"], data["uncond"]]).to(dtype)
    t = torch.full((x.shape[0],), 500.0, device=x.device)
    if name == "difflab":
        return lambda: model(x, t, context=ctx)
    return lambda: model(x, t, encoder_hidden_states=ctx).sample


def make_loop(
    name: str, model: torch.nn.Module, data: dict, dtype: torch.dtype, steps: int, sampler: str
) -> Callable[[], torch.Tensor]:
    """A guided ``steps``-step loop from ``data["latents"]``; returns the final latents."""
    config = scheduler_config(sampler)
    if name == "difflab":
        plan = sampling_plan(config, sampler, steps)
        scale = initial_noise_scale(config, sampler, steps)

        def run() -> torch.Tensor:
            return dl.sample(
                model, noise=data["latents"] * scale, cond={"context": data["cond"]},
                uncond={"context": data["uncond"]}, guidance_scale=GUIDANCE,
                model_dtype=dtype, progress=False, **plan,
            )  # fmt: skip

        return run
    import diffusers

    scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(config)
    ctx = torch.cat([data["uncond"], data["cond"]]).to(dtype)  # diffusers: uncond first

    def run() -> torch.Tensor:  # StableDiffusionPipeline.__call__'s denoising loop
        scheduler.set_timesteps(steps, device=data["latents"].device)
        latents = (data["latents"] * scheduler.init_noise_sigma).to(dtype)
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            uncond, cond = model(x, t, encoder_hidden_states=ctx).sample.chunk(2)
            eps = uncond + GUIDANCE * (cond - uncond)
            latents = scheduler.step(eps, t, latents).prev_sample
        return latents

    return run


def sync(device: str) -> None:
    """Wait for queued GPU work, so that a host clock times it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def speed_worker(precision: str, args: argparse.Namespace, queue: Any) -> None:
    """Median seconds of the forward and of the loop of every model, timed in alternation."""
    torch.set_num_threads(args.threads)
    names, dtype, data = args.models.split(","), DTYPES[precision], inputs(args)
    models = {name: build(name, precision, args) for name in names}
    rows = {name: dict(model=name, precision=precision, peak_mib=float("nan")) for name in names}
    cuda = args.device.startswith("cuda")
    with torch.inference_mode():
        forwards = {n: make_forward(n, m, data, dtype) for n, m in models.items()}
        for fn in forwards.values():  # warm-up: oneDNN primitives, allocator, cuDNN
            fn()
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.repeats):
            for name, fn in forwards.items():
                times[name].append(timed(fn, args.device)[0])
        for name in names:
            rows[name]["forward_s"] = statistics.median(times[name])
        loops = {
            n: make_loop(n, m, data, dtype, args.steps, args.sampler) for n, m in models.items()
        }
        times = {n: [] for n in names}
        finals = {}
        for _ in range(args.loop_repeats):
            for name, fn in loops.items():
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                seconds, finals[name] = timed(fn, args.device)
                times[name].append(seconds / args.images)
                if cuda:
                    peak = torch.cuda.max_memory_allocated() - before
                    rows[name]["peak_mib"] = peak / 2**20
        for name in names:
            rows[name]["loop_s"] = statistics.median(times[name]) if times[name] else float("nan")
        if finals and "diffusers" in finals:
            ref = finals["diffusers"].float()
            for name, x in finals.items():
                rows[name]["max_diff"] = (x.float() - ref).abs().max().item()
        if args.profile:
            for name, fn in forwards.items():
                print(f"\n== {name} {precision}: U-Net forward, batch 2", file=sys.stderr)
                print(profile_table(fn, args.profile_rows), file=sys.stderr)
    queue.put(list(rows.values()))


def profile_table(fn: Callable[[], Any], rows: int) -> str:
    """torch.profiler's op table of two calls of ``fn``, by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def rss_bytes() -> int:
    """Current resident set size (``VmRSS`` of /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def release_free_memory() -> None:
    """Hand the allocator's free pages back to the kernel (glibc ``malloc_trim``), so that
    memory the warm-up freed counts again when the measured loop reuses it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(name: str, precision: str, args: argparse.Namespace, queue: Any) -> None:
    """Peak working memory of a ``--memory-steps`` loop in a fresh process (MiB), and
    whether it excludes the building of the models."""
    torch.set_num_threads(args.threads)
    dtype, data = DTYPES[precision], inputs(args)
    model = build(name, precision, args)
    with torch.inference_mode():
        make_loop(name, model, data, dtype, 1, args.sampler)()  # warm-up: lazy imports, oneDNN
        run = make_loop(name, model, data, dtype, args.memory_steps, args.sampler)
        gc.collect()
        release_free_memory()
        before, reset = rss_bytes(), reset_peak_rss()
        run()
        peak = max_rss_bytes()
    queue.put(((peak - before) / 2**20 if reset else peak / 2**20, reset))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=64, help="first level's channels (SD 1.5: 320)")
    p.add_argument("--latent", type=int, default=16, help="latent side (SD 1.5: 64)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (SD 1.5: 8)")
    p.add_argument("--context-dim", type=int, default=768, help="SD 1.5: 768")
    p.add_argument("--context-len", type=int, default=77)
    p.add_argument("--images", type=int, default=1, help="latents per loop (CFG doubles it)")
    p.add_argument("--sampler", choices=tuple(SCHEDULERS), default="ddim")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    p.add_argument("--models", default="difflab,diffusers")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per model")
    p.add_argument("--loop-repeats", type=int, default=3, help="timed loops per model")
    p.add_argument("--memory-steps", type=int, default=3, help="steps of the memory loop")
    p.add_argument(
        "--memory", action=argparse.BooleanOptionalAction, default=True,
        help="measure peak memory (CPU: one fresh process per row)",
    )  # fmt: skip
    p.add_argument("--profile", action="store_true", help="print torch.profiler op tables")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")

    rows: list[dict[str, Any]] = []
    exact_peak = True
    for precision in args.precisions.split(","):
        for row in in_subprocess(speed_worker, precision, args):
            if not cuda:
                row["peak_mib"] = float("nan")
                if args.memory:
                    row["peak_mib"], reset = in_subprocess(
                        memory_worker, row["model"], precision, args
                    )
                    exact_peak &= reset
            rows.append(row)
        print(f"done: {precision}", file=sys.stderr)
    table = render(rows, args, exact_peak)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python bench/sd_sampling.py", *(sys.argv[1:] if argv is None else argv)])
    args.out.write_text(f"# Stable-Diffusion-shaped sampling\n\n`{command}`\n\n{table}\n")


def render(rows: list[dict[str, Any]], args: argparse.Namespace, exact_peak: bool) -> str:
    """The markdown table with its header lines."""
    cuda = args.device.startswith("cuda")
    w = args.width
    if cuda:
        memory = "growth of `torch.cuda.max_memory_allocated` over a loop"
    elif exact_peak:
        memory = (
            f"growth of the peak RSS over a {args.memory_steps}-step loop, in a fresh "
            "process with the peak reset after building and one warm-up step (weights "
            "excluded)"
        )
    else:
        memory = "peak RSS of a fresh process (models and their building included)"
    lines = [
        f"SD 1.5's U-Net at widths ({w}, {2 * w}, {4 * w}, {4 * w}), {args.heads} heads, "
        f"latents {args.images}x4x{args.latent}x{args.latent}, context {args.context_len}x"
        f"{args.context_dim}, guidance {GUIDANCE} (one batch-{2 * args.images} U-Net call per "
        f"step), {args.steps} {SCHEDULERS[args.sampler]} steps; torch {torch.__version__}, "
        f"{device_name(args.device)}" + ("" if cuda else f", {args.threads} threads") + ".",
        f"Times: medians of {args.repeats} forwards and {args.loop_repeats} loops per model, "
        "the models in alternation in one process after one warm-up forward each; "
        "speed-up = diffusers' time / difflab's. Peak memory: " + memory + ". "
        "max |Δ|: largest difference of the final latents from diffusers'.",
        "",
        "| model | precision | forward, batch 2 (s) | speed-up | loop (s/image) | speed-up "
        "| peak memory (MiB) | max abs Δ |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r["precision"]: r for r in rows if r["model"] == "diffusers"}
    for r in rows:
        ref = base.get(r["precision"], {})
        fwd = ref.get("forward_s", float("nan")) / r["forward_s"]
        loop = ref.get("loop_s", float("nan")) / r["loop_s"]
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['forward_s']:.3f} | {fwd:.2f}x | "
            f"{r['loop_s']:.2f} | {loop:.2f}x | {r['peak_mib']:.0f} | "
            f"{r.get('max_diff', float('nan')):.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
