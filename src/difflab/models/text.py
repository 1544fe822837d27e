"""Text conditioning: a word-level tokenizer, a transformer text encoder trained from scratch,
and the U-Net wrapper that feeds the encoder's tokens to cross-attention.

Latent Diffusion (Rombach et al. 2022, sec. 3.3 and 4.3) conditions the U-Net on the token
sequence ``τ_θ(y)`` of a transformer trained jointly with it; for small captioned data sets
(the embedded digits' "a handwritten digit seven", a folder of captioned images) that is
the model this module builds. The tokenizer's vocabulary is the caption words of the
training data, saved beside the run as ``tokenizer.json``; nothing is downloaded.

The wrapper keeps the one model contract: ``model(x_t, t, input_ids=, attention_mask=)``
encodes the tokens on every call (training), and ``model(x_t, t, context=, context_mask=)``
takes tokens encoded once (sampling; :meth:`TextConditionedUNet.encode`). Classifier-free
guidance uses the empty prompt, which encodes to the start token alone.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from difflab.models.dit import DiT
    from difflab.models.unet import UNet

__all__ = [
    "PretrainedTextEncoder",
    "PromptEncoder",
    "TextConditionedUNet",
    "TextConfig",
    "TextTransformer",
    "WordTokenizer",
]

TOKENIZER_FILE = "tokenizer.json"  # beside a text-conditional run's weights
PAD, UNK, BOS = "<pad>", "<unk>", "<bos>"
SPECIALS = (PAD, UNK, BOS)
TEXT_ENCODERS = ("none", "transformer", "clip", "t5", "sdxl")
PRETRAINED_ENCODERS = ("clip", "t5", "sdxl")  # frozen, read from text.path
# sdxl: a folder with SDXL's two encoders (difflab.interop.sd_text_train.SDXLTrainingText).
SDXL_TEXT_DIRS = ("text_encoder", "text_encoder_2")
# config.json model_type values each pretrained encoder accepts.
_MODEL_TYPES = {"clip": ("clip", "clip_text_model"), "t5": ("t5", "mt5", "umt5")}
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """Lower-cased words, numbers and single punctuation marks of ``text``."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary; every sequence starts with ``<bos>``
    and is padded to ``max_length`` (so the empty prompt is one real token, never an
    all-masked row).

    :param vocab: the token list; the first three must be ``<pad>``, ``<unk>``, ``<bos>``.
    :param max_length: tokens per sequence, ``<bos>`` included.
    """

    def __init__(self, vocab: Sequence[str], max_length: int) -> None:
        if tuple(vocab[:3]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {tuple(vocab[:3])}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("the vocabulary has duplicate tokens")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (<bos> plus a word), got {max_length}")
        self.vocab = list(vocab)
        self.max_length = int(max_length)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def from_texts(
        cls, texts: Iterable[str], max_length: int, *, min_count: int = 1
    ) -> WordTokenizer:
        """The vocabulary of ``texts``: words seen at least ``min_count`` times, most frequent
        first (ties alphabetical), so every process building it gets the same ids."""
        counts = Counter(w for text in texts for w in words(text))
        kept = sorted(
            (w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)
        )
        return cls([*SPECIALS, *kept], max_length)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(input_ids [B, max_length] long, attention_mask [B, max_length] bool)``.

        Unknown words become ``<unk>``; a prompt longer than ``max_length - 1`` words is cut
        with a warning that names it.
        """
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not one string")
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        unk, bos = self.index[UNK], self.index[BOS]
        for row, prompt in enumerate(prompts):
            toks = [bos] + [self.index.get(w, unk) for w in words(prompt)]
            if len(toks) > self.max_length:
                warnings.warn(
                    f"prompt {prompt!r} has {len(toks) - 1} words; only the first "
                    f"{self.max_length - 1} are used (text max_length={self.max_length})",
                    stacklevel=2,
                )
                toks = toks[: self.max_length]
            ids[row, : len(toks)] = torch.tensor(toks)
            mask[row, : len(toks)] = True
        return ids, mask

    def unknown_words(self, prompts: Iterable[str]) -> list[str]:
        """The words of ``prompts`` outside the vocabulary (they encode as ``<unk>``)."""
        seen = {w for p in prompts for w in words(p) if w not in self.index}
        return sorted(seen)

    def to_json(self) -> str:
        """``{"max_length": ..., "vocab": [...]}``, the content of a run's ``tokenizer.json``."""
        return json.dumps({"max_length": self.max_length, "vocab": self.vocab}, indent=1)

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        """Read a ``tokenizer.json`` (:meth:`to_json`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(data["vocab"], data["max_length"])


@dataclass
class TextConfig:
    """The ``text:`` section of a run config.

    :param encoder: ``none`` (no text conditioning), ``transformer`` (trained from scratch
        with the U-Net, LDM sec. 4.3), ``clip`` (a frozen pretrained CLIP text model read
        from ``path``, as Stable Diffusion conditions on CLIP ViT-L/14's tokens) or ``t5``
        (a frozen T5 encoder read from ``path``, as Imagen conditions on T5-XXL's tokens,
        Saharia et al. 2022 sec. 2.1), or ``sdxl`` (SDXL's two frozen CLIP encoders read from
        ``path/text_encoder{,_2}`` and ``path/tokenizer{,_2}``; the U-Net also gets the pooled
        embedding and size ids as ``vector``, Podell et al. 2023 sec. 2.2).
    :param width: ``transformer``: token width, the U-Net's ``context_dim`` (``clip``: the
        model's hidden size is used).
    :param layers: ``transformer`` layers.
    :param heads: ``transformer`` attention heads per layer.
    :param max_length: tokens per prompt, start/end tokens included (``clip``: at most the
        model's positions, 77 for OpenAI's CLIP; ``t5`` has relative positions, no limit).
    :param min_count: ``transformer``: words rarer than this in the captions map to ``<unk>``.
    :param path: ``clip`` / ``t5``: a local folder with the tokenizer and the (text or full)
        model, as ``save_pretrained`` writes it; nothing is downloaded.
    :param mask_padding: ``clip`` / ``t5``: mask the padding tokens out of the encoder and of
        the U-Net's cross-attention (default).  ``false`` is Stable Diffusion's recipe: the
        U-Net attends to all ``max_length`` tokens, padding included, which a run needs to
        give the same images once exported to diffusers (``difflab export``).
    """

    encoder: str = "none"
    width: int = 128
    layers: int = 2
    heads: int = 4
    max_length: int = 16
    min_count: int = 1
    path: str | None = None
    mask_padding: bool = True

    def __post_init__(self) -> None:
        if self.encoder not in TEXT_ENCODERS:
            raise ValueError(
                f"text.encoder must be one of {', '.join(TEXT_ENCODERS)}, got {self.encoder!r}"
            )
        for name in ("width", "layers", "heads", "min_count"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"text.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 2:
            raise ValueError(f"text.max_length must be >= 2, got {self.max_length}")
        if self.width % self.heads:
            raise ValueError(f"text.width={self.width} is not divisible by text.heads={self.heads}")
        if self.encoder == "sdxl":
            if not self.path:
                raise ValueError("text.encoder: sdxl needs text.path, a folder of SDXL's encoders")
            for sub in SDXL_TEXT_DIRS:
                if not (Path(str(self.path)) / sub / "config.json").is_file():
                    raise FileNotFoundError(
                        f"text.encoder: sdxl needs text.path, a folder with SDXL's "
                        f"{' and '.join(SDXL_TEXT_DIRS)}/ (and tokenizer/, tokenizer_2/); "
                        f"{self.path!r} has no {sub}/config.json"
                    )
        elif self.pretrained:
            name = self.encoder.upper() if self.encoder == "t5" else "CLIP"
            if not self.path:
                raise ValueError(
                    f"text.encoder: {self.encoder} needs text.path, a local {name} folder"
                )
            if not (Path(self.path) / "config.json").is_file():
                raise FileNotFoundError(
                    f"text.path {self.path!r} is not a saved model folder (no config.json); "
                    "save one with the model's and the tokenizer's save_pretrained(folder)"
                )
            model_type = self._folder_config().get("model_type")
            if model_type not in _MODEL_TYPES[self.encoder]:
                raise ValueError(
                    f"text.encoder: {self.encoder}, but {self.path} holds a "
                    f"{model_type!r} model (expected {' or '.join(_MODEL_TYPES[self.encoder])})"
                )

    def _folder_config(self, sub: str = "") -> dict[str, Any]:
        path = Path(str(self.path)) / sub / "config.json"
        return json.loads(path.read_text(encoding="utf-8"))

    @property
    def pretrained(self) -> bool:
        """A frozen pretrained encoder (``clip``, ``t5``) read from ``path``."""
        return self.encoder in PRETRAINED_ENCODERS

    @property
    def context_dim(self) -> int:
        """The width of the tokens the U-Net attends to."""
        if not self.pretrained:
            return self.width
        if self.encoder == "sdxl":  # both encoders' tokens, concatenated
            return sum(int(self._folder_config(sub)["hidden_size"]) for sub in SDXL_TEXT_DIRS)
        config = self._folder_config()
        if self.encoder == "t5":
            return int(config["d_model"])
        return int(config.get("text_config", config)["hidden_size"])

    @property
    def enabled(self) -> bool:
        return self.encoder != "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TextTransformer(nn.Module):
    """Token + learned position embeddings, pre-LN transformer layers (GELU, no dropout) and
    a final LayerNorm: ``(input_ids [B, L], attention_mask [B, L]) -> [B, L, width]``.
    Padded positions attend nowhere and are attended by nobody; their outputs are zeroed."""

    def __init__(
        self,
        vocab_size: int,
        cfg: TextConfig,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, cfg.width)
        self.position = nn.Parameter(torch.zeros(cfg.max_length, cfg.width))
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip
        self.layers = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        with torch.no_grad():  # GPT-2-style small normal init, from the given generator
            for p in self.parameters():
                if p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
            self.position.copy_(torch.randn(self.position.shape, generator=generator) * 0.01)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        length = input_ids.shape[1]
        if length > self.position.shape[0]:
            raise ValueError(
                f"{length} tokens, but the encoder has {self.position.shape[0]} positions"
            )
        h = self.token(input_ids) + self.position[:length].to(self.token.weight.dtype)
        h = self.layers(h, src_key_padding_mask=~attention_mask.bool())
        return self.norm(h) * attention_mask[..., None].to(h.dtype)


class TextConditionedUNet(nn.Module):
    """A U-Net with cross-attention plus the text encoder it is trained with.

    ``forward(x_t, t, class_labels=None, input_ids=None, attention_mask=None, context=None,
    context_mask=None)``: token ids are encoded here; ready ``context`` passes straight to
    the U-Net. Attributes the trainer and Pipeline read (``config``, ``null_class_label``,
    ``set_gradient_checkpointing``) are the U-Net's.
    """

    def __init__(self, unet: UNet | DiT, text: TextTransformer) -> None:
        super().__init__()
        self.unet = unet
        self.text = text

    @property
    def config(self) -> Any:
        return self.unet.config

    @property
    def null_class_label(self) -> int | None:
        return getattr(self.unet, "null_class_label", None)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.unet.set_gradient_checkpointing(enabled)

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(context [B, L, width], context_mask [B, L])`` for the U-Net's cross-attention."""
        mask = attention_mask.bool()
        return self.text(input_ids, mask), mask

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        class_labels: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        if input_ids is not None:
            if context is not None:
                raise ValueError("pass input_ids or context, not both")
            if attention_mask is None:
                attention_mask = input_ids != 0
            context, context_mask = self.encode(input_ids, attention_mask)
        return self.unet(
            x, t, class_labels=class_labels, context=context, context_mask=context_mask
        )


class PromptEncoder:
    """``prompts -> (context [B, L, width], context_mask [B, L])`` through a
    :class:`TextConditionedUNet`'s encoder, on the model's device: a ``Pipeline``'s
    ``text_encoder``. Words outside the vocabulary encode as ``<unk>`` (see
    :meth:`WordTokenizer.unknown_words`)."""

    def __init__(self, model: TextConditionedUNet, tokenizer: WordTokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokenizer.encode(list(prompts))
        device = next(self.model.parameters()).device
        return self.model.encode(ids.to(device), mask.to(device))


class PretrainedTextEncoder:
    """A frozen pretrained text encoder from a local folder: ``prompts -> (last_hidden_state
    [B, max_length, D], attention_mask [B, max_length])`` (all True when ``mask_padding`` is
    off, as Stable Diffusion attends to the padding tokens too).

    ``kind="clip"``: a CLIP text model, Stable Diffusion's conditioning (Rombach et al. 2022
    sec. 4.3.2); ``kind="t5"``: a T5 encoder, Imagen's (Saharia et al. 2022 sec. 2.1). The
    padding is masked out of cross-attention. Prompts are padded to ``max_length`` tokens;
    longer ones are cut with a warning. The model runs in eval mode without gradients and is
    never part of a checkpoint: a run records its folder in ``text.path``.
    """

    def __init__(
        self,
        path: str | Path,
        max_length: int = 77,
        device: torch.device | str | None = None,
        kind: str = "clip",
        *,
        mask_padding: bool = True,
    ) -> None:
        if kind not in ("clip", "t5"):  # sdxl: difflab.interop.sd_text_train
            raise ValueError(f"kind must be clip or t5, got {kind!r}")
        try:
            import transformers
        except ImportError as err:  # pragma: no cover - transformers is a test dependency
            raise ImportError(
                f"text.encoder: {kind} needs the transformers package: pip install transformers"
            ) from err
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{str(folder)!r} holds no saved {kind} model (config.json)")
        self.path = str(folder)
        self.kind = kind
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model_class = transformers.CLIPTextModel if kind == "clip" else transformers.T5EncoderModel
        self.model = model_class.from_pretrained(folder, local_files_only=True)
        self.model.eval().requires_grad_(False).to(device or "cpu")
        positions = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = int(max_length) if positions is None else min(int(max_length), positions)
        self.words: dict[int, Tensor] = {}  # textual-inversion words: token id -> vector
        self.mask_padding = bool(mask_padding)

    @property
    def width(self) -> int:
        config = self.model.config
        return int(config.d_model if self.kind == "t5" else config.hidden_size)

    def __call__(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(tokens [B, max_length, D], mask [B, max_length])``, without gradients."""
        with torch.no_grad():
            return self.encode(prompts)

    def encode(
        self, prompts: Sequence[str], words: dict[int, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Like calling the encoder, but with autograd on: gradients reach the vectors of
        textual-inversion ``words`` (token id -> embedding; default :attr:`words`)."""
        prompts = list(prompts)
        full = self.tokenizer(prompts, padding=False, truncation=False)["input_ids"]
        for prompt, ids in zip(prompts, full):
            if len(ids) > self.max_length:
                warnings.warn(
                    f"prompt {prompt!r} has {len(ids)} tokens; only the first "
                    f"{self.max_length} are used (text max_length)",
                    stacklevel=3,
                )
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length,
            return_tensors="pt",
        )  # fmt: skip
        device = next(self.model.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if not self.mask_padding:  # Stable Diffusion: every token, padding included
            mask = torch.ones_like(mask)
        words = self.words if words is None else words
        if not words:
            hidden = self.model(input_ids=ids, attention_mask=mask)
            return hidden.last_hidden_state, mask.bool()
        # Added words are outside the frozen table: feed a valid id there and put the
        # word's vector in place of its token embedding (a hook on the embedding layer).
        where = {i: ids == i for i in words}
        safe = ids.clone()
        for hit in where.values():
            safe[hit] = self.tokenizer.pad_token_id or 0

        def inject(module: nn.Module, args: Any, out: Tensor) -> Tensor:
            for i, hit in where.items():
                out = torch.where(hit[..., None], words[i].to(out), out)
            return out

        # Every embedding layer sharing the input table (T5's encoder has its own module
        # tied to the model's ``shared`` one).
        table = self.model.get_input_embeddings().weight
        layers = [m for m in self.model.modules() if getattr(m, "weight", None) is table]
        handles = [m.register_forward_hook(inject) for m in layers]
        try:
            hidden = self.model(input_ids=safe, attention_mask=mask)
        finally:
            for handle in handles:
                handle.remove()
        return hidden.last_hidden_state, mask.bool()

    def add_word(self, word: str, vector: Tensor) -> int:
        """Textual inversion (Gal et al. 2023): ``word`` becomes one new token whose
        embedding is ``vector`` (kept by reference, so a trained ``nn.Parameter`` works).

        :raises ValueError: a word the tokenizer already has, or a vector of another width.
        """
        if word in self.tokenizer.get_vocab() or " " in word.strip() or not word.strip():
            raise ValueError(f"{word!r} must be one word this tokenizer does not have yet")
        if vector.shape != (self.width,):
            raise ValueError(
                f"the embedding of {word!r} has shape {tuple(vector.shape)}, but this "
                f"encoder's tokens have width {self.width}"
            )
        self.tokenizer.add_tokens([word])
        # transformers types the one-token call's result as int | list[int]
        token = int(self.tokenizer.convert_tokens_to_ids(word))  # type: ignore[arg-type]
        self.words[token] = vector
        return token

    def with_words(self, words: dict[int, Tensor]) -> Any:
        """``prompts -> (tokens, mask)`` like this encoder, with other word vectors (e.g. an
        EMA copy's), without gradients."""

        def encode(prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
            with torch.no_grad():
                return self.encode(prompts, words)

        encode.tokenizer = self.tokenizer  # type: ignore[attr-defined]
        return encode

    def with_models(self, models: Sequence[nn.Module]) -> PretrainedTextEncoder:
        """This encoder (tokenizer, words, settings) reading another copy of its text model,
        e.g. a network's adapted one (``finetune.text_encoder``)."""
        (model,) = models
        other = copy.copy(self)
        other.model = model  # type: ignore[assignment]  # a copy of the same model class
        return other

    def word_embedding(self, word: str) -> Tensor:
        """The frozen table's embedding of ``word``, which must be one token."""
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(
                f"init word {word!r} is {len(ids)} tokens for this tokenizer; choose one that "
                "is a single token"
            )
        # transformers types get_input_embeddings() as nn.Module (it is an nn.Embedding)
        return self.model.get_input_embeddings().weight[ids[0]].detach().clone()  # type: ignore[index]
