"""Training on aspect-ratio buckets: non-square batches of one bucket each, exact resume,
and sampling the trained run at a bucket size."""

from __future__ import annotations

from PIL import Image
from train_helpers import one_thread, tiny_config, train_with_a_cut  # noqa: F401

from difflab.pipeline import Pipeline
from difflab.train import Trainer, load_checkpoint, train

SHAPES = {(8, 8): 8, (20, 12): 8, (12, 20): 8}  # -> buckets 8x8, 10x6, 6x10 at 8 px, step 2


def _folder(root):
    root.mkdir()
    k = 0
    for (w, h), n in SHAPES.items():
        for _ in range(n):
            Image.new("L", (w, h), 20 * k % 255).save(root / f"{k:02d}.png")
            k += 1
    return root


def _cfg(tmp_path, name):
    return tiny_config(
        tmp_path / name, "data.source=folder", f"data.path={tmp_path / 'imgs'}",
        "data.buckets=true", "train.batch_size=4", "train.max_steps=4",
    )  # fmt: skip


def test_bucketed_run_trains_non_square_batches_and_resumes_exactly(tmp_path):
    _folder(tmp_path / "imgs")
    trainer = Trainer.from_config(_cfg(tmp_path, "peek"))
    try:
        assert trainer.cfg.data.bucket_step == 2  # the tiny U-Net's downsampling
        shapes = {tuple(trainer.stream.next()["image"].shape[2:]) for _ in range(9)}
    finally:
        trainer.close()
    assert shapes == {(8, 8), (6, 10), (10, 6)}  # (H, W) of whole batches
    whole = train(_cfg(tmp_path, "whole"))
    cut = train_with_a_cut(_cfg(tmp_path, "cut"), 2)
    assert whole.losses == whole.losses[:2] + cut.losses
    a, b = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "cut")
    assert all((a.model[k] == b.model[k]).all() for k in a.model)
    pipe = Pipeline.from_run(tmp_path / "whole", device="cpu")
    out = pipe(2, steps=2, seed=0, height=6, width=10, progress=False)
    assert out.shape == (2, 1, 6, 10)
