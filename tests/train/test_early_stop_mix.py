"""Early stopping on a scripted metric (best weights kept) and data.mix's exact fractions."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import ToyData, one_thread, tiny_config  # noqa: F401

from difflab.train import Trainer
from difflab.train.early_stop import EarlyStopping


def test_patience_counter_known_answer():
    es = EarlyStopping(patience=2, min_delta=0.01)
    seq = [(1.0, (True, False)), (0.995, (False, False)), (0.9, (True, False)),
           (0.95, (False, False)), (float("nan"), (False, True))]  # fmt: skip
    for step, (value, want) in enumerate(seq):
        assert es.update(value, step) == want
    assert (es.best, es.best_step) == (0.9, 2)
    again = EarlyStopping(patience=2)
    again.load_state_dict(es.state_dict())
    assert (again.best, again.best_step, again.bad) == (0.9, 2, 2)


def test_early_stopping_on_a_scripted_validation_metric(tmp_path):
    cfg = tiny_config(tmp_path / "run", "train.max_steps=20", "train.val_fraction=0.25",
                      "train.val_every=2", "train.patience=2")  # fmt: skip
    trainer = Trainer.from_config(cfg, dataset=ToyData())
    script = iter([0.9, 0.7, 0.8, 0.75, 0.6])  # best at step 4, then two without improving
    ema_at: dict[int, dict] = {}

    def scripted() -> dict:
        ema_at[trainer.step] = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
        record = {"step": trainer.step, "event": "validation", "val_loss_ema": next(script)}
        trainer._last_records["val"] = record
        return record

    trainer._validation = scripted
    try:
        result = trainer.run()
    finally:
        trainer.close()
    assert result.step == 8 and result.stop_reason == "early stopping"
    best = load_file(str(tmp_path / "run" / "best.safetensors"))
    for key, value in ema_at[4].items():
        assert torch.equal(best[key], value), key


def _colour_folder(root, n, colour):
    root.mkdir(parents=True)
    for k in range(n):
        Image.new("L", (8, 8), colour).save(root / f"{k}.png")
    return root


def test_mix_fraction_is_exact_per_batch_and_both_losses_logged(tmp_path):
    general = _colour_folder(tmp_path / "general", 10, 255)  # white: pixel value +1
    cfg = tiny_config(tmp_path / "run", "train.max_steps=3", "train.batch_size=8",
                      f"data.mix={{path: {general}, fraction: 0.25}}")  # fmt: skip
    trainer = Trainer.from_config(cfg, dataset=ToyData())  # ToyData pixels are < 1
    try:
        for _ in range(5):
            batch = trainer.stream.next()
            white = (batch["image"] == 1.0).flatten(1).all(1)
            assert batch["mix"].tolist() == [False] * 6 + [True] * 2
            assert torch.equal(white, batch["mix"])  # exactly 2 of 8 from the general data
            assert batch["class_label"][6:].tolist() == [-1, -1]
        trainer.stream.set_position({"epoch": 0, "index": 0, "mix": {"epoch": 0, "index": 0}})
        trainer.run()
    finally:
        trainer.close()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "event" not in r]
    for r in steps:
        assert r["loss"] == pytest.approx(0.75 * r["loss_main"] + 0.25 * r["loss_mix"], rel=1e-5)


def test_data_report_counts_captions_past_the_token_limit(tmp_path, capsys):
    from train_helpers import write_captioned_images

    folder = write_captioned_images(
        tmp_path / "caps", ["a red cat", "a very big red dog here", "one two three four five"]
    )
    cfg = tiny_config(tmp_path / "run", "data.source=captions", f"data.path={folder}",
                      "model.num_classes=null", "text.encoder=transformer", "text.width=8",
                      "text.layers=1", "text.heads=2", "text.max_length=4",
                      "train.batch_size=2")  # fmt: skip
    with pytest.warns(UserWarning, match="longest caption has 6 words"):
        Trainer.from_config(cfg).close()
    # max_length 4 keeps 3 words after the start token: two captions are cut
    assert "captions truncated at the encoder's 3 tokens: 2" in capsys.readouterr().out
