"""DreamBooth's prior preservation (Ruiz et al. 2023, eq. 2): cached, count-checked prior
images from the base run, a balanced instance/prior mixture, λ-weighted per-sample losses,
and the two losses logged apart."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from train_helpers import ToyData, tiny_config, train_with_a_cut  # noqa: E402

import difflab as dl  # noqa: E402
from difflab.cli.finetune import finetune_config  # noqa: E402
from difflab.images import to_uint8  # noqa: E402
from difflab.prior import PriorMixture, prior_images  # noqa: E402
from difflab.train import Trainer, load_checkpoint, load_config, train  # noqa: E402


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("base")
    torch.set_num_threads(1)
    train(tiny_config(run, "train.max_steps=2"), dataset=ToyData(), progress=False)
    return run


def test_prior_images_are_the_base_runs_samples_cached_and_count_checked(base_run, tmp_path):
    folder = tmp_path / "prior"
    first = prior_images(base_run, 2, 3, folder, seed=7)
    pipe = dl.Pipeline.from_run(base_run)
    expected = pipe(n=3, class_labels=[2, 2, 2], seed=7)
    quantised = torch.from_numpy(to_uint8(expected)).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(first, quantised, rtol=0, atol=1e-6)  # PNG round trip
    stamp = (folder / "00000.png").stat().st_mtime_ns
    more = prior_images(base_run, 2, 5, folder, seed=7)  # only the 2 missing are drawn
    assert (folder / "00000.png").stat().st_mtime_ns == stamp
    assert torch.equal(more[:3], first) and more.shape[0] == 5
    assert json.loads((folder / "prior.json").read_text())["count"] == 5
    prior_images(base_run, 1, 2, folder, seed=7)  # another condition: drawn again
    assert (folder / "00000.png").stat().st_mtime_ns != stamp
    assert json.loads((folder / "prior.json").read_text())["condition"] == 1
    with pytest.raises(ValueError, match="n >= 1"):
        prior_images(base_run, 2, 0, folder)


class Captioned(torch.utils.data.Dataset):
    texts = ["a sks thing", "a sks thing"]

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return {"image": torch.zeros(1, 8, 8), "text": self.texts[i]}


def test_mixture_balances_flags_and_checks():
    images = torch.ones(5, 1, 8, 8)
    mix = PriorMixture(Captioned(), images, "a thing")
    assert mix.repeat == 3 and len(mix) == 6 + 5
    assert [mix[i]["prior"] for i in range(len(mix))] == [False] * 6 + [True] * 5
    item = mix[7]
    assert item["text"] == "a thing" and item["prior"] and torch.equal(item["image"], images[1])
    assert mix.texts == ["a sks thing"] * 6 + ["a thing"] * 5
    with pytest.raises(ValueError, match="no 'class_label'"):
        PriorMixture(Captioned(), images, 3)
    with pytest.raises(ValueError, match="instance images are"):
        PriorMixture(Captioned(), torch.ones(2, 3, 8, 8), "a thing")


def _db(base, out, *extra, weight=0.5):
    overrides = ["train.max_steps=4", "train.log_every=2", *extra]
    return finetune_config(base, out, rank=2, prior=3, prior_images=6, prior_weight=weight,
                           overrides=overrides)  # fmt: skip


def test_prior_rows_weigh_lambda_and_both_losses_are_logged(base_run, tmp_path):
    cfg = _db(base_run, tmp_path / "db")
    trainer = Trainer.from_config(cfg, dataset=ToyData(4))
    try:
        mb = trainer.loss.draw(trainer.stream.next())
        assert mb.prior is not None and mb.prior.any() and (~mb.prior).any()
        expected_w = torch.where(mb.prior, 0.5, 1.0)
        assert torch.equal(mb.importance, expected_w)
        loss, per_sample = trainer.loss.loss(trainer.model, mb)
        torch.testing.assert_close(loss, (per_sample * expected_w).mean())
    finally:
        trainer.close()
    full = train(cfg, dataset=ToyData(4), progress=False)
    records = [json.loads(x) for x in (tmp_path / "db" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss_prior" in r]
    assert logged and all(r["loss_instance"] > 0 and r["loss_prior"] > 0 for r in logged)
    assert len(list((tmp_path / "db" / "prior").glob("*.png"))) == 6
    rest = train_with_a_cut(_db(base_run, tmp_path / "cut"), 2, ToyData(4))
    assert rest.losses == full.losses[2:]
    a, b = load_checkpoint(tmp_path / "db"), load_checkpoint(tmp_path / "cut")
    assert all(torch.equal(a.ema[k], b.ema[k]) for k in a.ema)


def test_prior_needs_a_base_run():
    with pytest.raises(ValueError, match="needs finetune.base_run"):
        load_config(None, ["finetune.prior_condition=3"])
    with pytest.raises(ValueError, match="a prompt or a class label"):
        load_config(None, ["finetune.base_run=x", "finetune.prior_condition=[1, 2]"])
