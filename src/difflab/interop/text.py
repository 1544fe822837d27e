"""Stable Diffusion's prompt side: the CLIP text encoders of SD 1.x, SD 2.x and SDXL, read
from a diffusers folder or from an original single-file checkpoint, and textual-inversion
embeddings in A1111's and diffusers' file formats.

:class:`SDTextEncoder` turns prompts into exactly what diffusers'
``StableDiffusionPipeline.encode_prompt`` / ``StableDiffusionXLPipeline.encode_prompt`` give:

- ``sd1`` / ``sd2``: the last hidden state after the final LayerNorm, ``context [B, 77, D]``
  (Rombach et al. 2022 sec. 4.3.2; SD 2.x's OpenCLIP ViT-H is stored cut to its penultimate
  layer, 23 of 24, so "last" is the layer SD 2 was trained on);
- ``sdxl``: the penultimate hidden states of CLIP ViT-L and OpenCLIP ViT-bigG concatenated,
  ``context [B, 77, 768 + 1280]``, and bigG's projected end-token embedding,
  ``pooled [B, 1280]`` (Podell et al. 2023 sec. 2.1). The refiner has bigG alone.

The text models are ``transformers`` CLIP models read from local files only. This module
owns the OpenCLIP -> Hugging Face key conversion and the config inferred from weight shapes;
it knows nothing of U-Nets, VAEs or samplers.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "FAMILIES",
    "SDTextEncoder",
    "clip_text_config",
    "load_embedding",
    "open_clip_to_hf",
]

Family = Literal["sd1", "sd2", "sdxl"]
FAMILIES = ("sd1", "sd2", "sdxl")
# Where each family's text encoder(s) live in an original (CompVis / Stability) checkpoint.
SD1_PREFIX = "cond_stage_model.transformer."  # Hugging Face CLIP layout
SD2_PREFIX = "cond_stage_model.model."  # OpenCLIP layout
SDXL_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."  # OpenCLIP bigG alone
_OPEN_CLIP_IGNORED = ("logit_scale", "attn_mask")  # OpenCLIP keys that carry no text weights
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (choices: {', '.join(FAMILIES)})")
    return family


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - transformers is a test dependency
        raise ImportError(
            "Stable Diffusion's text encoders need transformers: pip install transformers"
        ) from err
    return transformers


class SDTextEncoder:
    """The prompt encoder of Stable Diffusion 1.x / 2.x / XL: one or two (CLIP tokenizer,
    CLIP text model) pairs, frozen, in eval mode.

    :param tokenizers: one CLIP tokenizer per text model (77 tokens each).
    :param models: ``sd1`` / ``sd2``: one ``CLIPTextModel``; ``sdxl``: a ``CLIPTextModel``
        and a ``CLIPTextModelWithProjection`` (the refiner: the latter alone).
    :param family: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
    :param force_zeros_for_empty_prompt: SDXL: the unconditional embedding is zeros when no
        negative prompt is given (diffusers' pipeline config, true for SDXL base).
    """

    def __init__(
        self,
        tokenizers: Sequence[Any],
        models: Sequence[Any],
        family: Family,
        *,
        force_zeros_for_empty_prompt: bool = False,
    ) -> None:
        family = _check_family(family)  # type: ignore[assignment]
        if len(tokenizers) != len(models):
            raise ValueError(f"{len(tokenizers)} tokenizers for {len(models)} text models")
        with_projection = [hasattr(m, "text_projection") for m in models]
        if family == "sdxl":
            if with_projection not in ([False, True], [True]):
                raise ValueError(
                    "sdxl takes a CLIPTextModel and a CLIPTextModelWithProjection (the refiner: "
                    f"the latter alone), got {[type(m).__name__ for m in models]}"
                )
        elif with_projection != [False]:
            raise ValueError(
                f"{family} takes one CLIPTextModel, got {[type(m).__name__ for m in models]}"
            )
        for tok, model in zip(tokenizers, models):
            positions = model.config.max_position_embeddings
            if tok.model_max_length > positions:
                raise ValueError(
                    f"the tokenizer reads {tok.model_max_length} tokens but the text model has "
                    f"{positions} positions"
                )
        self.tokenizers = list(tokenizers)
        self.models: list[Any] = [m.eval().requires_grad_(False) for m in models]
        self.family: Family = family
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        # Textual-inversion words of each tokenizer: name -> number of vectors.
        self.words: list[dict[str, int]] = [{} for _ in models]

    # -- properties ------------------------------------------------------------------------

    @property
    def max_length(self) -> int:
        """Tokens per prompt, start and end tokens included (77)."""
        return int(self.tokenizers[-1].model_max_length)

    @property
    def width(self) -> int:
        """The context width D the U-Net's cross-attention reads (768, 1024, 2048)."""
        return sum(int(m.config.hidden_size) for m in self.models)

    @property
    def pooled_width(self) -> int | None:
        """SDXL's pooled embedding width (1280); ``None`` for SD 1.x / 2.x."""
        last = self.models[-1]
        return int(last.config.projection_dim) if self.family == "sdxl" else None

    @property
    def device(self) -> torch.device:
        return next(self.models[-1].parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.models[-1].parameters()).dtype

    def with_models(self, models: Sequence[Any]) -> SDTextEncoder:
        """This encoder (tokenizers, words, settings) reading other copies of its text
        models, e.g. a network's adapted ones (``finetune.text_encoder``)."""
        if len(models) != len(self.models):
            raise ValueError(f"{len(models)} text models for an encoder of {len(self.models)}")
        other = copy.copy(self)
        other.models = list(models)
        return other

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SDTextEncoder:
        """Move the text models (in place); returns ``self``."""
        for model in self.models:
            model.to(device=device, dtype=dtype)
        return self

    # -- encoding --------------------------------------------------------------------------

    def __call__(
        self,
        prompts: Sequence[str],
        *,
        prompts_2: Sequence[str] | None = None,
        clip_skip: int | None = None,
        grad: bool = False,
    ) -> dict[str, Tensor]:
        """``{"context": [B, 77, D]}`` (SDXL: and ``"pooled": [B, P]``) for ``prompts``.

        :param prompts_2: SDXL: other prompts for the second encoder (default ``prompts``).
        :param clip_skip: diffusers' ``clip_skip``: use the output of the layer ``clip_skip``
            before the last (SD 1.x / 2.x: then the final LayerNorm; SDXL: counted from its
            penultimate layer). A1111's "Clip skip: N" is ``clip_skip=N - 1``.
        :param grad: keep autograd on (adapters on the text models train through it).
        """
        prompts = _prompt_list(prompts, "prompts")
        second = _prompt_list(prompts_2, "prompts_2") if prompts_2 else prompts
        return self._encode(self._per_model(prompts, second), clip_skip, grad=grad)

    def uncond(
        self,
        n: int,
        negative_prompts: str | Sequence[str] | None = None,
        *,
        negative_prompts_2: str | Sequence[str] | None = None,
        clip_skip: int | None = None,
    ) -> dict[str, Tensor]:
        """The unconditional embeddings of classifier-free guidance for ``n`` prompts, as
        diffusers' ``encode_prompt`` builds them: the negative prompts (default ``""``)
        encoded, or, for SDXL with ``force_zeros_for_empty_prompt`` and no negative prompt,
        zeros.

        ``clip_skip`` defaults to ``None`` because diffusers encodes negative prompts without
        it; pass the prompts' value to skip layers on both sides as A1111 does.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if negative_prompts is None and self.family == "sdxl" and self.force_zeros_for_empty_prompt:
            p = next(self.models[-1].parameters())
            return {
                "context": p.new_zeros(n, self.max_length, self.width),
                "pooled": p.new_zeros(n, int(self.pooled_width or 0)),
            }
        negatives = _broadcast(negative_prompts or "", n, "negative_prompts")
        second = _broadcast(negative_prompts_2, n, "negative_prompts_2") or negatives
        return self._encode(self._per_model(negatives, second), clip_skip)

    def _per_model(self, first: list[str], second: list[str]) -> list[list[str]]:
        """The prompts each text model reads (SDXL base: the first, then the second)."""
        if self.family != "sdxl":
            return [first]
        if len(second) != len(first):
            raise ValueError(f"{len(first)} prompts but {len(second)} second prompts")
        # diffusers zips [prompt, prompt_2] with the encoders: the refiner reads the first.
        return [first, second][: len(self.models)]

    def _encode(
        self, prompts: list[list[str]], clip_skip: int | None, *, grad: bool = False
    ) -> dict[str, Tensor]:
        contexts, pooled = [], None
        warned: set[str] = set()  # SDXL's two tokenizers: one warning per prompt
        for i, (model, batch) in enumerate(zip(self.models, prompts)):
            ids = self._token_ids(i, batch, warned).to(self.device)  # (B, 77)
            with contextlib.nullcontext() if grad else torch.no_grad():
                out = model(ids, output_hidden_states=True)
            hidden = out.hidden_states  # embeddings, then each of the L layers
            if self.family == "sdxl":  # the penultimate layer, no final LayerNorm
                contexts.append(hidden[_layer_index(len(hidden), clip_skip, 2)])
                if hasattr(out, "text_embeds"):
                    pooled = out.text_embeds  # (B, P)
            elif clip_skip is None:
                contexts.append(out.last_hidden_state)
            else:
                layer = hidden[_layer_index(len(hidden), clip_skip, 1)]
                with contextlib.nullcontext() if grad else torch.no_grad():
                    contexts.append(_text_transformer(model).final_layer_norm(layer))
        result = {"context": torch.cat(contexts, dim=-1)}  # (B, 77, D)
        if pooled is not None:
            result["pooled"] = pooled
        return result

    def _token_ids(self, i: int, prompts: list[str], warned: set[str]) -> Tensor:
        """Token ids ``[B, 77]`` of model ``i``: multi-vector words expanded, the prompt cut
        to 77 tokens with a warning naming the count dropped (diffusers' truncation)."""
        tokenizer = self.tokenizers[i]
        prompts = [self.expand(p, i) for p in prompts]
        full = tokenizer(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
        for prompt, ids in zip(prompts, full):
            if len(ids) > tokenizer.model_max_length and prompt not in warned:
                warned.add(prompt)
                warnings.warn(
                    f"prompt {prompt[:60]!r}... is {len(ids)} tokens; CLIP reads "
                    f"{tokenizer.model_max_length} (start and end included), so the last "
                    f"{len(ids) - tokenizer.model_max_length} tokens are dropped",
                    stacklevel=4,
                )
        return tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        )["input_ids"]  # fmt: skip

    def expand(self, prompt: str, i: int = 0) -> str:
        """``prompt`` with each multi-vector textual-inversion word ``name`` written
        ``name name_1 ... name_{n-1}`` for tokenizer ``i``, as diffusers'
        ``maybe_convert_prompt`` does."""
        words = self.words[i]
        if not any(n > 1 for n in words.values()):
            return prompt
        for token in set(self.tokenizers[i].tokenize(prompt)):
            if words.get(token, 0) > 1:
                names = [token] + [f"{token}_{k}" for k in range(1, words[token])]
                prompt = prompt.replace(token, " ".join(names))
        return prompt

    def add_words(self, i: int, names: Sequence[str], vectors: Tensor) -> None:
        """Textual inversion (Gal et al. 2023): new tokens ``names`` of tokenizer ``i`` whose
        input embeddings are ``vectors [len(names), D]``; the first name is the word a
        prompt uses, the others its ``_1``, ``_2`` ... continuation."""
        tokenizer, model = self.tokenizers[i], self.models[i]
        table = model.get_input_embeddings()
        taken = [n for n in names if n in tokenizer.get_vocab()]
        if taken:
            raise ValueError(f"token(s) {taken} are already in tokenizer {i}'s vocabulary")
        tokenizer.add_tokens(list(names))
        ids = tokenizer.convert_tokens_to_ids(list(names))
        rows = max(table.weight.shape[0], max(ids) + 1)
        weight = table.weight.new_zeros(rows, table.weight.shape[1])
        weight[: table.weight.shape[0]] = table.weight
        weight[torch.tensor(ids)] = vectors.to(weight)
        table.weight = nn.Parameter(weight, requires_grad=False)
        table.num_embeddings = rows
        model.config.vocab_size = rows
        self.words[i][names[0]] = len(names)

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_diffusers(
        cls, folder: str | Path, family: Family, *, dtype: torch.dtype | None = None
    ) -> SDTextEncoder:
        """Read ``text_encoder/`` + ``tokenizer/`` (SDXL: and ``text_encoder_2/`` +
        ``tokenizer_2/``; the refiner has only those) of a diffusers folder.

        Weights are safetensors: ``model.safetensors``, the fp16 variant
        ``model.fp16.safetensors``, or either sharded with its index json. ``dtype``
        defaults to float32. Nothing is downloaded.
        """
        family = _check_family(family)  # type: ignore[assignment]
        transformers = _transformers()
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"diffusers folder {str(root)!r} does not exist")
        pairs = [("text_encoder", "tokenizer", transformers.CLIPTextModel)]
        if family == "sdxl":
            projected = transformers.CLIPTextModelWithProjection
            pairs = [*pairs, ("text_encoder_2", "tokenizer_2", projected)]
            if not (root / "text_encoder").is_dir():  # the refiner
                pairs = pairs[1:]
        tokenizers, models = [], []
        for model_dir, tok_dir, model_cls in pairs:
            path = root / model_dir
            if not path.is_dir():
                raise FileNotFoundError(
                    f"{str(root)!r} has no {model_dir}/ folder; a diffusers {family} folder "
                    f"holds {', '.join(p[0] + '/' for p in pairs)}"
                )
            models.append(
                model_cls.from_pretrained(
                    path,
                    local_files_only=True,
                    dtype=dtype or torch.float32,
                    variant=_variant(path),
                )
            )
            tokenizers.append(_load_tokenizer(root / tok_dir, f"{tok_dir}/ of {root}"))
        force_zeros = family == "sdxl"
        index = root / "model_index.json"
        if index.is_file():
            config = json.loads(index.read_text(encoding="utf-8"))
            force_zeros = bool(config.get("force_zeros_for_empty_prompt", force_zeros))
        for tokenizer, model, (_, tok_dir, _) in zip(tokenizers, models, pairs):
            _check_vocab(tokenizer, model, root / tok_dir)
        return cls(tokenizers, models, family, force_zeros_for_empty_prompt=force_zeros)

    @classmethod
    def from_single_file(
        cls,
        state: Mapping[str, Tensor],
        family: Family,
        tokenizer_dir: str | Path,
        *,
        dtype: torch.dtype | None = None,
        heads: int | None = None,
        force_zeros_for_empty_prompt: bool | None = None,
    ) -> SDTextEncoder:
        """The text encoder(s) inside an original single-file checkpoint's ``state``.

        ``sd1``: ``cond_stage_model.transformer.*`` (Hugging Face CLIP layout); ``sd2``:
        ``cond_stage_model.model.*`` (OpenCLIP layout, cut to its penultimate layer as
        diffusers stores SD 2); ``sdxl``: ``conditioner.embedders.0.transformer.*`` and
        ``conditioner.embedders.1.model.*`` (the refiner: ``conditioner.embedders.0.model.*``).
        Configs are inferred from the weight shapes (heads = width // 64 unless ``heads``).

        :param tokenizer_dir: a local diffusers folder (``tokenizer/``, ``tokenizer_2/``) or,
            for ``sd1`` / ``sd2``, a CLIP tokenizer folder.
        :param force_zeros_for_empty_prompt: SDXL's unconditional default (diffusers: true).
        """
        family = _check_family(family)  # type: ignore[assignment]
        transformers = _transformers()
        # One (HF state dict, activation, tokenizer subfolder) per text model: OpenAI's
        # CLIP-L uses quick-GELU, OpenCLIP's towers GELU; those have a text projection.
        if family == "sd1":
            specs = [(_hf_clip_state(state, SD1_PREFIX, family), "quick_gelu", "tokenizer")]
        elif family == "sd2":
            layers = _open_clip_layers(state, SD2_PREFIX, family)
            hf = open_clip_to_hf(state, SD2_PREFIX, layers=layers - 1, projection=False)
            specs = [(hf, "gelu", "tokenizer")]
        elif any(k.startswith(SDXL_REFINER_PREFIX) for k in state):
            specs = [(open_clip_to_hf(state, SDXL_REFINER_PREFIX), "gelu", "tokenizer_2")]
        else:
            clip_l = _hf_clip_state(state, SDXL_PREFIXES[0], family)
            _open_clip_layers(state, SDXL_PREFIXES[1], family)  # a clear error when absent
            clip_g = open_clip_to_hf(state, SDXL_PREFIXES[1])
            specs = [(clip_l, "quick_gelu", "tokenizer"), (clip_g, "gelu", "tokenizer_2")]
        # Every tokenizer first: a missing one is named before any model is built.
        tokenizers = [_find_tokenizer(Path(tokenizer_dir), sub, family) for _, _, sub in specs]
        models: list[Any] = []
        for (hf, act, sub), tokenizer in zip(specs, tokenizers):
            n_heads = heads if heads is not None else _folder_heads(Path(tokenizer_dir), sub)
            config = clip_text_config(hf, hidden_act=act, heads=n_heads, tokenizer=tokenizer)
            model_cls = transformers.CLIPTextModel
            if "text_projection.weight" in hf:
                model_cls = transformers.CLIPTextModelWithProjection
            models.append(_build(model_cls, config, hf, dtype or torch.float32))
            _check_vocab(tokenizer, models[-1], Path(tokenizer_dir))
        if force_zeros_for_empty_prompt is None:
            force_zeros_for_empty_prompt = family == "sdxl"
        return cls(
            tokenizers, models, family, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt
        )


def _folder_heads(folder: Path, tokenizer_sub: str) -> int | None:
    """The attention heads a diffusers folder's matching text encoder config names
    (``text_encoder/`` for ``tokenizer/``, ``text_encoder_2/`` for ``tokenizer_2/``): the
    one architecture number a checkpoint's weight shapes do not give.  ``None`` without one."""
    path = folder / tokenizer_sub.replace("tokenizer", "text_encoder") / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text("utf-8"))
    except ValueError:
        return None
    heads = config.get("text_config", config).get("num_attention_heads")
    return int(heads) if isinstance(heads, int) else None


# -- prompt helpers ------------------------------------------------------------------------


def _prompt_list(prompts: Sequence[str] | None, name: str) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError(f"{name} is a list of prompts, not one string")
    return list(prompts or [])


def _broadcast(prompts: str | Sequence[str] | None, n: int, name: str) -> list[str]:
    """``n`` prompts: a string repeated, or a list of exactly ``n``."""
    if prompts is None:
        return []
    if isinstance(prompts, str):
        return [prompts] * n
    if len(prompts) != n:
        raise ValueError(f"{name} has {len(prompts)} prompts, expected {n} (one per prompt)")
    return list(prompts)


def _layer_index(n_states: int, clip_skip: int | None, base: int) -> int:
    """The ``hidden_states`` index diffusers reads: ``-(clip_skip + base)``."""
    skip = clip_skip or 0
    if skip < 0 or skip + base > n_states:
        raise ValueError(
            f"clip_skip must be between 0 and {n_states - base} for this "
            f"{n_states - 1}-layer encoder, got {clip_skip}"
        )
    return -(skip + base)


def _text_transformer(model: Any) -> Any:
    """The CLIP text transformer (embeddings, encoder, final LayerNorm) of a text model:
    ``model.text_model`` in transformers 4 and in ``CLIPTextModelWithProjection``, the
    model itself in transformers 5's ``CLIPTextModel``."""
    inner = model.__dict__.get("_modules", {}).get("text_model")
    return inner if inner is not None else model


# -- loading helpers -----------------------------------------------------------------------


def _variant(path: Path) -> str | None:
    """``None`` for ``model.safetensors`` (or its index), ``"fp16"`` for the fp16 variant."""
    for variant, stem in ((None, "model"), ("fp16", "model.fp16")):
        if (path / f"{stem}.safetensors").is_file() or (
            path / f"{stem}.safetensors.index.json"
        ).is_file():
            return variant
    raise FileNotFoundError(
        f"{str(path)!r} holds no model.safetensors, model.fp16.safetensors or a sharded "
        "index of either"
    )


def _load_tokenizer(folder: Path, what: str) -> Any:
    if not any(all((folder / f).is_file() for f in files) for files in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no CLIP tokenizer in {what} (expected tokenizer.json, or vocab.json and merges.txt)"
        )
    return _transformers().CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _find_tokenizer(root: Path, sub: str, family: str) -> Any:
    """``root/sub`` of a diffusers folder, or ``root`` itself for a one-tokenizer family."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder {str(root)!r} does not exist (expected a diffusers {family} "
            f"folder with {sub}/, or a CLIP tokenizer folder)"
        )
    if (root / sub).is_dir():
        return _load_tokenizer(root / sub, f"{root / sub}")
    if family == "sdxl":
        raise FileNotFoundError(
            f"tokenizer folder {str(root)!r} has no {sub}/; SDXL needs a diffusers folder with "
            "tokenizer/ and tokenizer_2/ (their padding differs)"
        )
    return _load_tokenizer(root, f"{root} (nor in its {sub}/)")


def _check_vocab(tokenizer: Any, model: Any, where: Path) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(
            f"the tokenizer in {str(where)!r} has {len(tokenizer)} tokens but the text encoder "
            f"has {rows}: a tokenizer of another model?"
        )


def _under(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _missing(state: Mapping[str, Tensor], prefix: str, family: str) -> ValueError:
    heads = sorted({".".join(k.split(".")[:2]) for k in state})[:8]
    return ValueError(
        f"the checkpoint has no {family} text encoder: no key starts with {prefix!r} "
        f"(its keys start with {', '.join(heads) or 'nothing'})"
    )


def _hf_clip_state(state: Mapping[str, Tensor], prefix: str, family: str) -> dict[str, Tensor]:
    """The Hugging Face CLIP text model under ``prefix`` (``text_model.*`` keys)."""
    sub = _under(state, prefix)
    if not sub:
        raise _missing(state, prefix, family)
    out = {}
    for key, value in sub.items():
        if key.endswith("position_ids"):  # a buffer some checkpoints carry
            continue
        out[key if key.startswith("text_model.") else "text_model." + key] = value
    return out


def _open_clip_layers(state: Mapping[str, Tensor], prefix: str, family: str) -> int:
    block = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := block.match(k))}
    if not found:
        raise _missing(state, prefix + "transformer.resblocks.", family)
    return max(found) + 1


def open_clip_to_hf(
    state: Mapping[str, Tensor],
    prefix: str,
    *,
    layers: int | None = None,
    projection: bool = True,
) -> dict[str, Tensor]:
    """An OpenCLIP text tower under ``prefix`` as a ``CLIPTextModel`` /
    ``CLIPTextModelWithProjection`` state dict.

    ``transformer.resblocks.N.attn.in_proj_*`` ``[3D, ...]`` splits into ``q/k/v_proj``;
    ``ln_1/ln_2`` -> ``layer_norm1/2``; ``mlp.c_fc/c_proj`` -> ``mlp.fc1/fc2``;
    ``positional_embedding``, ``token_embedding``, ``ln_final`` -> the embeddings and
    ``final_layer_norm``; ``text_projection [D, P]`` (used as ``x @ P``) ->
    ``text_projection.weight [P, D]`` when ``projection``.

    :param layers: keep the first ``layers`` blocks (SD 2.x: all but the last).
    :raises ValueError: a key under ``prefix`` this mapping does not know.
    """
    sub = _under(state, prefix)
    if not sub:
        raise ValueError(f"no key starts with {prefix!r}")
    out: dict[str, Tensor] = {}
    unknown = []
    block = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
             "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}  # fmt: skip
    top = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
           "positional_embedding": "text_model.embeddings.position_embedding.weight",
           "ln_final.weight": "text_model.final_layer_norm.weight",
           "ln_final.bias": "text_model.final_layer_norm.bias"}  # fmt: skip
    for key, value in sub.items():
        if key in top:
            out[top[key]] = value
        elif key == "text_projection":
            if projection:
                out["text_projection.weight"] = value.T.contiguous()
        elif m := block.fullmatch(key):
            index, rest = int(m.group(1)), m.group(2)
            if layers is not None and index >= layers:
                continue
            dest = f"text_model.encoder.layers.{index}."
            module, _, kind = rest.rpartition(".")
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for name, part in zip("qkv", value.chunk(3, dim=0)):  # rows [q; k; v]
                    out[f"{dest}self_attn.{name}_proj.{kind}"] = part.contiguous()
            elif module in names:
                out[f"{dest}{names[module]}.{kind}"] = value
            else:
                unknown.append(prefix + key)
        elif key not in _OPEN_CLIP_IGNORED:
            unknown.append(prefix + key)
    if unknown:
        raise ValueError(f"unknown OpenCLIP text keys: {', '.join(sorted(unknown)[:5])}")
    return out


def clip_text_config(
    hf_state: Mapping[str, Tensor],
    *,
    hidden_act: str = "quick_gelu",
    heads: int | None = None,
    tokenizer: Any = None,
) -> Any:
    """The ``CLIPTextConfig`` of a Hugging Face layout CLIP text state dict, from its
    shapes: width and vocabulary from the token embedding, positions from the position
    embedding, layers counted, MLP width from ``fc1``, projection from
    ``text_projection.weight``; heads = width // 64 (OpenAI's and OpenCLIP's head width)
    unless given. Special token ids come from ``tokenizer`` when given."""
    try:
        vocab, width = hf_state["text_model.embeddings.token_embedding.weight"].shape
        positions = hf_state["text_model.embeddings.position_embedding.weight"].shape[0]
        inner = hf_state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"the CLIP text weights have no {err.args[0]}") from None
    layers = 1 + max(
        int(k.split(".")[3]) for k in hf_state if k.startswith("text_model.encoder.layers.")
    )
    heads = heads or width // 64
    if heads < 1 or width % heads:
        raise ValueError(f"width {width} does not split into {heads} heads; pass heads=")
    proj = hf_state.get("text_projection.weight")
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return _transformers().CLIPTextConfig(
        vocab_size=int(vocab), hidden_size=int(width), intermediate_size=int(inner),
        num_hidden_layers=layers, num_attention_heads=heads,
        max_position_embeddings=int(positions), hidden_act=hidden_act,
        projection_dim=int(proj.shape[0]) if proj is not None else int(width), **ids,
    )  # fmt: skip


def _build(model_cls: Any, config: Any, hf: dict[str, Tensor], dtype: torch.dtype) -> Any:
    """``model_cls(config)`` holding ``hf``, built on the meta device (no random init, no
    draw from the global RNG)."""
    with torch.device("meta"):
        model = model_cls(config)
    if "text_model.final_layer_norm.weight" not in model.state_dict():
        # transformers 5's CLIPTextModel is the text transformer itself (no text_model level)
        hf = {k.removeprefix("text_model."): v for k, v in hf.items()}
    result = model.load_state_dict(hf, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"the {model_cls.__name__} weights do not match their inferred config: missing "
            f"{result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}"
        )
    embeddings = _text_transformer(model).embeddings  # its one buffer, not in checkpoints
    embeddings.position_ids = torch.arange(config.max_position_embeddings).expand(1, -1)
    model.to(dtype)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(f"{model_cls.__name__}: tensors left unloaded: {meta[:4]}")
    return model.eval()


# -- textual inversion ---------------------------------------------------------------------


def load_embedding(encoder: SDTextEncoder, path: str | Path, token: str | None = None) -> str:
    """Load a textual-inversion embedding (Gal et al. 2023) into ``encoder``; returns the
    word prompts use. A vector set ``[n, D]`` adds tokens ``word``, ``word_1`` ...
    ``word_{n-1}`` and a prompt's ``word`` expands to all of them (diffusers' rule).

    Formats: A1111 ``.safetensors`` with ``emb_params [n, D]`` (SDXL: ``clip_l`` and
    ``clip_g``); A1111 ``.pt`` with ``string_to_param["*"]`` (read with
    ``torch.load(weights_only=True)``); diffusers ``learned_embeds.safetensors`` / ``.bin``
    ``{token: vector}``. The word is ``token``, else diffusers' stored token, else (A1111)
    the file name without its suffix, as A1111 names embeddings.

    :raises ValueError: an unknown layout, a width other than the encoder's, a word the
        tokenizer already has.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {str(path)!r} does not exist")
    data = _read_embedding_file(path)
    name = token
    per_model: list[Tensor]
    if "clip_l" in data or "clip_g" in data:  # SDXL, A1111 / kohya
        both = [data.get("clip_l"), data.get("clip_g")]
        if encoder.family != "sdxl" or not all(isinstance(v, Tensor) for v in both):
            raise ValueError(
                f"{path}: an SDXL embedding (clip_l, clip_g) needs an sdxl encoder and both "
                f"keys; this encoder is {encoder.family}, the file has {sorted(data)}"
            )
        per_model = [v for v in both if isinstance(v, Tensor)][-len(encoder.models) :]
    else:
        if "emb_params" in data:  # A1111 .safetensors
            vectors = data["emb_params"]
        elif isinstance(data.get("string_to_param"), Mapping):  # A1111 .pt
            vectors = data["string_to_param"].get("*")
        elif len(data) == 1 and isinstance(next(iter(data.values())), Tensor):  # diffusers
            stored, vectors = next(iter(data.items()))
            name = name or stored
        else:
            vectors = None
        if not isinstance(vectors, Tensor):
            raise ValueError(
                f"{path}: not a textual-inversion embedding (expected emb_params, "
                f"string_to_param['*'], clip_l/clip_g or one {{token: vector}}; got keys "
                f"{sorted(data)[:6]})"
            )
        if encoder.family == "sdxl":
            raise ValueError(f"{path}: an SDXL encoder needs an embedding with clip_l and clip_g")
        per_model = [vectors]
    name = name or path.stem
    vector_sets = [v.reshape(-1, v.shape[-1]) if v.ndim != 1 else v[None] for v in per_model]
    for vectors, model in zip(vector_sets, encoder.models):
        width = model.get_input_embeddings().weight.shape[1]
        if vectors.shape[-1] != width:
            raise ValueError(
                f"{path}: embedding width {vectors.shape[-1]}, but this {encoder.family} "
                f"encoder's token width is {width}"
            )
    names = [name] + [f"{name}_{k}" for k in range(1, max(v.shape[0] for v in vector_sets))]
    for i, tokenizer in enumerate(encoder.tokenizers):  # all or nothing
        taken = [n for n in names if n in tokenizer.get_vocab()]
        if taken:
            raise ValueError(f"{path}: token(s) {taken} are already in tokenizer {i}'s vocabulary")
    for i, vectors in enumerate(vector_sets):
        encoder.add_words(i, names[: vectors.shape[0]], vectors)
    return name


def _read_embedding_file(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in many types
        raise ValueError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(err).__name__}); "
            "only tensor files are loaded, never pickled code"
        ) from None
    if isinstance(data, Tensor):
        return {"emb_params": data}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    return data
