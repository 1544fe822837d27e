"""A frozen pretrained CLIP text encoder (Stable Diffusion-style conditioning), with a tiny
random CLIP text model and a letters-only tokenizer saved to a local folder."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import (  # noqa: F401
    one_thread,
    save_tiny_clip,
    tiny_config,
    train_with_a_cut,
    write_captioned_images,
)

transformers = pytest.importorskip("transformers")

import difflab as dl  # noqa: E402
from difflab.models import TextConfig  # noqa: E402
from difflab.models.text import PretrainedTextEncoder  # noqa: E402
from difflab.samplers import sample  # noqa: E402
from difflab.train import load_checkpoint, load_config, train  # noqa: E402

PROMPTS = ["a handwritten digit seven", "a handwritten digit one", ""]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def clip_opts(folder):
    return [
        "model.num_classes=null",
        "data.source=digits",
        "text.encoder=clip",
        f"text.path={folder}",
        "text.max_length=32",
        "train.max_steps=4",
    ]


def test_encoder_equals_the_clip_text_models_own_output(clip_dir):
    enc = PretrainedTextEncoder(clip_dir, max_length=32)
    context, mask = enc(PROMPTS)
    tok = transformers.CLIPTokenizer.from_pretrained(clip_dir)
    ref_model = transformers.CLIPTextModel.from_pretrained(clip_dir).eval()
    batch = tok(PROMPTS, padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        ref = ref_model(**batch).last_hidden_state
    assert torch.equal(mask, batch["attention_mask"].bool())
    torch.testing.assert_close(context, ref, rtol=0, atol=0)
    assert context.shape == (3, 32, 24) and enc.width == 24
    assert mask[2].sum() == 2  # the empty prompt: start and end tokens
    assert not any(p.requires_grad for p in enc.model.parameters())
    with pytest.warns(UserWarning, match="only the first 32 are used"):
        enc(["a handwritten digit seven and one more"])


def test_unmasked_encoder_is_stable_diffusions_clip_call(clip_dir):
    """mask_padding=False: the CLIP model runs without an attention mask, as diffusers'
    StableDiffusionPipeline.encode_prompt calls it, and every token is kept for the U-Net."""
    enc = PretrainedTextEncoder(clip_dir, max_length=32, mask_padding=False)
    context, mask = enc(PROMPTS)
    tok = transformers.CLIPTokenizer.from_pretrained(clip_dir)
    ref_model = transformers.CLIPTextModel.from_pretrained(clip_dir).eval()
    ids = tok(PROMPTS, padding="max_length", max_length=32, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = ref_model(ids).last_hidden_state
    assert mask.all()
    torch.testing.assert_close(context, ref, rtol=0, atol=0)
    masked, _ = PretrainedTextEncoder(clip_dir, max_length=32)(PROMPTS)
    torch.testing.assert_close(masked[:, :2], context[:, :2])  # causal: the prefix agrees


def test_config_takes_the_width_from_the_folder(clip_dir, tmp_path):
    cfg = load_config(None, clip_opts(clip_dir))
    assert cfg.model_config().context_dim == 24
    assert TextConfig(encoder="clip", path=str(clip_dir)).context_dim == 24
    with pytest.raises(ValueError, match="needs text.path"):
        TextConfig(encoder="clip")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TextConfig(encoder="clip", path=str(tmp_path))


def test_clip_run_resumes_bit_for_bit_and_keeps_clip_out_of_the_checkpoint(clip_dir, tmp_path):
    opts = [*clip_opts(clip_dir), "train.max_steps=4", "diffusion.cond_drop_prob=0.5"]
    full = train(tiny_config(tmp_path / "full", *opts))
    cfg = tiny_config(tmp_path / "split", *opts)
    rest = train_with_a_cut(cfg, 2)
    assert rest.losses == full.losses[2:]
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "split")
    for k in a.ema:
        assert torch.equal(a.ema[k], b.ema[k]), k
    weights = load_file(tmp_path / "full" / "model.safetensors")
    assert not any(k.startswith(("text.", "text_model.")) for k in weights)  # frozen CLIP
    assert any("cross_attn.to_kv" in k for k in weights)  # the U-Net attends to its tokens


def test_pipeline_encodes_prompts_with_the_runs_clip(clip_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, *clip_opts(clip_dir), "train.max_steps=2"), progress=False)
    pipe = dl.Pipeline.from_run(run)
    prompts = PROMPTS[:2]
    kw = dict(sampler="ddim", steps=3, guidance_scale=2.0, seed=1, clip_x0=False)
    images = pipe(n=2, prompt=prompts, **kw)
    enc = PretrainedTextEncoder(clip_dir, max_length=32)
    (ctx, mask), (empty, empty_mask) = enc(prompts), enc(["", ""])
    with torch.no_grad():
        expected = sample(
            pipe.model, (2, 1, 8, 8), schedule=pipe.schedule, sampler="ddim", steps=3,
            guidance_scale=2.0, cond={"context": ctx, "context_mask": mask},
            uncond={"context": empty, "context_mask": empty_mask},
            generator=[torch.Generator().manual_seed(1 + i) for i in range(2)],
            prediction=pipe.prediction, variance=pipe.variance, progress=False,
        )  # fmt: skip
    torch.testing.assert_close(images, expected.clamp(-1, 1), rtol=0, atol=1e-6)
    # The few-step net's samples saturate at ±1, so the images alone would not show the
    # prompt: the network's prediction does differ between the two prompts' tokens.
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([500.0])
    with torch.no_grad():
        eps = [pipe.model(x, t, context=ctx[i : i + 1], context_mask=mask[i : i + 1])
               for i in range(2)]  # fmt: skip
    assert not torch.allclose(eps[0], eps[1])


def test_cached_caption_tokens_train_like_the_encoder(clip_dir, tmp_path):
    """``train.encoder_cache``: each caption (and the empty null caption) is encoded once;
    a second run reads them all from disk; both train as the uncached run (to rounding)."""
    from difflab.train import Trainer

    opts = [*clip_opts(clip_dir), "train.max_steps=4", "diffusion.cond_drop_prob=0.5"]
    plain = train(tiny_config(tmp_path / "plain", *opts))
    runs = []
    for name in ("cold", "warm"):
        trainer = Trainer.from_config(tiny_config(tmp_path / name, *opts,
                                      f"train.encoder_cache={tmp_path / 'cache'}"))  # fmt: skip
        try:
            runs.append((trainer.run(), trainer.conditioning.text_cache))
        finally:
            trainer.close()
    (cold, cold_cache), (warm, warm_cache) = runs
    assert 0 < cold_cache.computed <= 11  # ten captions and "" at most
    assert warm_cache.computed == 0 and warm_cache.hits > 0
    assert cold.losses == warm.losses
    assert cold.losses == pytest.approx(plain.losses, rel=1e-5)


def test_textual_inversion_through_the_frozen_clip(clip_dir, tmp_path):
    """A new word for a frozen-CLIP run: only its vector (the U-Net's ``ti_word``) trains,
    through CLIP; the embedding file added to the base run reproduces the fine-tuned run."""
    from difflab.cli.finetune import finetune_config
    from difflab.finetune.inversion import EMBEDDING_FILE

    base = tmp_path / "base"
    train(tiny_config(base, *clip_opts(clip_dir), "train.max_steps=2"), progress=False)
    folder = write_captioned_images(tmp_path / "instance", ["a handwritten digit sks"] * 4)
    out = tmp_path / "ti"
    data = ["data.source=captions", f"data.path={folder}", "data.image_size=8",
            "train.batch_size=4", "train.max_steps=4", "train.lr=1e-2"]  # fmt: skip
    cfg = finetune_config(base, out, targets="none", new_word="sks", init_word="a",
                          overrides=data)  # fmt: skip
    train(cfg, progress=False)

    enc = PretrainedTextEncoder(clip_dir, max_length=32)
    init = enc.word_embedding("a")
    frozen, tuned = load_file(base / "ema.safetensors"), load_file(out / "model.safetensors")
    assert tuned.keys() == {*frozen, "ti_word"}
    assert all(torch.equal(tuned[k], frozen[k]) for k in frozen)  # the U-Net is frozen
    assert not torch.equal(tuned["ti_word"], init)  # the word learned, from "a"'s embedding
    # Its tokens are CLIP's with the vector in place of the word's token embedding.
    enc.add_word("sks", tuned["ti_word"])
    ctx, _ = enc(["a handwritten digit sks"])
    ref, _ = PretrainedTextEncoder(clip_dir, max_length=32)(["a handwritten digit a"])
    assert not torch.equal(ctx, ref) and torch.equal(ctx[0, 0], ref[0, 0])  # causal: BOS same

    kw = dict(n=2, prompt="a handwritten digit sks", sampler="ddim", steps=3, seed=1)
    tuned_images = dl.Pipeline.from_run(out)(**kw)
    pipe = dl.Pipeline.from_run(base)
    assert pipe.load_embedding(out / EMBEDDING_FILE) == "sks"
    torch.testing.assert_close(pipe(**kw), tuned_images, rtol=0, atol=0)
    # (Saturated few-step images; the tokens show the word is there.)
    prompt = ["a handwritten digit sks"]
    tuned_ctx = dl.Pipeline.from_run(out).text_encoder(prompt)[0]
    assert torch.equal(pipe.text_encoder(prompt)[0], tuned_ctx)
    assert not torch.equal(dl.Pipeline.from_run(base).text_encoder(prompt)[0], tuned_ctx)
    with pytest.raises(ValueError, match="must be one word this tokenizer does not have"):
        pipe.load_embedding(out / EMBEDDING_FILE)
    with pytest.raises(ValueError, match="is 5 tokens for this tokenizer"):
        enc.word_embedding("seven")


def test_an_added_word_with_a_known_words_vector_encodes_as_that_word(clip_dir):
    enc = PretrainedTextEncoder(clip_dir, max_length=32)
    enc.add_word("sks", enc.word_embedding("a"))
    (with_sks, _), (with_a, _) = enc(["a handwritten digit sks"]), enc(["a handwritten digit a"])
    assert torch.equal(with_sks, with_a)
