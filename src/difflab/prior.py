"""DreamBooth's class-specific prior preservation (Ruiz et al. 2023, sec. 3.3, eq. 2).

Owns the prior images — ``n`` samples the base run draws for the class condition (a prompt
such as "a handwritten digit seven", or a class label), written as PNGs with a manifest
under ``RUN/prior`` and reused when the manifest matches, the missing ones generated when
fewer exist — and the training set that mixes them with the instance images: every item
carries a ``prior`` flag, and the instance images are repeated so that both halves are
about equally frequent in a batch, as DreamBooth pairs an instance batch with a class
batch. The trainer weighs prior samples by ``prior_weight`` (λ in eq. 2) and logs the two
losses separately.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["PriorMixture", "prior_images"]

MANIFEST = "prior.json"


def _condition_kind(condition: str | int) -> str:
    return "class_label" if isinstance(condition, int) else "text"


def prior_images(
    base_run: str | Path,
    condition: str | int,
    n: int,
    folder: str | Path,
    *,
    seed: int = 0,
    batch: int = 50,
    progress: bool | None = None,
) -> Tensor:
    """``[n, C, H, W]`` images in [-1, 1] the base run draws for ``condition`` (its EMA
    weights and sampling defaults; image ``i`` from seed ``seed + i``), cached in ``folder``.

    :raises ValueError: ``n < 1``, or a condition the base model cannot take.
    """
    from .images import save_image
    from .pipeline import Pipeline

    if n < 1:
        raise ValueError(f"prior_images needs n >= 1, got {n}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"base_run": str(Path(base_run).resolve()), "condition": condition, "seed": seed}
    path = folder / MANIFEST
    have = 0
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if {k: old.get(k) for k in manifest} == manifest:
            while (folder / f"{have:05d}.png").is_file():
                have += 1
    if have < n:  # the count is checked: generate what is missing
        print(f"prior preservation: drawing {n - have} images for {condition!r} ({have} cached)")
        pipe = Pipeline.from_run(base_run)
        kind = _condition_kind(condition)
        for lo in range(have, n, batch):
            count = min(batch, n - lo)
            cond: dict[str, Any] = (
                {"class_labels": [condition] * count} if kind == "class_label"
                else {"prompt": [str(condition)] * count}
            )  # fmt: skip
            images = pipe(n=count, seed=seed + lo, progress=progress, **cond)
            for i in range(count):
                params = {"prior": condition, "seed": seed + lo + i, "base_run": str(base_run)}
                save_image(images[i], folder / f"{lo + i:05d}.png", params)
        path.write_text(json.dumps({**manifest, "count": n}, indent=1), encoding="utf-8")
    return torch.stack([_read(folder / f"{i:05d}.png") for i in range(n)])


def _read(path: Path) -> Tensor:
    with Image.open(path) as img:
        arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


class PriorMixture(Dataset):
    """Instance items (repeated ``ceil(len(prior) / len(instance))`` times) followed by the
    prior images with their condition; every item gains ``prior: bool``.

    :param instance: the user's data set (items with ``image`` and the condition key).
    :param images: prior images ``[N, C, H, W]``; :param condition: their prompt or label.
    """

    def __init__(self, instance: Dataset, images: Tensor, condition: str | int) -> None:
        n_inst = len(instance)  # type: ignore[arg-type]
        if n_inst == 0:
            raise ValueError("prior preservation needs at least one instance image")
        self.instance = instance
        self.images = images
        self.condition = condition
        self.key = _condition_kind(condition)
        self.repeat = max(1, math.ceil(len(images) / n_inst))
        first = instance[0]
        if self.key not in first:
            raise ValueError(
                f"the instance data has no {self.key!r} for the prior condition "
                f"{condition!r} (its items have {sorted(first)})"
            )
        if tuple(first["image"].shape) != tuple(images.shape[1:]):
            raise ValueError(
                f"instance images are {tuple(first['image'].shape)} but the base run draws "
                f"{tuple(images.shape[1:])}; set data.image_size / data.channels to match"
            )
        self.n_instance = n_inst * self.repeat
        self.texts = None
        if self.key == "text":
            inst_texts = getattr(instance, "texts", None)
            if inst_texts is None:
                inst_texts = [instance[i]["text"] for i in range(n_inst)]
            self.texts = list(inst_texts) * self.repeat + [str(condition)] * len(images)

    def __len__(self) -> int:
        return self.n_instance + len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < self.n_instance:
            item = self.instance[index % len(self.instance)]  # type: ignore[arg-type]
            return {"image": item["image"], self.key: item[self.key], "prior": False}
        return {"image": self.images[index - self.n_instance], self.key: self.condition,
                "prior": True}  # fmt: skip
