"""Textual inversion (Gal et al. 2023): one new word whose embedding alone trains; its file
adds the word to the base run and reproduces the fine-tuned run exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from train_helpers import tiny_config, write_captioned_images  # noqa: E402

import difflab as dl  # noqa: E402
from difflab.cli import main as cli_main  # noqa: E402
from difflab.cli.finetune import finetune_config  # noqa: E402
from difflab.finetune.inversion import EMBEDDING_FILE, add_word  # noqa: E402
from difflab.images import read_png_params  # noqa: E402
from difflab.train import load_config, train  # noqa: E402

TEXT = ["model.num_classes=null", "data.source=digits", "text.encoder=transformer",
        "text.width=16", "text.heads=2", "text.layers=1", "text.max_length=8"]  # fmt: skip


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("text")
    torch.set_num_threads(1)
    train(tiny_config(run, *TEXT, "train.max_steps=3"), progress=False)
    return run


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instance")
    return write_captioned_images(folder, ["a handwritten digit sks"] * 4)


def test_add_word_copies_the_init_row_and_masks_the_gradient(base_run):
    pipe = dl.Pipeline.from_run(base_run)
    model, tokenizer = pipe.model, pipe.text_encoder.tokenizer
    old = model.text.token.weight.detach().clone()
    extended, new_id = add_word(model, tokenizer, "sks", "seven")
    assert extended.vocab == [*tokenizer.vocab, "sks"] and new_id == len(tokenizer)
    table = model.text.token.weight
    assert torch.equal(table[:-1], old) and torch.equal(table[-1], old[tokenizer.index["seven"]])
    ids, mask = extended.encode(["a handwritten digit sks"])
    x = torch.randn(1, 1, 8, 8)
    model(x, torch.tensor([500.0]), input_ids=ids, attention_mask=mask).square().sum().backward()
    grad = table.grad
    assert grad[-1].abs().sum() > 0 and not grad[:-1].any()  # only the new row learns
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["text.token.weight"]
    with pytest.raises(ValueError, match="already in the vocabulary"):
        add_word(model, extended, "sks")
    with pytest.raises(ValueError, match="one lower-case word"):
        add_word(model, extended, "two words")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        add_word(model, extended, "xyz", "zebra")


def test_inversion_run_trains_one_row_and_its_file_reproduces_it(base_run, instance, tmp_path):
    out = tmp_path / "ti"
    data = ["data.source=captions", f"data.path={instance}", "data.image_size=8",
            "train.batch_size=4", "train.max_steps=4", "train.lr=1e-2"]  # fmt: skip
    cfg = finetune_config(base_run, out, targets="none", new_word="sks", init_word="seven",
                          overrides=data)  # fmt: skip
    train(cfg, progress=False)
    base, tuned = load_file(base_run / "ema.safetensors"), load_file(out / "model.safetensors")
    assert tuned.keys() == base.keys()
    for key, value in tuned.items():
        if key == "text.token.weight":
            assert torch.equal(value[:-1], base[key]) and not torch.equal(value[-1], base[key][-1])
        else:
            assert torch.equal(value, base[key]), key
    vocab = json.loads((out / "tokenizer.json").read_text())["vocab"]
    assert vocab[-1] == "sks"

    kw = dict(n=2, prompt="a handwritten digit sks", sampler="ddim", steps=3, seed=1)
    tuned_images = dl.Pipeline.from_run(out)(**kw)
    pipe = dl.Pipeline.from_run(base_run)
    assert pipe.load_embedding(out / EMBEDDING_FILE) == "sks"
    assert torch.equal(pipe(**kw), tuned_images)
    # The few-step samples saturate at ±1; the word's tokens show it is the tuned one.
    prompt = ["a handwritten digit sks"]
    tuned_ctx = dl.Pipeline.from_run(out).text_encoder(prompt)[0]
    assert torch.equal(pipe.text_encoder(prompt)[0], tuned_ctx)
    seven = dl.Pipeline.from_run(base_run).text_encoder(["a handwritten digit seven"])[0]
    assert not torch.equal(seven, tuned_ctx)  # trained away from its init word
    assert pipe.resolve_params(**kw)["embeddings"][0]["word"] == "sks"
    with pytest.raises(ValueError, match="already in the vocabulary"):
        pipe.load_embedding(out / EMBEDDING_FILE)
    from safetensors.torch import save_file

    save_file({"wide": torch.zeros(8)}, str(tmp_path / "w.safetensors"),
              metadata={"format": "difflab-ti/1"})  # fmt: skip
    with pytest.raises(ValueError, match="tokens have width 16"):
        pipe.load_embedding(tmp_path / "w.safetensors")
    save_file({"x": torch.zeros(16)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match="not a difflab embedding"):
        pipe.load_embedding(tmp_path / "lora.safetensors")

    png = tmp_path / "s.png"
    args = ["sample", str(base_run), "--embedding", str(out / EMBEDDING_FILE), "--prompt",
            "a handwritten digit sks", "--n", "1", "--steps", "2", "-o", str(png)]  # fmt: skip
    assert cli_main(args) == 0
    assert read_png_params(png)["embeddings"][0]["word"] == "sks"


def test_inversion_config_checks():
    with pytest.raises(ValueError, match="trains nothing without finetune.new_word"):
        load_config(None, ["finetune.base_run=x", "finetune.targets=none"])
    with pytest.raises(ValueError, match="needs finetune.base_run"):
        load_config(None, ["finetune.new_word=sks"])
