"""Shared fixtures for the training tests: a tiny config and an in-memory data set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from difflab.train import TrainConfig, Trainer, TrainResult, load_config, train
from difflab.train.validation import validation_timesteps

TINY_MODEL = [
    "train.device=cpu",  # the same on every machine; tests/train/test_cuda.py uses CUDA
    "train.plot_metrics=false",  # 0.2 s a checkpoint; tests/train/test_log_lines.py draws it
    "model.preset=tiny",
    "model.image_size=8",
    "model.model_channels=16",
    "model.norm_groups=4",
    "model.num_classes=4",
    "model.dropout=0.1",
    "data.image_size=8",
    "diffusion.schedule.T=100",
    "train.batch_size=8",
    "train.warmup_steps=2",
    "train.max_steps=4",
    "train.log_every=1",
    "train.sample_every=0",
    "train.save_every=0",
    "train.tensorboard=false",
    "sample.steps=3",
    "sample.num_images=4",
]


def tiny_config(run_dir: Path, *overrides: str) -> TrainConfig:
    """A U-Net of a few thousand weights on 8x8 images; ``overrides`` as ``key.sub=value``."""
    return load_config(None, [f"run_dir={run_dir}", *TINY_MODEL, *overrides])


DIT_MODEL = [o for o in TINY_MODEL if not o.startswith("model.")] + [
    "model.arch=dit", "model.preset=tiny", "model.num_classes=4", "model.num_heads=2",
]  # fmt: skip


def tiny_dit_config(run_dir: Path, *overrides: str) -> TrainConfig:
    """A 2-block DiT (width 32, 2 heads) on 8x8 images; ``overrides`` as ``key.sub=value``."""
    return load_config(None, [f"run_dir={run_dir}", *DIT_MODEL, *overrides])


class ToyData(Dataset):
    """``n`` fixed 1x8x8 images in [-1, 1] with class labels ``i % 4``."""

    def __init__(self, n: int = 32, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "class_label": i % 4}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions are fastest (and not starved on a busy machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_with_a_cut(
    cfg: TrainConfig, cut: int, dataset: Dataset | None = None, **kwargs: Any
) -> TrainResult:
    """The run of ``cfg`` cut off after step ``cut`` (checkpoint saved), then resumed to the
    end: what "2N steps equal N + resume + N" compares with the uncut run."""
    first = Trainer.from_config(cfg, dataset=dataset, **kwargs)
    try:
        first.run(stop_at=cut)
    finally:
        first.close()
    return train(cfg, dataset=dataset, resume=True)


def eps_mse_by_hand(net, schedule, x0, cond, seed, k, batch):
    """L_simple at the k validation timesteps with the validation noise (Ho et al. eq. 14),
    batch by batch and timestep by timestep in the order the noise is drawn."""
    gen = torch.Generator().manual_seed(seed)
    losses = []
    with torch.no_grad():
        for lo in range(0, len(x0), batch):
            xb = x0[lo : lo + batch]
            cb = {key: value[lo : lo + batch] for key, value in cond.items()}
            for t in validation_timesteps(schedule.num_timesteps, k):
                eps = torch.randn(xb.shape, generator=gen)
                a = schedule.alpha(torch.tensor(float(t)))
                s = schedule.sigma(torch.tensor(float(t)))
                pred = net(a * xb + s * eps, torch.full((len(xb),), float(t)), **cb)
                losses.append(((pred - eps) ** 2).flatten(1).mean(1))
    return float(torch.cat(losses).double().mean())


def write_captioned_images(folder: Path, captions: list[str], seed: int = 0) -> Path:
    """Random 8x8 grayscale PNGs ``0.png, 1.png, ...`` with ``metadata.jsonl`` captions (the
    Hugging Face imagefolder layout that ``data.source: captions`` reads)."""
    import json

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    with open(folder / "metadata.jsonl", "w") as fh:
        for k, text in enumerate(captions):
            pixels = (torch.rand(8, 8, generator=gen) * 255).byte().numpy()
            Image.fromarray(pixels).save(folder / f"{k}.png")
            fh.write(json.dumps({"file_name": f"{k}.png", "text": text}) + "\n")
    return folder


def save_tiny_clip(folder: Path) -> Path:
    """A tiny random CLIP text model (24 wide, 1 layer, 32 positions) with a letters-only
    tokenizer, saved as ``save_pretrained`` writes them (``text.encoder: clip``)."""
    import transformers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz":
            vocab[c + suffix] = len(vocab)
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=24, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.CLIPTextModel(config)
    model.save_pretrained(folder)
    transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    return folder
