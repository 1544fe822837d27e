"""The small-images recipe vs the digits config vs a diffusers UNet2DModel loop, at equal CPU time.

Data sets made here (the judge's real 28x28 digit set is not available):

* ``digits28``: an MNIST-like stand-in. scikit-learn's 1,797 bundled 8x8 digits, each upsampled
  (bicubic) to 20x20 on a 28x28 black canvas as MNIST centres its digits, then randomly
  rotated (±12°), scaled (±10%) and shifted (±2 px), and given stroke-like contrast (a linear
  ramp that saturates: black background, white strokes). 10,000 training images;
* ``shapes28``: 10 classes of anti-aliased shapes (circle, ring, square, diamond, plus,
  cross, triangle, line, two dots, hollow square) at random position, size, rotation and
  brightness, 10,000 images.

Each set is written as PNG class folders, so every difflab cell trains through the user's
path (``data.source: folder``). The judge of a cell is a CNN trained on that set at 28x28
(not the 8x8 digits CNN of ``difflab.eval``, which averages stroke noise away): its
penultimate 128-d features give FID[cnn28] against the 10,000 training images, and its
predictions the class accuracy of ``--n`` class-conditional samples (labels ``i mod 10``).
The floor is ``--n`` fresh real images (a new draw of the augmentation) against the same
reference.

Cells, each trained for ``--budget`` of **process CPU time** (``time.process_time``, the
trainer's injected clock) on ``--threads`` torch threads, one after another:

* ``recipe``: ``configs/small_images.yaml`` (``--recipe-set key=value`` overrides it);
* ``digits``: ``configs/digits.yaml`` (the 8x8 demo recipe: ddpm eps, cosine, batch 128,
  lr 1e-3, EMA 0.995) with the folder data at 28 px;
* ``diffusers``: a standard diffusers loop: ``UNet2DModel`` (block widths 32/64/64, attention
  at 14 and 7 px, 2 layers per block, ``num_class_embeds`` 11 with the null label 10 dropped
  in 10% of the time), ``DDPMScheduler`` (1000 steps, ``squaredcos_cap_v2``), eps MSE, AdamW
  lr 1e-3, batch 128, constant LR after 50 warm-up steps, no EMA; sampled with
  ``DPMSolverMultistepScheduler`` at the digits config's 20 steps and CFG 2.

difflab cells are sampled at their config's ``sample:`` defaults (``Pipeline.from_run``).

Usage::

    python bench/small_data.py --budget 60s --n 200          # a quick look (~10 min)
    python bench/small_data.py --budget 4m --n 500           # the results file
    python bench/small_data.py --cells recipe --recipe-set train.lr=1e-3 --out /tmp/x.md
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from difflab import Pipeline
from difflab.data.digits import digits_tensor
from difflab.eval import evaluate, to_uint8
from difflab.eval.features import FeatureExtractor
from difflab.images import make_grid
from difflab.train import Trainer, load_config
from difflab.train.budget import parse_duration

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "small_data.md"
DATASETS = ("digits28", "shapes28")
CELLS = ("recipe", "digits", "diffusers")
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


# --------------------------------------------------------------------------- data sets
def _affine(
    x: Tensor, gen: torch.Generator, rot_deg: float, scale: float, shift_px: float
) -> Tensor:
    """Random rotation / isotropic scale / shift of ``x [N, 1, H, W]`` (zeros outside)."""
    n, size = len(x), x.shape[-1]
    u = torch.rand(n, 4, generator=gen) * 2 - 1  # (N, 4) in [-1, 1]
    ang = u[:, 0] * math.radians(rot_deg)
    s = 1 + u[:, 1] * scale
    tx, ty = (u[:, 2:] * shift_px * 2 / size).unbind(1)  # pixels -> normalised coordinates
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def make_digits28(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` MNIST-like 28x28 digits ``uint8 [n, 1, 28, 28]`` and labels, from the 8x8 set."""
    gen = torch.Generator().manual_seed(seed)
    x8, labels = digits_tensor(8)
    idx = torch.randint(len(x8), (n,), generator=gen)
    x = F.interpolate((x8[idx] + 1) / 2, size=20, mode="bicubic", align_corners=False)
    x = F.pad(x.clamp(0, 1), (4, 4, 4, 4))  # (n, 1, 28, 28): digit in the centre 20x20
    x = _affine(x, gen, rot_deg=12, scale=0.1, shift_px=2)
    x = ((x - 0.25) / 0.45).clamp(0, 1)  # stroke contrast: background 0, strokes saturate
    return (x * 255).round().to(torch.uint8), labels[idx]


def _shape_sdf(k: int, px: Tensor, py: Tensor, r: Tensor) -> Tensor:
    """Signed distance (pixels) to shape class ``k`` of radius ``r`` in local coordinates."""
    ax, ay, rad = px.abs(), py.abs(), torch.sqrt(px**2 + py**2)
    w = 1.5  # half stroke width
    if k == 0:  # circle
        return rad - r
    if k == 1:  # ring
        return (rad - r).abs() - w
    if k == 2:  # square
        return torch.maximum(ax, ay) - 0.8 * r
    if k == 3:  # diamond
        return (ax + ay) / math.sqrt(2) - 0.7 * r
    if k in (4, 5):  # plus; cross = plus turned 45°
        if k == 5:
            ax, ay = ((px + py) / math.sqrt(2)).abs(), ((px - py) / math.sqrt(2)).abs()
        return torch.minimum(torch.maximum(ax - r, ay - w), torch.maximum(ay - r, ax - w))
    if k == 6:  # triangle
        return torch.maximum(ax * math.sqrt(3) / 2 + py / 2, -py) - r / 2
    if k == 7:  # line
        return torch.maximum(ax - r, ay - w)
    if k == 8:  # two dots
        d1 = torch.sqrt((px - r / 2) ** 2 + py**2)
        d2 = torch.sqrt((px + r / 2) ** 2 + py**2)
        return torch.minimum(d1, d2) - 2.5
    return (torch.maximum(ax, ay) - 0.8 * r).abs() - w  # 9: hollow square


def make_shapes28(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` anti-aliased shapes ``uint8 [n, 1, 28, 28]`` of 10 classes, and labels."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(10, (n,), generator=gen)
    u = torch.rand(n, 5, generator=gen)
    cx, cy = 13.5 + (u[:, 0] * 2 - 1) * 3, 13.5 + (u[:, 1] * 2 - 1) * 3
    r, ang, bright = 6 + u[:, 2] * 4, u[:, 3] * 2 * math.pi, 0.6 + 0.4 * u[:, 4]
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    out = torch.zeros(n, 28, 28)
    for k in range(10):
        m = labels == k
        dx, dy = xx - cx[m, None, None], yy - cy[m, None, None]  # (m, 28, 28)
        c, s = torch.cos(ang[m])[:, None, None], torch.sin(ang[m])[:, None, None]
        px, py = c * dx + s * dy, -s * dx + c * dy
        d = _shape_sdf(k, px, py, r[m, None, None])
        out[m] = (0.5 - d).clamp(0, 1) * bright[m, None, None]
    return (out[:, None] * 255).round().to(torch.uint8), labels


MAKERS = {"digits28": make_digits28, "shapes28": make_shapes28}


def write_class_folders(images: Tensor, labels: Tensor, root: Path) -> None:
    """``root/<label>/<i>.png`` grayscale PNGs (the layout of ``data.source: folder``)."""
    for k in range(10):
        (root / str(k)).mkdir(parents=True, exist_ok=True)
    for i, (img, k) in enumerate(zip(images, labels.tolist())):
        Image.fromarray(img[0].numpy(), mode="L").save(root / str(k) / f"{i:05d}.png")


# --------------------------------------------------------------------------- the judge
class CNN28(nn.Module):
    """MNIST-style CNN on ``[N, 1, 28, 28]`` in [0, 1]: 128-d penultimate features, 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 3 * 3, 128)
        self.fc2 = nn.Linear(128, 10)

    def features(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, 32, 14, 14)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (N, 64, 7, 7)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)  # (N, 64, 3, 3)
        return F.relu(self.fc1(h.flatten(1)))  # (N, 128)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.features(x))


class CNN28Judge(FeatureExtractor):
    """A `CNN28` trained on one data set (90%; 10% held out), as the judge's classifier."""

    feature_dim = 128
    num_classes = 10

    def __init__(self, name: str, images: Tensor, labels: Tensor, seed: int = 0) -> None:
        self.id = f"cnn28-{name}"
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(images), generator=gen)
        held, train = perm[: len(perm) // 10], perm[len(perm) // 10 :]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = CNN28()
        opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        x = images.float() / 255
        for _ in range(4):  # epochs
            for idx in train[torch.randperm(len(train), generator=gen)].split(128):
                loss = F.cross_entropy(self.net(x[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.net.eval().requires_grad_(False)
        self.accuracy = float((self.logits(images[held]).argmax(1) == labels[held]).float().mean())

    def settings(self) -> dict[str, object]:
        return {"extractor": self.id, "classifier_accuracy": self.accuracy}

    def __call__(self, images: Tensor) -> Tensor:
        return self.net.features(images.float() / 255)

    def logits(self, images: Tensor) -> Tensor:
        return self.net(images.float() / 255)


def score(images: Tensor, labels: Tensor, ref: Tensor, judge: CNN28Judge) -> tuple[float, float]:
    """(FID[cnn28] against ``ref``, class accuracy) of ``images`` (uint8 or [-1, 1])."""
    res = evaluate(images, ref, extractor=judge, classifier=judge, labels=labels,
                   metrics=("fid", "accuracy"))  # fmt: skip
    return float(res[f"fid[{judge.id}]"]), float(res[f"accuracy[{judge.id}]"])


# --------------------------------------------------------------------------- cells
def train_difflab(config: Path, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Train a difflab config for ``--budget`` CPU seconds; sample it at its defaults."""
    cfg = load_config(config, [*overrides, f"train.max_time={args.budget}",
                               "train.max_steps=1000000", "train.log_every=1000000",
                               "train.sample_every=0", "train.save_every=0",
                               "train.tensorboard=false", "train.plot_metrics=false"])  # fmt: skip
    cpu0 = time.process_time()
    trainer = Trainer.from_config(cfg, progress=False, clock=CLOCKS[args.clock])
    try:
        result = trainer.run()
    finally:
        trainer.close()
    train_cpu = time.process_time() - cpu0
    pipe = Pipeline.from_run(cfg.run_dir)
    labels = torch.arange(args.n) % 10
    cpu0 = time.process_time()
    images = pipe(args.n, class_labels=labels, seed=args.seed, progress=False)
    d = pipe.sample_defaults
    sampling = f"{d['sampler']}, {d['steps']} steps, CFG {d['guidance_scale']:g}"
    params = sum(p.numel() for p in pipe.model.parameters())
    return dict(steps=result.step, train_cpu_s=train_cpu, sample_cpu_s=time.process_time() - cpu0,
                images=images, labels=labels, params=params, loss=result.final_loss,
                sampling=sampling, batch=cfg.train.batch_size, pipe=pipe)  # fmt: skip


def scored_run(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``--score-run``: an earlier recipe run (say, one this script trained and kept), sampled
    at the recipe's *current* ``sample:`` defaults; its steps and loss from ``metrics.jsonl``."""
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    pipe = Pipeline.from_run(run_dir)
    recipe = load_config(ROOT / "configs" / "small_images.yaml", ["data.path=."])
    pipe.sample_defaults.update({k: v for k, v in recipe.sample.items()
                                 if k in pipe.sample_defaults})  # fmt: skip
    labels = torch.arange(args.n) % 10
    cpu0 = time.process_time()
    images = pipe(args.n, class_labels=labels, seed=args.seed, progress=False)
    d, params = pipe.sample_defaults, sum(p.numel() for p in pipe.model.parameters())
    sampling = f"{d['sampler']}, {d['steps']} steps, CFG {d['guidance_scale']:g}"
    return dict(steps=last["step"], train_cpu_s=None, sample_cpu_s=time.process_time() - cpu0,
                images=images, labels=labels, params=params, loss=last["loss"],
                batch=recipe.train.batch_size, pipe=pipe, sampling=sampling)  # fmt: skip


def sweep_rows(r: dict[str, Any], args: argparse.Namespace, ref: Tensor, judge: CNN28Judge):
    """Rows of the recipe's run sampled at each ``--sweep`` ``sampler:steps:cfg[:lo-hi]``
    (``lo-hi``: a guidance interval in σ)."""
    for spec in filter(None, args.sweep.split(",")):
        sampler, steps, cfg, *iv = spec.split(":")
        interval = tuple(float(v) for v in iv[0].split("-")) if iv else None
        cpu0 = time.process_time()
        images = r["pipe"](args.n, class_labels=r["labels"], sampler=sampler, steps=int(steps),
                           guidance_scale=float(cfg), guidance_interval=interval, seed=args.seed,
                           progress=False)  # fmt: skip
        row = {**r, "images": images, "sample_cpu_s": time.process_time() - cpu0}
        row["sampling"] = f"{sampler}, {steps} steps, CFG {float(cfg):g}" + (
            f" in σ {interval[0]:g}-{interval[1]:g}" if interval else ""
        )
        row["fid"], row["acc"] = score(images, r["labels"], ref, judge)
        print(f"    {row['sampling']}: FID {row['fid']:.2f}, acc {row['acc']:.3f}",
              file=sys.stderr, flush=True)  # fmt: skip
        yield row


def train_diffusers(data: tuple[Tensor, Tensor], args: argparse.Namespace) -> dict[str, Any]:
    """The standard diffusers recipe (module docstring) for ``--budget`` CPU seconds."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

    torch.manual_seed(args.seed)  # diffusers initialises from the global RNG
    net = UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, layers_per_block=2,
        block_out_channels=(32, 64, 64), norm_num_groups=8, num_class_embeds=11,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    lr_at = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    x_all = data[0].float() / 127.5 - 1
    y_all = data[1]
    gen = torch.Generator().manual_seed(args.seed)
    clock = CLOCKS[args.clock]
    budget, steps, cpu0, start = parse_duration(args.budget), 0, time.process_time(), clock()
    net.train()
    while clock() - start < budget:
        idx = torch.randint(len(x_all), (128,), generator=gen)
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(len(y), generator=gen) < 0.1] = 10  # the null label for CFG
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(1000, (len(x0),), generator=gen)
        pred = net(sched.add_noise(x0, noise, t), t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        lr_at.step()
        steps += 1
    train_cpu = time.process_time() - cpu0
    net.eval()
    solver = DPMSolverMultistepScheduler.from_config(sched.config)
    labels = torch.arange(args.n) % 10
    cpu0, out = time.process_time(), []
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for lab in labels.split(250):
            solver.set_timesteps(20)
            x = torch.randn(len(lab), 1, 28, 28, generator=gen)
            both = torch.cat([lab, torch.full_like(lab, 10)])
            for t in solver.timesteps:
                eps_c, eps_u = net(torch.cat([x, x]), t, class_labels=both).sample.chunk(2)
                x = solver.step(eps_u + 2.0 * (eps_c - eps_u), t, x).prev_sample
            out.append(x.clamp(-1, 1))
    params = sum(p.numel() for p in net.parameters())
    return dict(steps=steps, train_cpu_s=train_cpu, sample_cpu_s=time.process_time() - cpu0,
                images=torch.cat(out), labels=labels, params=params, loss=float(loss),
                sampling="DPMSolverMultistep, 20 steps, CFG 2", batch=128)  # fmt: skip


def run_cell(cell: str, name: str, folder: Path, data: tuple[Tensor, Tensor],
             args: argparse.Namespace, work: Path) -> dict[str, Any]:  # fmt: skip
    data_set = ["data.source=folder", f"data.path={folder}", f"run_dir={work / cell / name}",
                f"seed={args.seed}"]  # fmt: skip
    if cell == "recipe" and args.score_run is not None:
        return scored_run(args.score_run, args)
    if cell == "recipe":
        return train_difflab(ROOT / "configs" / "small_images.yaml",
                             [*data_set, *args.recipe_set], args)  # fmt: skip
    if cell == "digits":
        return train_difflab(ROOT / "configs" / "digits.yaml",
                             [*data_set, "data.image_size=28"], args)  # fmt: skip
    return train_diffusers(data, args)


# --------------------------------------------------------------------------- report
def table(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table of ``rows`` (each with its data set's ``floor``)."""
    lines = [
        "| data | cell | params (M) | train CPU s | train steps | img/CPU-s | sampling | n | "
        "sample CPU s | FID[cnn28] | floor | x floor | accuracy |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cpu = r["train_cpu_s"]  # None: a --score-run row (trained by an earlier run)
        speed = "—" if cpu is None else f"{r['steps'] * r['batch'] / cpu:.0f}"
        lines.append(
            f"| {r['data']} | {r['cell']} | {r['params'] / 1e6:.2f} | "
            f"{'—' if cpu is None else f'{cpu:.0f}'} | {r['steps']} | {speed} | {r['sampling']} | "
            f"{r.get('n', '?')} | {r['sample_cpu_s']:.0f} | {r['fid']:.2f} | {r['floor']:.2f} | "
            f"{r['fid'] / r['floor']:.1f}x | "
            f"{100 * r['acc']:.1f}% |"
        )
    return lines


def report(rows: list[dict[str, Any]], args: argparse.Namespace, total_s: float) -> str:
    """The results page: how it was measured, the table, floors and grids."""
    command = " ".join(["python bench/small_data.py", *args.argv])
    budget = (
        f"{args.budget} of {'wall' if getattr(args, 'clock', 'cpu') == 'wall' else 'process CPU'} "
        "time per cell"
        if not args.merge
        else ("each row's train CPU s of process CPU time")
    )
    clock = (
        f"wall time (`time.perf_counter`), {args.threads} torch threads, the machine otherwise "
        "idle, as the judge's 15 minutes"
        if getattr(args, "clock", "cpu") == "wall"
        else f"`time.process_time` with {args.threads} torch thread; not wall time: the 2-core "
        "machine was shared with other jobs"
    )
    lines = [
        "# Small images: recipe vs digits config vs diffusers, at equal CPU time",
        "",
        f"`{command}`",
        "",
        f"- Budget: **{budget}** ({clock}), then "
        f"{args.n} class-conditional samples (labels i mod 10, seed {args.seed}) at each "
        "cell's sampling settings."
        + (f" {total_s / 60:.0f} min wall in all." if not args.merge else ""),
        "- Judge: per data set a CNN (3 conv + 2 fc, 128-d features) trained on 90% of the "
        "10,000 training images; FID in its features against all 10,000; accuracy = its "
        "agreement with the requested label. Floor: FID of "
        f"{args.n} fresh real images (a new augmentation draw) against the same reference.",
        "",
        *table(rows),
        "",
    ]
    for name in dict.fromkeys(r["data"] for r in rows):
        r = next(r for r in rows if r["data"] == name)
        lines.append(f"- {name}: real-vs-real floor FID {r['floor']:.2f} (n = {args.n}); judge "
                     f"held-out accuracy {100 * r['judge_acc']:.1f}%; grid (real first, then "
                     f"the rows in table order): ![{name}](small_data_{name}.png)")  # fmt: skip
    return "\n".join(lines) + "\n"


def merged_rows(specs: str) -> list[dict[str, Any]]:
    """The rows (with 100 samples each) of earlier runs' ``OUT.json`` / ``OUT.pt`` files."""
    rows = []
    for path in map(Path, specs.split(",")):
        samples = torch.load(path.with_suffix(".pt"), weights_only=True)
        for r in json.loads(path.read_text())["rows"]:
            r["images"] = samples[f"{r['data']}/{r['cell']}"].float() / 127.5 - 1
            rows.append(r)
    return rows


def save_grids(name: str, real: Tensor, rows: list[dict[str, Any]], out: Path) -> None:
    """One PNG per data set: a row of 10 classes x 4 per cell (real first)."""
    blocks = [real.float() / 127.5 - 1]
    blocks += [r["images"][:40] for r in rows if r["data"] == name]
    tiles = [make_grid(b[:40].reshape(-1, 1, 28, 28), nrow=20, padding=1) for b in blocks]
    w = max(t.width for t in tiles)
    canvas = Image.new("L", (w, sum(t.height + 4 for t in tiles)), 128)
    top = 0
    for t in tiles:
        canvas.paste(t.convert("L"), (0, top))
        top += t.height + 4
    canvas.save(out.parent / f"small_data_{name}.png")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="60s", help="CPU time per cell (60s, 4m, ...)")
    p.add_argument("--datasets", default="digits28", help=f"comma-separated: {DATASETS}")
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated: {CELLS}")
    p.add_argument("--recipe-set", action="append", default=[], help="override for the recipe")
    p.add_argument("--sweep", default="", help="recipe also at sampler:steps:cfg,... (e.g. "
                   "dpmpp_2m:10:2,dpmpp_2m:20:3)")  # fmt: skip
    p.add_argument("--score-run", type=Path, default=None,
                   help="score this earlier recipe run (at the recipe's current sample: "
                   "defaults) instead of training one")  # fmt: skip
    p.add_argument("--n", type=int, default=500, help="samples per cell")
    p.add_argument("--size", type=int, default=10000, help="training images per data set")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=tuple(CLOCKS), default="cpu",
                   help="the budget's clock: process CPU time (a shared machine) or wall time "
                   "(an idle one, as the judge's 15 minutes)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--merge", default="", help="A.json,B.json: one page from earlier runs")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    parse_duration(args.budget)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="FID computed from")
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="small_data_"))
    rows, floors, judges = [], {}, {}
    if args.merge:
        rows = merged_rows(args.merge)
        for name in dict.fromkeys(r["data"] for r in rows):
            real = MAKERS[name](args.n, args.seed + 1000)[0]
            save_grids(name, real, rows, args.out)
        args.out.write_text(report(rows, args, 0.0), encoding="utf-8")
        raw = [{k: v for k, v in r.items() if k != "images"} for r in rows]
        args.out.with_suffix(".json").write_text(json.dumps({"rows": raw}, indent=1))
        return
    try:
        for name in args.datasets.split(","):
            data = MAKERS[name](args.size, args.seed)
            write_class_folders(*data, work / "data" / name)
            judges[name] = judge = CNN28Judge(name, *data, seed=args.seed)
            fresh = MAKERS[name](args.n, args.seed + 1000)
            floors[name] = score(fresh[0], fresh[1], data[0], judge)[0]
            print(f"{name}: judge acc {judge.accuracy:.3f}, floor FID {floors[name]:.2f}",
                  file=sys.stderr)  # fmt: skip
            for cell in args.cells.split(","):
                r = run_cell(cell, name, work / "data" / name, data, args, work)
                r["fid"], r["acc"] = score(r["images"], r["labels"], data[0], judge)
                label = (
                    cell
                    if cell != "recipe" or not args.recipe_set
                    else (f"recipe [{', '.join(args.recipe_set)}]")
                )
                r.update(data=name, cell=label, judge_acc=judge.accuracy, floor=floors[name],
                         n=args.n)  # fmt: skip
                print(f"  {cell}: {r['steps']} steps, loss {r['loss']:.4f}, FID {r['fid']:.2f}, "
                      f"acc {r['acc']:.3f} ({r['sampling']})", file=sys.stderr)  # fmt: skip
                rows.append(r)
                if cell == "recipe":
                    rows += list(sweep_rows(r, args, data[0], judge))
            save_grids(name, fresh[0], rows, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(rows, args, time.perf_counter() - start)
    raw = [{k: v for k, v in r.items() if k not in ("images", "labels", "pipe")} for r in rows]
    args.out.with_suffix(".json").write_text(json.dumps({"floors": floors, "rows": raw}, indent=1))
    args.out.write_text(text, encoding="utf-8")
    samples = {f"{r['data']}/{r['cell']}": to_uint8(r["images"][:100]) for r in rows}
    torch.save(samples, args.out.with_suffix(".pt"))  # raw samples, for re-drawing grids
    print(text)


if __name__ == "__main__":
    main()
