"""`ShapesClassifier`: the feature space of FID / accuracy on the synthetic RGB shapes.

Owns a small CNN for `difflab.data.shapes` (6 classes, 32x32 RGB), trained deterministically
on first use (about 12 CPU-seconds, one thread) on a fresh draw of the shapes (seed 1, never
the data set's seed 0) and scored on another (seed 2); cached under
``cache_dir()/shapes_cnn`` by `difflab.eval.features.load_or_train`, keyed by a hash of the
first 60 training images (the renderer's fingerprint) and the recipe.  Its input is the RGB
image plus one channel that makes the shape easy to find whatever its colours: each pixel's
largest per-channel distance from the background colour (the median of the border pixels),
divided by its maximum.  The penultimate 64-d features see the colours too, so
FID[shapes-cnn] compares both shape and colour statistics.

Knows nothing of models: it takes ``uint8 [N, 3, H, W]`` images like every `FeatureExtractor`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.data.shapes import SHAPE_NAMES, shapes_tensor
from difflab.eval.features import FeatureExtractor, _check_uint8, cache_dir, load_or_train
from difflab.eval.metrics import to_uint8

__all__ = [
    "SHAPES_CNN_TRAIN",
    "ShapesCNN",
    "ShapesClassifier",
    "shapes_cnn_input",
    "train_shapes_cnn",
]

SHAPES_ARCH_VERSION = "1"
SHAPES_CNN_SIZE = 32
# 3 epochs over 6,000 fresh shapes with a one-cycle LR: ~99% on 1,200 others, ~12 CPU-s.
SHAPES_CNN_TRAIN = {"n_train": 6000, "n_held_out": 1200, "train_seed": 1, "held_out_seed": 2,
                    "epochs": 3, "batch_size": 64, "lr": 5e-3, "seed": 0}  # fmt: skip


def shapes_cnn_input(images: Tensor) -> Tensor:
    """uint8 ``[N, 3, H, W]`` -> float ``[N, 4, 32, 32]``: RGB in [0, 1] (area-averaged or
    bilinearly resized to 32x32) and the distance-from-background channel."""
    x = _check_uint8(images, (3,)).float() / 255.0
    if x.shape[-2:] != (SHAPES_CNN_SIZE, SHAPES_CNN_SIZE):
        larger = x.shape[-1] > SHAPES_CNN_SIZE
        x = F.interpolate(x, size=(SHAPES_CNN_SIZE, SHAPES_CNN_SIZE),
                          mode="area" if larger else "bilinear",
                          align_corners=None if larger else False)  # fmt: skip
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]  # (N, 3, 1, 1)
    distance = (x - background).abs().amax(dim=1, keepdim=True)  # (N, 1, 32, 32)
    peak = distance.amax(dim=(2, 3), keepdim=True).clamp(min=1e-3)
    return torch.cat([x, distance / peak], dim=1)  # the shape's mask in [0, 1]


class ShapesCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool stages (32 -> 4 px) and two linear layers: 64-d features,
    6 logits."""

    feature_dim = 64

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        chans = (4, width, 2 * width, 4 * width)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans, chans[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in chans[1:])
        self.fc1 = nn.Linear(chans[-1] * 4 * 4, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, len(SHAPE_NAMES))

    def features(self, x: Tensor) -> Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = F.max_pool2d(F.relu(norm(conv(x))), 2)  # 32 -> 16 -> 8 -> 4
        return F.relu(self.fc1(x.flatten(1)))  # (N, 64)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.features(x))


def _shapes_uint8(n: int, seed: int) -> tuple[Tensor, Tensor]:
    x, labels = shapes_tensor(n, SHAPES_CNN_SIZE, seed=seed)
    return to_uint8(x), labels


def _init(model: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default conv / linear initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
    weights and biases, drawn from ``generator``."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            bound = m.weight[0].numel() ** -0.5
            with torch.no_grad():
                m.weight.uniform_(-bound, bound, generator=generator)
                if m.bias is not None:
                    m.bias.uniform_(-bound, bound, generator=generator)


def train_shapes_cnn(images: Tensor, labels: Tensor, *, epochs: int, batch_size: int,
                     lr: float, seed: int) -> ShapesCNN:  # fmt: skip
    """Adam with a one-cycle LR on ``uint8`` shapes, one thread; deterministic given ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        model = ShapesCNN()
    _init(model, gen)
    x = shapes_cnn_input(images)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=total, pct_start=0.15)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: fastest on one thread, and the same on every machine
    try:
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(batch_size):
                loss = F.cross_entropy(model(x[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _shapes_key(images: Tensor, labels: Tensor) -> str:
    h = hashlib.sha256()
    h.update(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    h.update(json.dumps({"arch": SHAPES_ARCH_VERSION, **SHAPES_CNN_TRAIN}, sort_keys=True).encode())
    return h.hexdigest()[:16]


class ShapesClassifier(FeatureExtractor):
    """Shapes CNN: penultimate features (id ``"shapes-cnn"``) and 6-way predictions.

    ``accuracy`` is its accuracy on 1,200 held-out shapes (also in the cache file's metadata).
    Images: ``uint8 [N, 3, H, W]``, resized to 32x32 when another size.
    """

    id = "shapes-cnn"
    feature_dim = ShapesCNN.feature_dim
    num_classes = len(SHAPE_NAMES)

    def __init__(
        self, *, cache: str | os.PathLike | None = None, device: str | torch.device = "cpu"
    ) -> None:
        cfg = SHAPES_CNN_TRAIN
        key = _shapes_key(*_shapes_uint8(60, int(cfg["train_seed"])))  # the renderer's print
        folder = Path(cache) if cache is not None else cache_dir() / "shapes_cnn"
        self.path = folder / f"shapes_cnn-{key}.safetensors"

        def train() -> tuple[ShapesCNN, float, dict[str, str]]:
            images, labels = _shapes_uint8(int(cfg["n_train"]), int(cfg["train_seed"]))
            network = train_shapes_cnn(
                images, labels, epochs=int(cfg["epochs"]), batch_size=int(cfg["batch_size"]),
                lr=float(cfg["lr"]), seed=int(cfg["seed"]),
            )  # fmt: skip
            held, held_labels = _shapes_uint8(int(cfg["n_held_out"]), int(cfg["held_out_seed"]))
            with torch.no_grad():
                pred = network(shapes_cnn_input(held)).argmax(1)
            meta = {"data_key": key, "arch_version": SHAPES_ARCH_VERSION,
                    "config": json.dumps(cfg, sort_keys=True)}  # fmt: skip
            return network, float((pred == held_labels).float().mean()), meta

        with torch.random.fork_rng(devices=[]):
            network = ShapesCNN()  # weights come from the cache or from training
        network, self.accuracy = load_or_train(self.path, network, train)
        self.device = torch.device(device)
        self.network = network.to(self.device).eval().requires_grad_(False)

    def settings(self) -> dict[str, object]:
        return {"extractor": self.id, "resize": "32x32", "classifier_accuracy": self.accuracy}

    def __call__(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.network.features(shapes_cnn_input(images).to(self.device)).float().cpu()

    def logits(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.network(shapes_cnn_input(images).to(self.device)).float().cpu()

    def predict(self, images: Tensor) -> Tensor:
        """Predicted shape class ``[N]`` (int64) for ``uint8 [N, 3, H, W]`` images."""
        return self.logits(images).argmax(dim=1)
