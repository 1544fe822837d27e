"""LoRA fine-tuning runs: only the adapters train, the adapter file reproduces the run,
scale 0 is the base model, resume is exact, and the CLI writes and applies adapters."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from train_helpers import ToyData, tiny_config, train_with_a_cut  # noqa: E402

import difflab as dl  # noqa: E402
from difflab.cli import main as cli_main  # noqa: E402
from difflab.cli.finetune import finetune_config  # noqa: E402
from difflab.finetune import LORA_FILE  # noqa: E402
from difflab.images import read_png_params  # noqa: E402
from difflab.train import Trainer, load_checkpoint, train  # noqa: E402

FT = ["train.max_steps=4", "train.log_every=1", "train.lr=1e-2"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("base")
    torch.set_num_threads(1)
    cfg = tiny_config(run, "train.max_steps=3", "model.num_classes=10")  # digits' classes
    train(cfg, dataset=ToyData(), progress=False)
    return run


def _finetune(base, out, *extra, targets="attention+conv", dora=False):
    return finetune_config(base, out, rank=2, targets=targets, dora=dora, overrides=[*FT, *extra])


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_only_adapters_train_and_the_file_reproduces_the_run(base_run, tmp_path, dora):
    out = tmp_path / "ft"
    train(_finetune(base_run, out, dora=dora), dataset=ToyData(seed=1), progress=False)
    base = load_file(base_run / "ema.safetensors")
    tuned = load_file(out / "model.safetensors")
    adapters = {k for k in tuned if ".lora_" in k}
    assert adapters
    for key, value in tuned.items():  # every base weight is untouched
        if key not in adapters:
            assert torch.equal(value, base[key.replace(".base.", ".")]), key
    assert any(tuned[k].any() for k in adapters if "lora_up" in k)  # the adapters moved
    assert any(k.endswith("lora_magnitude") for k in adapters) == dora

    lora = load_file(out / LORA_FILE)
    ema = load_file(out / "ema.safetensors")
    assert lora.keys() == {k for k in ema if ".lora_" in k}
    assert all(torch.equal(lora[k], ema[k]) for k in lora)

    # Samples of these few-step, high-lr runs sit at ±1 almost everywhere (99.5% of pixels),
    # so they are compared on top of the network's prediction, which they cannot hide.
    kw = dict(n=3, class_labels=[0, 1, 2], sampler="ddim", steps=3, seed=4)
    tuned_pipe = dl.Pipeline.from_run(out)
    tuned_images, tuned_pred = tuned_pipe(**kw), _prediction(tuned_pipe)
    pipe = dl.Pipeline.from_run(base_run)
    base_images, base_pred = pipe(**kw), _prediction(pipe)
    report = pipe.load_lora(out / LORA_FILE)
    assert len(report.applied) == len(lora) // (3 if dora else 2)  # down, up (, magnitude)
    assert torch.equal(pipe(**kw), tuned_images)
    assert torch.equal(_prediction(pipe), tuned_pred)
    assert (tuned_pred - base_pred).abs().mean() > 1e-2 * base_pred.abs().mean()
    zero = dl.Pipeline.from_run(base_run)
    zero.load_lora(out / LORA_FILE, scale=0.0)
    assert torch.equal(zero(**kw), base_images)
    assert torch.equal(_prediction(zero), base_pred)
    assert zero.resolve_params(**kw)["lora"][0]["scale"] == 0.0


def _prediction(pipe: dl.Pipeline) -> torch.Tensor:
    """The network's output at a fixed noisy input, t and classes."""
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return pipe.model(x, torch.tensor([100.0, 500.0, 900.0]), class_labels=torch.arange(3))


def test_finetune_resumes_bit_for_bit(base_run, tmp_path):
    full = train(_finetune(base_run, tmp_path / "full"), dataset=ToyData(seed=1))
    cfg = _finetune(base_run, tmp_path / "split")
    rest = train_with_a_cut(cfg, 2, ToyData(seed=1))
    assert rest.losses == full.losses[2:]
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "split")
    for k in a.ema:
        assert torch.equal(a.ema[k], b.ema[k]), k
    la, lb = load_file(tmp_path / "full" / LORA_FILE), load_file(tmp_path / "split" / LORA_FILE)
    assert all(torch.equal(la[k], lb[k]) for k in la)


def test_a_base_of_another_architecture_is_refused(base_run, tmp_path):
    cfg = _finetune(base_run, tmp_path / "bad", "model.model_channels=32", "model.norm_groups=8")
    with pytest.raises(ValueError, match="another architecture"):
        Trainer.from_config(cfg, dataset=ToyData())


def test_labels_beyond_the_models_classes_are_refused(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=1", "model.num_classes=3")  # ToyData has 4
    with pytest.raises(ValueError, match="class label 3, but the model has model.num_classes=3"):
        train(cfg, dataset=ToyData())


def test_cli_finetune_then_sample_with_the_adapter(base_run, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["finetune", str(base_run), "--out", str(out), "--rank", "2", "--steps", "2",
            "--targets", "*.conv1,*.conv2", "--set", "data.source=digits"]  # fmt: skip
    assert cli_main(args) == 0
    assert "lora.safetensors" in capsys.readouterr().out  # the adapter is named
    png = tmp_path / "s.png"
    args = ["sample", str(base_run), "--lora", str(out / LORA_FILE), "--lora-scale", "0.5",
            "--class", "1", "--n", "2", "--steps", "2", "-o", str(png)]  # fmt: skip
    assert cli_main(args) == 0
    lora = read_png_params(png)["lora"]
    assert lora == [{"path": str(out / LORA_FILE), "scale": 0.5, "layers": lora[0]["layers"]}]
    assert lora[0]["layers"] > 0
    assert cli_main(["sample", str(base_run), "--lora", str(tmp_path / "none.safetensors")]) != 0
    assert "none.safetensors' does not exist" in capsys.readouterr().err
