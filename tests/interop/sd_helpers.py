"""Tiny Stable Diffusion 1.x / 2.x / XL pipelines built locally (no downloads), for tests
that compare difflab with diffusers side by side.

Every builder is deterministic from its ``seed`` and leaves the global RNG as it found it.
The CLIP tokenizer is a real byte-level BPE tokenizer over a tiny vocabulary: the printable
ASCII characters (alone and word-final), whole-word merges for :data:`WORDS` and the two
CLIP special tokens at the end (so the end token has the highest id, as in OpenAI's CLIP).
Words outside :data:`WORDS` split into characters, which makes long prompts easy to write.

    pipe = tiny_sd1_pipeline(seed=0)         # StableDiffusionPipeline, context 32
    pipe = tiny_sd2_pipeline(seed=0)         # pad token "!", GELU encoder, v-prediction
    pipe = tiny_sdxl_pipeline(seed=0)        # two encoders: context 64, pooled 32
    pipe.save_pretrained(tmp_path / "sd")    # a diffusers folder for loaders
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORDS = (
    "a", "an", "the", "of", "in", "and", "with", "photo", "painting", "cat", "dog", "red",
    "blue", "house", "tree", "style", "blurry", "ugly", "low", "quality", "portrait", "sky",
)  # fmt: skip
TEXT_WIDTH = 32  # hidden size of every tiny CLIP text model
TEXT_HEADS = 4


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the global RNG seeded to ``seed``, restoring its state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` of the tiny CLIP BPE tokenizer."""
    chars = [chr(c) for c in range(33, 127)]  # byte-level BPE maps these bytes to themselves
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: ((p h) o) t o</w>
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            if pieces[0] not in tokens:
                tokens.append(pieces[0])
    merges = list(dict.fromkeys(merges))
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def tiny_clip_tokenizer(*, pad_token: str = EOS) -> transformers.CLIPTokenizer:
    """A CLIP tokenizer reading 77 tokens; ``pad_token="!"`` is SD 2.x's / SDXL's second one."""
    vocab, merges = tiny_clip_vocab()
    return transformers.CLIPTokenizer(
        vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77
    )


def tiny_clip_text_model(
    seed: int,
    *,
    layers: int = 3,
    projection: bool = False,
    hidden_act: str = "quick_gelu",
    width: int = TEXT_WIDTH,
    heads: int = TEXT_HEADS,
) -> transformers.CLIPTextModel | transformers.CLIPTextModelWithProjection:
    """A random CLIP text model over :func:`tiny_clip_vocab` with 77 positions (with a
    ``width``-wide text projection when ``projection``, as SDXL's second encoder)."""
    vocab, _ = tiny_clip_vocab()
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width + 5,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
        hidden_act=hidden_act, projection_dim=width, bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
    )  # fmt: skip
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    with seeded(seed):
        model = cls(config)
        # Random layer-norm affines, so a missing final LayerNorm cannot go unnoticed.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.data.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    if not hasattr(model, "text_model"):
        # diffusers 0.42's clip_skip reads ``text_encoder.text_model.final_layer_norm``,
        # transformers 5's CLIPTextModel has no ``text_model`` level: alias it (a plain
        # attribute, not a submodule) so the reference runs unchanged.
        object.__setattr__(model, "text_model", model)
    return model.eval()


def hf_checkpoint_state(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text model's weights as an original checkpoint stores them under ``prefix``:
    Hugging Face names with the ``text_model.`` level (transformers 4's layout)."""
    return {prefix + _with_text_model(k): v.clone() for k, v in model.state_dict().items()}


def _with_text_model(key: str) -> str:
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


def tiny_unet(seed: int, cross_attention_dim: int, *, sdxl: bool = False) -> UNet2DConditionModel:
    """A two-level conditional U-Net on 4-channel latents (SDXL: ``text_time`` additions)."""
    extra = {}
    if sdxl:  # added condition: 6 time ids of 8 dims each, plus the pooled text embedding
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH,
                     transformer_layers_per_block=(1, 2))  # fmt: skip
    with seeded(seed):
        return UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
            out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=sdxl, cross_attention_dim=cross_attention_dim,
            norm_num_groups=8, **extra,
        ).eval()  # fmt: skip


def tiny_vae(seed: int) -> AutoencoderKL:
    """A two-level KL autoencoder (8x fewer pixels would need four; two keep it tiny)."""
    with seeded(seed):
        return AutoencoderKL(
            block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=4,
        ).eval()  # fmt: skip


def tiny_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """Stable Diffusion's scaled-linear schedule."""
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )  # fmt: skip


def tiny_sd1_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD 1.x: one CLIP text model (quick-GELU, padding with the end token)."""
    return StableDiffusionPipeline(
        unet=tiny_unet(seed, TEXT_WIDTH), vae=tiny_vae(seed + 1),
        text_encoder=tiny_clip_text_model(seed + 2), tokenizer=tiny_clip_tokenizer(),
        scheduler=tiny_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip


def tiny_sd2_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD 2.x in diffusers' layout: an OpenCLIP-style encoder (GELU) already cut to the
    penultimate layer, padding with ``!``, v-prediction."""
    return StableDiffusionPipeline(
        unet=tiny_unet(seed, TEXT_WIDTH), vae=tiny_vae(seed + 1),
        text_encoder=tiny_clip_text_model(seed + 2, hidden_act="gelu"),
        tokenizer=tiny_clip_tokenizer(pad_token="!"),
        scheduler=tiny_scheduler("v_prediction"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip


def tiny_sdxl_pipeline(
    seed: int = 0, *, force_zeros_for_empty_prompt: bool = True
) -> StableDiffusionXLPipeline:
    """SDXL: CLIP-L-style (quick-GELU) plus OpenCLIP-bigG-style (GELU, projection, ``!``
    padding) encoders, contexts concatenated to 64 wide, pooled 32 wide."""
    return StableDiffusionXLPipeline(
        unet=tiny_unet(seed, 2 * TEXT_WIDTH, sdxl=True), vae=tiny_vae(seed + 1),
        text_encoder=tiny_clip_text_model(seed + 2), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_model(seed + 3, projection=True, hidden_act="gelu",
                                            layers=4),
        tokenizer_2=tiny_clip_tokenizer(pad_token="!"), scheduler=tiny_scheduler(),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )  # fmt: skip


def open_clip_state(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIP text model's weights in OpenCLIP's layout under ``prefix``, as an
    original SD 2.x / SDXL checkpoint stores them (a test-side writer, the inverse of the
    reader under test): fused ``in_proj`` rows ``[q; k; v]``, ``text_projection [D, P]``."""
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}  # fmt: skip
    hf = {_with_text_model(k): v for k, v in model.state_dict().items()}
    out = {
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        "logit_scale": torch.tensor(4.6052),
    }
    if "text_projection.weight" in hf:
        out["text_projection"] = hf["text_projection.weight"].T.contiguous()
    for i in range(model.config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [hf[f"{src}self_attn.{q}_proj.{kind}"] for q in "qkv"]
            )
            for hf_name, oc_name in names.items():
                out[f"{dst}{oc_name}.{kind}"] = hf[f"{src}{hf_name}.{kind}"]
    return {prefix + k: v.clone() for k, v in out.items()}
