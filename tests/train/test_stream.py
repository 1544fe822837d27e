"""The data order: per-epoch permutations from ``(seed, epoch)``, positions that resume, and
worker processes that do not change what is loaded."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from train_helpers import ToyData

from difflab.train import stream as stream_module
from difflab.train.stream import BatchStream, epoch_order


def _take(stream: BatchStream, k: int) -> list[tuple[torch.Tensor, dict[str, int]]]:
    return [(stream.next()["image"], dict(stream.position)) for _ in range(k)]


def test_batches_follow_the_epoch_permutations_and_positions_count_samples():
    data = ToyData(n=10)
    stream = BatchStream(data, 4, seed=3)  # 2 batches per epoch, 2 samples dropped
    got = _take(stream, 5)
    for k, (images, position) in enumerate(got):
        epoch, b = divmod(k, 2)
        rows = epoch_order(3, epoch, 10)[4 * b : 4 * b + 4]
        assert torch.equal(images, data.images[rows])
        assert position == {"epoch": epoch, "index": 4 * (b + 1)}


def test_workers_load_the_same_batches_from_one_loader_and_resume_in_place(monkeypatch):
    """Worker processes are started once for the whole run (a loader per epoch respawned them
    every epoch), read ahead across epochs, and change neither the batches nor the positions;
    a stream restored at a position continues exactly."""
    made = []

    class CountingLoader(DataLoader):
        def __init__(self, *args, **kwargs):
            made.append(kwargs["num_workers"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(stream_module, "DataLoader", CountingLoader)
    data = ToyData(n=12)
    plain = _take(BatchStream(data, 4, seed=1), 8)  # 3 batches per epoch: 2 epochs and more
    workers = BatchStream(data, 4, seed=1, num_workers=2)
    try:
        loaded = _take(workers, 8)
    finally:
        workers.close()
    assert made == [2]  # one loader for all 8 batches, not one per epoch
    for (a, pa), (b, pb) in zip(plain, loaded):
        assert torch.equal(a, b) and pa == pb
    resumed = BatchStream(data, 4, seed=1, num_workers=2, **plain[3][1])
    try:
        for images, position in plain[4:]:
            assert torch.equal(resumed.next()["image"], images)
            assert resumed.position == position
    finally:
        resumed.close()
