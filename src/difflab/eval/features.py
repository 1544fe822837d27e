"""Feature extractors for sample-quality metrics, behind one interface.

Owns: the `FeatureExtractor` interface (an ``id`` recorded next to every number it produces),
Inception-v3 in the pytorch-fid layout (FID: Heusel et al. 2017; resize modes per clean-fid,
Parmar et al. 2022) loaded from a local weights file, `DigitsClassifier`, a small CNN
trained on scikit-learn's bundled 8x8 digits and cached on disk, and `load_or_train`, the
cache both it and `difflab.eval.shapes_classifier.ShapesClassifier` use.

Knows nothing of models, schedules or samplers: extractors take ``uint8`` images
``[N, C, H, W]`` (quantise with `difflab.eval.metrics.to_uint8` first) and nothing else.
Nothing here downloads; randomness comes only from explicit generators.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from difflab._validate import check_choice

ResizeMode = Literal["clean", "legacy"]
RESIZE_MODES: tuple[str, ...] = (
    "clean",
    "legacy",
)  # clean: PIL bicubic (clean-fid); legacy: torch bilinear (pytorch-fid)

INCEPTION_WEIGHTS_ENV = "DIFFLAB_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
CACHE_ENV = "DIFFLAB_CACHE"


def cache_dir() -> Path:
    """The user cache folder: ``$DIFFLAB_CACHE`` if set, else ``~/.cache/difflab``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "difflab"


def _check_uint8(images: Tensor, channels: tuple[int, ...]) -> Tensor:
    """Reject anything but ``uint8 [N, C, H, W]``: metrics are defined on quantised images."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(
            f"feature extractors take uint8 images [N, C, H, W] in [0, 255], got {got}; "
            "quantise float images in [-1, 1] with difflab.eval.to_uint8 first"
        )
    if images.ndim != 4 or images.shape[1] not in channels:
        raise ValueError(
            f"expected images [N, C, H, W] with C in {channels}, got shape {tuple(images.shape)}"
        )
    return images


class FeatureExtractor(ABC):
    """Maps ``uint8 [N, C, H, W]`` images to features ``[N, feature_dim]`` (float32).

    ``id`` names the network *and* its preprocessing (e.g. resize mode); every metric value
    computed from these features is reported under it, so numbers from different extractors
    are never mixed up.
    """

    id: str
    feature_dim: int
    num_classes: int | None = None  # set when `logits` is available

    @abstractmethod
    def __call__(self, images: Tensor) -> Tensor:
        """Features ``[N, feature_dim]`` (float32, on CPU) of ``uint8 [N, C, H, W]`` images."""

    def logits(self, images: Tensor) -> Tensor:
        """Class logits ``[N, num_classes]``; only for extractors that are classifiers."""
        raise NotImplementedError(f"feature extractor {self.id!r} has no classifier head")

    def settings(self) -> dict[str, object]:
        """Settings recorded next to every number (at least ``extractor``)."""
        return {"extractor": self.id}


# --------------------------------------------------------------------------------------------
# Inception-v3, pytorch-fid layout (state-dict keys as torchvision's Inception3 with the
# FID-specific blocks of the 2015-12-05 TensorFlow graph).
# --------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, as the TF graph) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, **conv_kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: Tensor) -> Tensor:
    # The TF FID graph averages over valid pixels only (count_include_pad=False).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/c/d (FID variant: padding excluded from the average pool)."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], dim=1)


class InceptionC(nn.Module):
    """Mixed_6b..e: factorised 7x7 convolutions (FID variant of the average pool)."""

    def __init__(self, c_in: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            bd = layer(bd)
        bd = self.branch7x7dbl_5(bd)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b7, bd, bp], dim=1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class InceptionE(nn.Module):
    """Mixed_7b (``pool="avg"``, FID variant) and Mixed_7c (``pool="max"``, as the TF graph)."""

    def __init__(self, c_in: int, pool: Literal["avg", "max"]) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], dim=1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], dim=1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the FID reference graph (Heusel et al. 2017; Szegedy et al. 2016).

    Input: float ``[N, 3, 299, 299]`` scaled to ``[-1, 1]``. Returns the 2048-d pool3
    features ``[N, 2048]`` and the 1008-class logits ``[N, 1008]``. Parameter names match
    pytorch-fid's ``pt_inception-2015-12-05-*.pth`` so that file loads with ``strict=True``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)  # ends at (N, 2048, 8, 8)
        pool3 = x.mean(dim=(2, 3))  # (N, 2048)
        return pool3, self.fc(pool3)


def _missing_weights_message(path: str | os.PathLike | None) -> str:
    where = f"'{path}' does not exist" if path else "no weights file given"
    return (
        f"Inception-v3 FID weights not found ({where}). difflab never downloads. Get the "
        f"pytorch-fid weights yourself:\n    {INCEPTION_WEIGHTS_URL}\n"
        f"then pass path=... or set the environment variable {INCEPTION_WEIGHTS_ENV} to the "
        "file (.pth or .safetensors)."
    )


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read tensors from ``.safetensors`` or, safely, ``torch.load(weights_only=True)``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def load_strict(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``module``; raise listing every missing / unexpected / misshapen key.

    BatchNorm's ``num_batches_tracked`` counters are not weights and may be absent.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source} does not match {type(module).__name__}: "
            f"{len(missing)} missing {missing[:10]}, {len(unexpected)} unexpected "
            f"{unexpected[:10]}, {len(shapes)} shape mismatches {shapes[:10]}"
        )
    module.load_state_dict(state, strict=False)


def resize_clean(images: Tensor, size: int) -> Tensor:
    """clean-fid resize (Parmar et al. 2022): PIL bicubic per channel on float32 values.

    ``uint8 [N, C, H, W]`` -> float32 ``[N, C, size, size]`` in ``[0, 255]``.
    """
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.float32)
    arrays = images.cpu().numpy().astype(np.float32)
    for i, img in enumerate(arrays):
        for c, channel in enumerate(img):
            pil = Image.fromarray(channel)  # float32 2-D -> mode "F": no quantisation
            assert pil.mode == "F"
            resized = pil.resize((size, size), Image.Resampling.BICUBIC)
            out[i, c] = torch.from_numpy(np.array(resized, dtype=np.float32))
    return out.clamp(0.0, 255.0)


def resize_legacy(images: Tensor, size: int) -> Tensor:
    """pytorch-fid resize: torch bilinear (``align_corners=False``) on ``[0, 255]`` floats."""
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)


class InceptionV3Features(FeatureExtractor):
    """Pool3 features (2048-d) and 1008-class logits of the FID Inception-v3 (Heusel et al. 2017).

    :param path: local weights file (``.pth`` from pytorch-fid's release or ``.safetensors``);
        defaults to ``$DIFFLAB_INCEPTION_WEIGHTS``. Nothing is ever downloaded.
    :param resize: ``"clean"`` — PIL bicubic on the uint8 images (clean-fid, Parmar et al. 2022);
        ``"legacy"`` — torch bilinear as pytorch-fid. Part of ``id``.
    :param network: an already-built network (tests); skips loading from ``path``.
    """

    feature_dim = 2048
    num_classes = 1008
    input_size = 299

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        resize: ResizeMode = "clean",
        device: str | torch.device = "cpu",
        network: FIDInceptionV3 | None = None,
    ) -> None:
        self.resize = check_choice("resize mode", resize, RESIZE_MODES)
        self.id = f"inception-v3-fid/{self.resize}"
        self.device = torch.device(device)
        if network is None:
            network = self._load(path)
        self.network = network.to(self.device).eval().requires_grad_(False)

    @staticmethod
    def _load(path: str | os.PathLike | None) -> FIDInceptionV3:
        path = path or os.environ.get(INCEPTION_WEIGHTS_ENV)
        if not path or not Path(path).is_file():
            raise FileNotFoundError(_missing_weights_message(path))
        network = build_inception(torch.Generator().manual_seed(0))
        load_strict(network, load_state_dict_file(path), str(path))
        return network

    def settings(self) -> dict[str, object]:
        return {"extractor": self.id, "resize": self.resize}

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Pool3 features ``[N, 2048]`` and logits ``[N, 1008]`` from one forward pass."""
        images = _check_uint8(images, (1, 3))
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)  # grey -> RGB
        if self.resize == "clean":
            x = resize_clean(images, self.input_size)
        else:
            x = resize_legacy(images, self.input_size)
        x = x.to(self.device) / 255.0 * 2.0 - 1.0  # [0, 255] -> [-1, 1], as the TF graph
        with torch.no_grad():
            feats, logits = self.network(x)
        return feats.float().cpu(), logits.float().cpu()

    def __call__(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[0]

    def logits(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[1]


def build_inception(generator: torch.Generator) -> FIDInceptionV3:
    """The FID Inception-v3 with weights drawn from ``generator`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        network = FIDInceptionV3()
    _reinit(network, generator)
    return network


def _reinit(module: nn.Module, generator: torch.Generator) -> None:
    """Re-draw conv/linear weights from ``generator`` (He-uniform: variance 2 / fan_in)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            fan_in = m.weight[0].numel()
            bound = (6.0 / fan_in) ** 0.5
            with torch.no_grad():
                m.weight.uniform_(-bound, bound, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()


_Net = TypeVar("_Net", bound=nn.Module)


def load_or_train(
    path: Path,
    network: _Net,
    train: Callable[[], tuple[_Net, float, dict[str, str]]],
) -> tuple[_Net, float]:
    """A small classifier cached as safetensors: ``network`` with the weights of ``path``, or
    the network ``train()`` returns (with its held-out accuracy and metadata), written to
    ``path`` atomically. :return: the network and its held-out accuracy."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "held_out_accuracy" not in meta:
            raise ValueError(f"{path} has no 'held_out_accuracy' metadata: not a difflab cache")
        load_strict(network, load_file(str(path)), str(path))
        return network, float(meta["held_out_accuracy"])
    network, accuracy, meta = train()
    meta = {**meta, "held_out_accuracy": repr(accuracy),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(network.state_dict(), str(tmp), metadata=meta)
    os.replace(tmp, path)  # atomic: never a half-written cache entry
    return network, accuracy


# --------------------------------------------------------------------------------------------
# Digits classifier (scikit-learn's 8x8 digits).
# --------------------------------------------------------------------------------------------

DIGITS_ARCH_VERSION = "1"
DIGITS_SEED = 0
DIGITS_HELD_OUT = 0.2  # fraction of the 1,797 images kept out of training
# ~2 s of CPU, ~99% held out
DIGITS_TRAIN: dict[str, Any] = {"epochs": 20, "batch_size": 128, "lr": 5e-3}


class DigitsCNN(nn.Module):
    """Small CNN for ``[N, 1, 8, 8]`` inputs in ``[0, 1]``: 64-d penultimate features, 10 logits."""

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(64 * 2 * 2, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, 32, 4, 4)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (N, 64, 2, 2)
        return F.relu(self.fc1(h.flatten(1)))  # (N, 64)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.features(x))


def digits_data() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits as ``uint8 [1797, 1, 8, 8]`` in [0, 255] and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    return torch.from_numpy(images[:, None]), torch.from_numpy(digits.target.astype(np.int64))


def digits_split(n: int, seed: int = DIGITS_SEED) -> tuple[Tensor, Tensor]:
    """Fixed (train, held-out) index split of ``n`` images."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = int(round(n * DIGITS_HELD_OUT))
    return perm[n_held:], perm[:n_held]


def _digits_key(images: Tensor, labels: Tensor) -> str:
    h = hashlib.sha256()
    h.update(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    config = {"arch": DIGITS_ARCH_VERSION, "seed": DIGITS_SEED, "held_out": DIGITS_HELD_OUT}
    h.update(json.dumps({**config, **DIGITS_TRAIN}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _to_unit_8x8(images: Tensor) -> Tensor:
    """uint8 ``[N, 1, H, W]`` -> float ``[N, 1, 8, 8]`` in [0, 1], area-averaged when larger."""
    x = _check_uint8(images, (1,)).float() / 255.0
    if x.shape[-2:] != (8, 8):
        x = F.interpolate(x, size=(8, 8), mode="area")
    return x


def train_digits_cnn(
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int = DIGITS_TRAIN["epochs"],
    batch_size: int = DIGITS_TRAIN["batch_size"],
    lr: float = DIGITS_TRAIN["lr"],
    seed: int = DIGITS_SEED,
) -> DigitsCNN:
    """Train `DigitsCNN` with Adam on ``uint8`` digits; deterministic given ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        model = DigitsCNN()
    _reinit(model, gen)
    x, y = _to_unit_8x8(images), labels
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small are fastest (10-50x on a busy CPU) on one thread
    try:
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(batch_size):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


class DigitsClassifier(FeatureExtractor):
    """Digits CNN: penultimate features (id ``"digits-cnn"``) and 10-way predictions.

    Trained on first use (seconds on a CPU) on a fixed split of scikit-learn's 8x8 digits and
    cached under `cache_dir` as safetensors keyed by a hash of the data and architecture
    version; ``accuracy`` is the held-out accuracy (also in the file's metadata). Images may be
    8x8 or larger (area-averaged down to 8x8), 1 channel, ``uint8``.
    """

    id = "digits-cnn"
    feature_dim = DigitsCNN.feature_dim
    num_classes = 10

    def __init__(
        self, *, cache: str | os.PathLike | None = None, device: str | torch.device = "cpu"
    ) -> None:
        images, labels = digits_data()
        key = _digits_key(images, labels)
        folder = Path(cache) if cache is not None else cache_dir() / "digits_cnn"
        self.path = folder / f"digits_cnn-{key}.safetensors"

        def train() -> tuple[DigitsCNN, float, dict[str, str]]:
            train_idx, held = digits_split(len(images))
            network = train_digits_cnn(images[train_idx], labels[train_idx])
            with torch.no_grad():
                pred = network(_to_unit_8x8(images[held])).argmax(1)
            meta = {
                "n_train": str(len(train_idx)),
                "n_held_out": str(len(held)),
                "data_key": key,
                "arch_version": DIGITS_ARCH_VERSION,
                "config": json.dumps(
                    {"seed": DIGITS_SEED, "held_out": DIGITS_HELD_OUT, **DIGITS_TRAIN}
                ),
            }
            return network, float((pred == labels[held]).float().mean()), meta

        with torch.random.fork_rng(devices=[]):
            network = DigitsCNN()  # weights come from the cache or from training
        self.network, self.accuracy = load_or_train(self.path, network, train)
        self.device = torch.device(device)
        self.network = self.network.to(self.device).eval().requires_grad_(False)

    def settings(self) -> dict[str, object]:
        return {"extractor": self.id, "resize": "area-8x8", "classifier_accuracy": self.accuracy}

    def __call__(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.network.features(_to_unit_8x8(images).to(self.device)).float().cpu()

    def logits(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.network(_to_unit_8x8(images).to(self.device)).float().cpu()

    def predict(self, images: Tensor) -> Tensor:
        """Predicted digit ``[N]`` (int64) for ``uint8 [N, 1, H, W]`` images."""
        return self.logits(images).argmax(dim=1)
