"""Stable Diffusion's prompt encoders against diffusers' ``encode_prompt`` on tiny SD 1.x /
2.x / XL pipelines: diffusers folders, original single-file checkpoints (OpenCLIP layout
converted as diffusers converts it), clip skip, truncation and textual inversion."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file
from sd_helpers import (
    TEXT_HEADS,
    hf_checkpoint_state,
    open_clip_state,
    seeded,
    tiny_clip_text_model,
    tiny_sd1_pipeline,
    tiny_sd2_pipeline,
    tiny_sdxl_pipeline,
)

from difflab.interop.text import (
    SDTextEncoder,
    clip_text_config,
    load_embedding,
    open_clip_to_hf,
)

PROMPTS = ["a photo of a cat", "a red house in the style of a painting, blurry sky"]
NEGATIVES = ["blurry, ugly", "low quality"]
SD_BUILDERS = {"sd1": tiny_sd1_pipeline, "sd2": tiny_sd2_pipeline}


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each family's tiny pipeline and its saved diffusers folder."""
    out = {}
    for family, build in [*SD_BUILDERS.items(), ("sdxl", tiny_sdxl_pipeline)]:
        pipe = build(0)
        folder = tmp_path_factory.mktemp(family)
        pipe.save_pretrained(folder)
        out[family] = pipe, folder
    return out


def sd_reference(pipe, prompts, negatives=None, clip_skip=None):
    return pipe.encode_prompt(prompts, "cpu", 1, True, negatives, clip_skip=clip_skip)


def sdxl_reference(pipe, prompts, negatives=None, clip_skip=None, **kw):
    return pipe.encode_prompt(
        prompts, device="cpu", negative_prompt=negatives, clip_skip=clip_skip, **kw
    )


# -- diffusers folders --------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("clip_skip", [None, 1, 2])
def test_sd_prompts_and_negatives_match_diffusers(folders, family, clip_skip):
    pipe, folder = folders[family]
    enc = SDTextEncoder.from_diffusers(folder, family)
    context, uncond = sd_reference(pipe, PROMPTS, NEGATIVES, clip_skip)
    assert close(enc(PROMPTS, clip_skip=clip_skip)["context"], context)
    assert close(enc.uncond(2, NEGATIVES)["context"], uncond)  # diffusers: no clip skip here
    _, empty = sd_reference(pipe, PROMPTS)
    assert close(enc.uncond(2)["context"], empty)
    assert set(enc(PROMPTS)) == {"context"} and enc.width == 32 and enc.pooled_width is None


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_sdxl_prompts_negatives_and_pooled_match_diffusers(folders, clip_skip):
    pipe, folder = folders["sdxl"]
    enc = SDTextEncoder.from_diffusers(folder, "sdxl")
    assert enc.force_zeros_for_empty_prompt  # read from model_index.json
    ctx, neg, pooled, neg_pooled = sdxl_reference(pipe, PROMPTS, NEGATIVES, clip_skip)
    ours, theirs = enc(PROMPTS, clip_skip=clip_skip), enc.uncond(2, NEGATIVES)
    assert close(ours["context"], ctx) and close(ours["pooled"], pooled)
    assert close(theirs["context"], neg) and close(theirs["pooled"], neg_pooled)
    assert ctx.shape == (2, 77, 64) and pooled.shape == (2, 32)


def test_sdxl_second_prompts_and_forced_zeros_match_diffusers(folders):
    pipe, folder = folders["sdxl"]
    enc = SDTextEncoder.from_diffusers(folder, "sdxl")
    second, neg2 = ["a dog", "a tree"], ["ugly", "blurry"]
    ctx, neg, pooled, neg_pooled = sdxl_reference(
        pipe, PROMPTS, NEGATIVES, prompt_2=second, negative_prompt_2=neg2
    )
    ours, theirs = enc(PROMPTS, prompts_2=second), enc.uncond(2, NEGATIVES, negative_prompts_2=neg2)
    assert close(ours["context"], ctx) and close(ours["pooled"], pooled)
    assert close(theirs["context"], neg) and close(theirs["pooled"], neg_pooled)
    _, zeros, _, zeros_pooled = sdxl_reference(pipe, PROMPTS)
    assert close(enc.uncond(2)["context"], zeros) and close(enc.uncond(2)["pooled"], zeros_pooled)
    assert not zeros.any()
    # With the flag off, "no negative prompt" encodes the empty prompt, as diffusers does.
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        _, empty, _, empty_pooled = sdxl_reference(pipe, PROMPTS)
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)
    enc.force_zeros_for_empty_prompt = False
    assert close(enc.uncond(2)["context"], empty) and close(enc.uncond(2)["pooled"], empty_pooled)


def test_long_prompts_are_truncated_like_diffusers_with_a_warning(folders):
    pipe, folder = folders["sd1"]
    enc = SDTextEncoder.from_diffusers(folder, "sd1")
    long = ["a " * 100 + "cat", "a dog"]  # 101 words + start + end = 103 tokens
    with pytest.warns(UserWarning, match="103 tokens.*last 26 tokens are dropped"):
        ours = enc(long)["context"]
    assert close(ours, sd_reference(pipe, long)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc(["a dog"])  # short prompts are silent


def test_fp16_variant_and_sharded_weights_load(folders, tmp_path):
    pipe, _ = folders["sd1"]
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16/text_encoder/model.fp16.safetensors").is_file()
    pipe.save_pretrained(tmp_path / "sharded")
    (tmp_path / "sharded/text_encoder/model.safetensors").unlink()
    pipe.text_encoder.save_pretrained(tmp_path / "sharded/text_encoder", max_shard_size="20KB")
    assert (tmp_path / "sharded/text_encoder/model.safetensors.index.json").is_file()
    context = sd_reference(pipe, PROMPTS)[0]
    for name in ("fp16", "sharded"):
        enc = SDTextEncoder.from_diffusers(tmp_path / name, "sd1")
        assert close(enc(PROMPTS)["context"], context)
    half = SDTextEncoder.from_diffusers(tmp_path / "fp16", "sd1", dtype=torch.bfloat16)
    assert half(PROMPTS)["context"].dtype == torch.bfloat16


# -- single-file checkpoints --------------------------------------------------------------


def test_sd1_single_file_matches_diffusers(folders, tmp_path):
    pipe, folder = folders["sd1"]
    state = hf_checkpoint_state(pipe.text_encoder, "cond_stage_model.transformer.")
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)
    state["model.diffusion_model.out.0.weight"] = torch.ones(4)  # other parts are ignored
    pipe.tokenizer.save_pretrained(tmp_path / "tok")  # a plain tokenizer folder works too
    for tokenizer_dir in (folder, tmp_path / "tok"):
        enc = SDTextEncoder.from_single_file(state, "sd1", tokenizer_dir, heads=TEXT_HEADS)
        for clip_skip in (None, 1):
            assert close(
                enc(PROMPTS, clip_skip=clip_skip)["context"],
                sd_reference(pipe, PROMPTS, clip_skip=clip_skip)[0],
            )


def sd2_checkpoint(pipe):
    """SD 2.x's original layout: the full OpenCLIP tower, one layer more than diffusers
    keeps, with its (unused) text projection."""
    full = tiny_clip_text_model(7, layers=4, projection=True, hidden_act="gelu")
    full.text_model.load_state_dict(pipe.text_encoder.state_dict(), strict=False)
    return open_clip_state(full, "cond_stage_model.model.")


def test_sd2_single_file_drops_the_last_layer_and_matches_diffusers(folders):
    pipe, folder = folders["sd2"]
    state = sd2_checkpoint(pipe)
    enc = SDTextEncoder.from_single_file(state, "sd2", folder, heads=TEXT_HEADS)
    assert enc.models[0].config.num_hidden_layers == 3
    ours, neg = enc(PROMPTS, clip_skip=1)["context"], enc.uncond(2, NEGATIVES)["context"]
    context, uncond = sd_reference(pipe, PROMPTS, NEGATIVES, clip_skip=1)
    assert close(ours, context) and close(neg, uncond)


def test_open_clip_conversion_equals_diffusers(folders):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    pipe, _ = folders["sdxl"]
    prefix = "conditioner.embedders.1.model."
    state = open_clip_state(pipe.text_encoder_2, prefix)
    theirs = convert_open_clip_checkpoint(pipe.text_encoder_2, state, prefix=prefix)
    ours = open_clip_to_hf(state, prefix)
    assert ours.keys() == theirs.keys() == pipe.text_encoder_2.state_dict().keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # SD 2: diffusers drops the text projection (and layer 23 of ViT-H's 24).
    state = sd2_checkpoint(folders["sd2"][0])
    theirs = convert_open_clip_checkpoint(pipe.text_encoder, state)
    theirs = {k: v for k, v in theirs.items() if "layers.3." not in k}
    ours = open_clip_to_hf(state, "cond_stage_model.model.", layers=3, projection=False)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_sdxl_single_file_matches_diffusers(folders):
    pipe, folder = folders["sdxl"]
    state = hf_checkpoint_state(
        pipe.text_encoder, "conditioner.embedders.0.transformer."
    ) | open_clip_state(pipe.text_encoder_2, "conditioner.embedders.1.model.")
    enc = SDTextEncoder.from_single_file(state, "sdxl", folder, heads=TEXT_HEADS)
    assert enc.force_zeros_for_empty_prompt
    ctx, neg, pooled, neg_pooled = sdxl_reference(pipe, PROMPTS, NEGATIVES)
    ours, theirs = enc(PROMPTS), enc.uncond(2, NEGATIVES)
    assert close(ours["context"], ctx) and close(ours["pooled"], pooled)
    assert close(theirs["context"], neg) and close(theirs["pooled"], neg_pooled)


def test_configs_are_inferred_from_real_checkpoint_shapes():
    """SD 1's CLIP ViT-L/14 (12 heads) and SD 2's OpenCLIP ViT-H/14 (24 layers, 16 heads),
    shapes only (meta tensors)."""
    meta = {"device": "meta"}
    hf = {
        "text_model.embeddings.token_embedding.weight": torch.empty(49408, 768, **meta),
        "text_model.embeddings.position_embedding.weight": torch.empty(77, 768, **meta),
    }
    for i in range(12):
        hf[f"text_model.encoder.layers.{i}.mlp.fc1.weight"] = torch.empty(3072, 768, **meta)
    c = clip_text_config(hf)
    assert (c.hidden_size, c.num_attention_heads, c.num_hidden_layers) == (768, 12, 12)
    assert (c.vocab_size, c.max_position_embeddings, c.intermediate_size) == (49408, 77, 3072)
    oc = {"cond_stage_model.model.token_embedding.weight": torch.empty(49408, 1024, **meta),
          "cond_stage_model.model.positional_embedding": torch.empty(77, 1024, **meta),
          "cond_stage_model.model.text_projection": torch.empty(1024, 1024, **meta)}  # fmt: skip
    for i in range(24):
        p = f"cond_stage_model.model.transformer.resblocks.{i}."
        oc[p + "attn.in_proj_weight"] = torch.empty(3072, 1024, **meta)
        oc[p + "mlp.c_fc.weight"] = torch.empty(4096, 1024, **meta)
    c = clip_text_config(open_clip_to_hf(oc, "cond_stage_model.model.", layers=23))
    assert (c.hidden_size, c.num_attention_heads, c.num_hidden_layers) == (1024, 16, 23)
    assert c.intermediate_size == 4096


def test_single_file_loading_leaves_the_global_rng_alone(folders):
    pipe, folder = folders["sd1"]
    state = hf_checkpoint_state(pipe.text_encoder, "cond_stage_model.transformer.")
    torch.manual_seed(3)
    SDTextEncoder.from_single_file(state, "sd1", folder, heads=TEXT_HEADS)
    after = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(3))


def test_bad_inputs_are_clear_errors(folders, tmp_path):
    pipe, folder = folders["sd1"]
    state = hf_checkpoint_state(pipe.text_encoder, "cond_stage_model.transformer.")
    with pytest.raises(FileNotFoundError, match="tokenizer folder .*nowhere.* does not exist"):
        SDTextEncoder.from_single_file(state, "sd1", tmp_path / "nowhere", heads=TEXT_HEADS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer in .*empty.*vocab.json"):
        SDTextEncoder.from_single_file(state, "sd1", tmp_path / "empty", heads=TEXT_HEADS)
    with pytest.raises(FileNotFoundError, match="SDXL needs a diffusers folder with tokenizer/"):
        sdxl_pipe, _ = folders["sdxl"]
        xl = hf_checkpoint_state(sdxl_pipe.text_encoder, "conditioner.embedders.0.transformer.")
        xl |= open_clip_state(sdxl_pipe.text_encoder_2, "conditioner.embedders.1.model.")
        SDTextEncoder.from_single_file(xl, "sdxl", folder / "tokenizer", heads=TEXT_HEADS)
    with pytest.raises(ValueError, match="no sdxl text encoder: no key starts with 'conditioner"):
        SDTextEncoder.from_single_file(state, "sdxl", folder, heads=TEXT_HEADS)
    with pytest.raises(ValueError, match="width 32 does not split into 0 heads"):
        SDTextEncoder.from_single_file(state, "sd1", folder / "tokenizer")  # no text config
    with pytest.raises(ValueError, match="unknown family 'sd3'"):
        SDTextEncoder.from_diffusers(folder, "sd3")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="has no text_encoder_2/"):
        SDTextEncoder.from_diffusers(folder, "sdxl")
    enc = SDTextEncoder.from_diffusers(folder, "sd1")
    with pytest.raises(ValueError, match="clip_skip must be between 0 and 3"):
        enc(PROMPTS, clip_skip=4)
    with pytest.raises(ValueError, match="negative_prompts has 1 prompts, expected 2"):
        enc.uncond(2, ["blurry"])


# -- textual inversion --------------------------------------------------------------------


def _vectors(n: int, width: int = 32, seed: int = 5) -> torch.Tensor:
    with seeded(seed):
        return torch.randn(n, width)


TI_PROMPTS = ["a photo of <toy>", "<toy> in the sky, <toy>"]


@pytest.mark.parametrize("layout", ["a1111_safetensors", "a1111_pt", "diffusers"])
def test_embeddings_match_diffusers_load_textual_inversion(tmp_path, layout):
    pipe = tiny_sd1_pipeline(0)
    pipe.save_pretrained(tmp_path / "sd")
    enc = SDTextEncoder.from_diffusers(tmp_path / "sd", "sd1")
    n = 1 if layout == "diffusers" else 3  # multi-vector: <toy>, <toy>_1, <toy>_2
    vectors = _vectors(n)
    if layout == "a1111_safetensors":
        path = tmp_path / "<toy>.safetensors"
        save_file({"emb_params": vectors}, path)
    elif layout == "a1111_pt":
        path = tmp_path / "<toy>.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors},
                    "name": "<toy>", "step": 100}, path)  # fmt: skip
    else:
        path = tmp_path / "learned_embeds.safetensors"
        save_file({"<toy>": vectors[0]}, path)
    assert load_embedding(enc, path) == "<toy>"
    pipe.load_textual_inversion(str(path), token="<toy>")
    context, uncond = sd_reference(pipe, TI_PROMPTS, ["<toy>", "ugly"])
    assert close(enc(TI_PROMPTS)["context"], context)
    assert close(enc.uncond(2, ["<toy>", "ugly"])["context"], uncond)
    plain = sd_reference(tiny_sd1_pipeline(0), TI_PROMPTS)[0]
    assert not close(context, plain)  # the embedding changed the prompts


def test_sdxl_embeddings_match_diffusers(tmp_path):
    pipe = tiny_sdxl_pipeline(0)
    pipe.save_pretrained(tmp_path / "sd")
    enc = SDTextEncoder.from_diffusers(tmp_path / "sd", "sdxl")
    clip_l, clip_g = _vectors(2, seed=1), _vectors(2, seed=2)
    path = tmp_path / "toy.safetensors"
    save_file({"clip_l": clip_l, "clip_g": clip_g}, path)
    assert load_embedding(enc, path, token="<toy>") == "<toy>"
    names = ["<toy>", "<toy>_1"]
    pipe.load_textual_inversion(clip_l, token=names, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)  # fmt: skip
    pipe.load_textual_inversion(clip_g, token=names, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)  # fmt: skip
    ctx, neg, pooled, neg_pooled = sdxl_reference(pipe, TI_PROMPTS, ["<toy>", "ugly"])
    ours, theirs = enc(TI_PROMPTS), enc.uncond(2, ["<toy>", "ugly"])
    assert close(ours["context"], ctx) and close(ours["pooled"], pooled)
    assert close(theirs["context"], neg) and close(theirs["pooled"], neg_pooled)


def test_embedding_errors_name_the_file(folders, tmp_path):
    _, folder = folders["sd1"]
    enc = SDTextEncoder.from_diffusers(folder, "sd1")
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": _vectors(2, width=48)}, wide)
    with pytest.raises(ValueError, match="wide.safetensors: embedding width 48, .*width is 32"):
        load_embedding(enc, wide)
    odd = tmp_path / "odd.safetensors"
    save_file({"a": torch.zeros(32), "b": torch.zeros(32)}, odd)
    with pytest.raises(ValueError, match="odd.safetensors: not a textual-inversion embedding"):
        load_embedding(enc, odd)
    xl = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 32)}, xl)
    with pytest.raises(ValueError, match="xl.safetensors: an SDXL embedding .* encoder is sd1"):
        load_embedding(enc, xl)
    pickled = tmp_path / "code.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "obj": object()}, pickled)
    with pytest.raises(ValueError, match="code.pt: cannot be read with torch.load"):
        load_embedding(enc, pickled)
    ok = tmp_path / "word.safetensors"
    save_file({"emb_params": _vectors(1)}, ok)
    load_embedding(enc, ok)
    with pytest.raises(ValueError, match=r"\['word'\] are already in tokenizer 0"):
        load_embedding(enc, ok)


def test_sdxl_refiner_reads_bigg_alone_like_diffusers(folders, tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    base, _ = folders["sdxl"]
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, tokenizer=None, text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2, unet=base.unet, scheduler=base.scheduler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )  # fmt: skip
    pipe.save_pretrained(tmp_path / "refiner")
    state = open_clip_state(base.text_encoder_2, "conditioner.embedders.0.model.")
    ctx, neg, pooled, neg_pooled = sdxl_reference(pipe, PROMPTS, NEGATIVES)
    assert ctx.shape == (2, 77, 32)
    for enc in (
        SDTextEncoder.from_diffusers(tmp_path / "refiner", "sdxl"),
        SDTextEncoder.from_single_file(state, "sdxl", tmp_path / "refiner", heads=TEXT_HEADS),
    ):
        ours, theirs = enc(PROMPTS), enc.uncond(2, NEGATIVES)
        assert close(ours["context"], ctx) and close(ours["pooled"], pooled)
        assert close(theirs["context"], neg) and close(theirs["pooled"], neg_pooled)


def test_truncation_warning_points_at_the_caller(folders):
    enc = SDTextEncoder.from_diffusers(folders["sd1"][1], "sd1")
    with pytest.warns(UserWarning) as record:
        enc(["a " * 90])
    assert record[0].filename == __file__
