"""Text-conditional training: the encoder trains with the U-Net on the captions, resumes bit
for bit, and a run samples from prompts through Pipeline and the CLI."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from train_helpers import (  # noqa: F401
    one_thread,
    tiny_config,
    train_with_a_cut,
    write_captioned_images,
)

import difflab as dl
from difflab.cli import main as cli_main
from difflab.data import digits_caption, digits_tensor
from difflab.images import read_png_params
from difflab.models import TextConditionedUNet, WordTokenizer
from difflab.samplers import sample
from difflab.train import Trainer, load_checkpoint, load_config, train

TEXT = [
    "model.num_classes=null",
    "text.encoder=transformer",
    "text.width=16",
    "text.heads=2",
    "text.layers=1",
    "text.max_length=8",
    "data.source=digits",
    "train.max_steps=4",
]


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_config_checks():
    with pytest.raises(ValueError, match="has none; use data.source digits, shapes or captions"):
        load_config(None, ["text.encoder=transformer", "data.source=folder", "data.path=x"])
    with pytest.raises(ValueError, match="contradicts the text encoder.s width 16"):
        load_config(None, [*TEXT, "model.context_dim=8"]).model_config()
    with pytest.raises(ValueError, match="needs captions with class labels .* captions only"):
        load_config(None, [*TEXT, "data.source=captions", "data.path=x", "train.eval_every=5"])
    cfg = load_config(None, TEXT)
    assert cfg.model_config().context_dim == 16 and cfg.resolve().model["context_dim"] == 16


def test_context_dim_without_text_encoder_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, "model.context_dim=8", "data.source=digits", "model.num_classes=10")
    with pytest.raises(ValueError, match="set text.encoder: transformer"):
        Trainer.from_config(cfg)


def test_captioned_data_without_a_text_encoder_warns_that_captions_go_unused(tmp_path):
    folder = write_captioned_images(tmp_path / "data", ["a tall bar", "a small ring"] * 4)
    data = ["data.source=captions", f"data.path={folder}", "data.image_size=8",
            "train.batch_size=4"]  # fmt: skip
    cfg = tiny_config(tmp_path / "run", *data, "model.num_classes=null")
    with pytest.warns(UserWarning, match="captions are read and do not condition the model"):
        Trainer.from_config(cfg).close()
    text = tiny_config(tmp_path / "run2", *TEXT, *data)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*do not condition the model")
        Trainer.from_config(text).close()  # a text run uses them: no warning


def test_caption_dropout_uses_the_empty_prompt(tmp_path):
    cfg = tiny_config(tmp_path, *TEXT, "diffusion.cond_drop_prob=1.0")
    trainer = Trainer.from_config(cfg)
    try:
        mb = trainer.loss.draw(trainer.stream.next())
        assert mb.cond["input_ids"][:, 0].eq(2).all()  # <bos> ...
        assert not mb.cond["input_ids"][:, 1:].any()  # ... and nothing else
    finally:
        trainer.close()
    trainer = Trainer.from_config(
        tiny_config(tmp_path / "keep", *TEXT, "diffusion.cond_drop_prob=0")
    )
    try:
        batch = trainer.stream.next()
        ids = trainer.loss.draw(batch).cond["input_ids"]
        assert torch.equal(ids, trainer.conditioning.tokenizer.encode(list(batch["text"]))[0])
    finally:
        trainer.close()


def test_text_run_resumes_bit_for_bit_and_trains_the_encoder(tmp_path):
    opts = [*TEXT, "train.max_steps=6", "diffusion.cond_drop_prob=0.3"]
    full = train(tiny_config(tmp_path / "full", *opts))
    cfg = tiny_config(tmp_path / "split", *opts)
    rest = train_with_a_cut(cfg, 3)
    assert rest.losses == full.losses[3:]
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "split")
    _same(a.model, b.model)
    _same(a.ema, b.ema)
    assert any(k.startswith("text.") for k in a.model)
    # The encoder learns: its token table moved away from the initialisation.
    fresh = Trainer.from_config(tiny_config(tmp_path / "fresh", *opts))
    try:
        init = fresh.model.text.token.weight.detach()
    finally:
        fresh.close()
    assert not torch.equal(a.model["text.token.weight"], init)
    saved = json.loads((tmp_path / "full" / "tokenizer.json").read_text())
    labels = digits_tensor(8)[1].tolist()
    count = {digits_caption(k).split()[-1]: labels.count(k) for k in range(10)}
    by_frequency = sorted(count, key=lambda w: (-count[w], w))  # 3 (183), 1 and 5 (182), ...
    assert saved["vocab"] == ["<pad>", "<unk>", "<bos>", "a", "digit", "handwritten", *by_frequency]


def test_resume_with_other_captions_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, *TEXT, "train.max_steps=1")
    train(cfg)
    path = tmp_path / "tokenizer.json"
    data = json.loads(path.read_text())
    data["vocab"][-1] = "zebra"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="vocabulary differs"):
        train(tiny_config(tmp_path, *TEXT, "train.max_steps=2"), resume=True)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("textrun")
    torch.set_num_threads(1)
    train(tiny_config(run, *TEXT, "train.max_steps=3", "train.sample_every=3"), progress=False)
    return run


def test_pipeline_prompts_equal_sampling_with_the_encoded_context(text_run, monkeypatch):
    pipe = dl.Pipeline.from_run(text_run)
    assert isinstance(pipe.model, TextConditionedUNet)
    prompts = ["a handwritten digit seven", "a handwritten digit two"]
    images = pipe(n=2, prompt=prompts, sampler="ddim", steps=4, guidance_scale=2.0, seed=3,
                  clip_x0=False)  # fmt: skip

    tokenizer = WordTokenizer.load(text_run / "tokenizer.json")
    model = pipe.model
    with torch.no_grad():
        ctx, mask = model.encode(*tokenizer.encode(prompts))
        empty, empty_mask = model.encode(*tokenizer.encode(["", ""]))
        expected = sample(
            model, (2, 1, 8, 8), schedule=pipe.schedule, sampler="ddim", steps=4,
            guidance_scale=2.0, cond={"context": ctx, "context_mask": mask},
            uncond={"context": empty, "context_mask": empty_mask},
            generator=[torch.Generator().manual_seed(3 + i) for i in range(2)],
            prediction=pipe.prediction, variance=pipe.variance, progress=False,
        )  # fmt: skip
    reference = pipe(n=2, prompt=prompts, sampler="ddim", steps=4, guidance_scale=2.0, seed=3,
                     clip_x0=False)  # fmt: skip
    assert torch.equal(images, reference)
    torch.testing.assert_close(images, expected.clamp(-1, 1), rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match="never seen in the training captions: zebra"):
        pipe(n=1, prompt="a zebra", steps=2)

    # A negative prompt takes the empty prompt's place on the unconditional side.
    negatives = ["a handwritten digit one", "a handwritten digit eight"]
    with torch.no_grad():
        neg, neg_mask = model.encode(*tokenizer.encode(negatives))
        expected = sample(
            model, (2, 1, 8, 8), schedule=pipe.schedule, sampler="ddim", steps=4,
            guidance_scale=2.0, cond={"context": ctx, "context_mask": mask},
            uncond={"context": neg, "context_mask": neg_mask},
            generator=[torch.Generator().manual_seed(3 + i) for i in range(2)],
            prediction=pipe.prediction, variance=pipe.variance, progress=False,
        )  # fmt: skip
    negative = pipe(n=2, prompt=prompts, negative_prompt=negatives, sampler="ddim", steps=4,
                    guidance_scale=2.0, seed=3, clip_x0=False)  # fmt: skip
    torch.testing.assert_close(negative, expected.clamp(-1, 1), rtol=0, atol=1e-6)
    seen = {}  # the 3-step model's images saturate: check what reaches the sampler too

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return sample(*args, **kwargs)

    monkeypatch.setattr("difflab.samplers.sample", spy)
    pipe(n=2, prompt=prompts, negative_prompt=negatives, steps=2, guidance_scale=2.0)
    torch.testing.assert_close(seen["uncond"]["context"], neg)
    torch.testing.assert_close(seen["cond"]["context"], ctx)
    params = pipe.resolve_params(2, prompt=prompts, negative_prompt="a handwritten digit one")
    assert params["negative_prompt"] == "a handwritten digit one"
    with pytest.raises(ValueError, match="negative_prompt must be a string or 2 strings"):
        pipe(n=2, prompt=prompts, negative_prompt=["x"], steps=2)
    with pytest.raises(ValueError, match="negative_prompt needs a prompt"):
        pipe(n=2, negative_prompt="x", steps=2)
    with pytest.raises(ValueError, match="pass prompt="):
        pipe(n=1, steps=2)


def test_cli_sample_prompt_writes_the_prompt_into_the_png(text_run, tmp_path):
    out = tmp_path / "seven.png"
    args = ["sample", str(text_run), "--prompt", "a handwritten digit seven", "--n", "2",
            "--steps", "3", "-o", str(out)]  # fmt: skip
    assert cli_main(args) == 0
    params = read_png_params(out)
    assert params["prompt"] == "a handwritten digit seven" and params["n"] == 2
    grid = text_run / "samples" / "step_000003_ema.png"
    assert read_png_params(grid)["prompts"][:2] == [
        "a handwritten digit zero", "a handwritten digit one",
    ]  # fmt: skip
