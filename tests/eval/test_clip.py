"""CLIP score against the model's own embeddings, with a tiny random CLIP saved locally."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from difflab.eval.clip import CLIPScorer, clip_score  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PROMPTS = ["a cat", "the dog", "red box", "blue sky", "a tree", "green apple"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small CPU ops run 10x faster on one thread when the 2-core test machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_clip(folder, seed: int = 0, flip_image_projection: bool = False):
    """A random 1-layer CLIP (hidden 32) with a letters-only BPE tokenizer, saved to folder."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in LETTERS:
            vocab[c + suffix] = len(vocab)
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor = transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            **small,
        ),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.CLIPModel(config)
    if flip_image_projection:
        with torch.no_grad():
            model.visual_projection.weight.neg_()  # image embeddings -> -image embeddings
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (len(PROMPTS), 3, 24, 24), dtype=torch.uint8, generator=g)


def reference_cosines(model, processor, images, prompts) -> torch.Tensor:
    """cos(image, text) from CLIPModel's own forward (its normalised image/text embeds)."""
    inputs = processor(
        text=prompts,
        images=list(images.permute(0, 2, 3, 1).numpy()),
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        out = model(**inputs)
    return (out.image_embeds * out.text_embeds).sum(-1)


def test_clip_score_equals_100_cos_from_model_embeddings(tmp_path, images):
    model, processor = tiny_clip(tmp_path / "clip")
    cos = reference_cosines(model.eval(), processor, images, PROMPTS)
    scorer = CLIPScorer(tmp_path / "clip", scale=2.5)
    got = scorer.scores(images, PROMPTS)
    torch.testing.assert_close(got, 2.5 * (100 * cos).clamp(min=0), atol=1e-4, rtol=1e-5)
    res = scorer(images, PROMPTS, batch_size=4)
    assert res["model"] == str(tmp_path / "clip") and res["scale"] == 2.5 and res["n"] == 6
    assert res["clip_score[clip:clip]"] == pytest.approx(got.double().mean().item(), rel=1e-6)


def test_clip_score_clips_negative_cosines_at_zero(tmp_path, images):
    # Negating the image projection flips the sign of every cosine: for each pair exactly one
    # of the two models scores 0 and the other 100 * |cos|.
    model, processor = tiny_clip(tmp_path / "a", seed=1)
    tiny_clip(tmp_path / "b", seed=1, flip_image_projection=True)
    cos = reference_cosines(model.eval(), processor, images, PROMPTS)
    assert (cos > 0).any() and (cos < 0).any()
    a = CLIPScorer(tmp_path / "a").scores(images, PROMPTS)
    b = CLIPScorer(tmp_path / "b").scores(images, PROMPTS)
    assert torch.all((a == 0) | (b == 0))
    torch.testing.assert_close(a + b, 100 * cos.abs(), atol=1e-4, rtol=1e-5)


def test_clip_score_float_images_quantised_and_folder_required(tmp_path, images):
    tiny_clip(tmp_path / "clip")
    as_float = images.float() / 127.5 - 1.0
    r_uint8 = clip_score(images, PROMPTS, tmp_path / "clip")
    r_float = clip_score(as_float, PROMPTS, tmp_path / "clip")
    assert r_uint8 == r_float
    with pytest.raises(FileNotFoundError, match="local_files_only"):
        CLIPScorer(tmp_path / "missing")
    with pytest.raises(ValueError, match="6 images but 2 prompts"):
        clip_score(images, PROMPTS[:2], tmp_path / "clip")
