"""Textual inversion (Gal et al. 2023, "An Image is Worth One Word"): a new word whose token
embedding alone is trained, the rest of the network frozen.

Owns growing a text-conditional run's vocabulary and token table by one word
(:func:`add_word`, initialised from an existing word's embedding as the paper does), the
gradient mask that lets only that row train, and the embedding file
(``<word>`` -> vector, metadata ``format`` ``difflab-ti/1``, ``init_word``) with its loud
loader. For runs whose text encoder difflab trained (``text.encoder: transformer``) the word
is a new row of its token table; for a frozen pretrained encoder (``clip``, ``t5``) the word's
vector is a parameter of the U-Net (:func:`attach_word_vector`) that
``PretrainedTextEncoder.add_word`` puts in place of the word's token embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..models.text import TextConditionedUNet, WordTokenizer, words

__all__ = [
    "TI_FORMAT",
    "add_word",
    "attach_word_vector",
    "load_embedding",
    "read_word_vector",
    "save_embedding",
    "save_word_vector",
]

TI_FORMAT = "difflab-ti/1"
EMBEDDING_FILE = "embedding.safetensors"  # what a textual-inversion run writes (EMA)
SPECIAL_ROWS = ("<pad>", "<unk>", "<bos>")
WORD_PARAM = "ti_word"  # a frozen-encoder run's trained word vector, a parameter of the U-Net


def _check_word(tokenizer: WordTokenizer, word: str) -> None:
    if words(word) != [word]:
        raise ValueError(
            f"the new word must be one lower-case word of letters and digits (as the tokenizer "
            f"splits text), got {word!r}"
        )
    if word in tokenizer.index:
        raise ValueError(f"{word!r} is already in the vocabulary; choose a new word")


def add_word(
    model: TextConditionedUNet,
    tokenizer: WordTokenizer,
    word: str,
    init: str | Tensor | None = None,
    *,
    trainable_only: bool = True,
) -> tuple[WordTokenizer, int]:
    """Append ``word`` to ``tokenizer`` and a row to ``model.text.token``.

    :param init: an existing word whose embedding the new row copies (Gal et al. sec. 4), a
        vector, or None (the mean embedding).
    :param trainable_only: freeze the network and let gradients reach the new row only.
    :return: the extended tokenizer and the new token's id.
    """
    _check_word(tokenizer, word)
    table = model.text.token
    with torch.no_grad():
        if isinstance(init, Tensor):
            row = init.to(table.weight)
        elif init is None:
            row = table.weight[len(SPECIAL_ROWS) :].mean(0)
        else:
            if init not in tokenizer.index:
                raise ValueError(f"init word {init!r} is not in the vocabulary")
            row = table.weight[tokenizer.index[init]].clone()
        grown = nn.Embedding(table.num_embeddings + 1, table.embedding_dim).to(table.weight)
        grown.weight.copy_(torch.cat([table.weight, row[None]]))
    model.text.token = grown
    new_id = table.num_embeddings
    if trainable_only:
        model.requires_grad_(False)
        grown.weight.requires_grad_(True)
        mask = torch.zeros(grown.num_embeddings, 1, dtype=grown.weight.dtype)
        mask[new_id] = 1.0
        grown.weight.register_hook(lambda grad: grad * mask.to(grad.device))
    extended = WordTokenizer([*tokenizer.vocab, word], tokenizer.max_length)
    return extended, new_id


def save_embedding(
    model: TextConditionedUNet, tokenizer: WordTokenizer, word: str, path: str | Path,
    metadata: dict[str, str] | None = None,
) -> Path:  # fmt: skip
    """Write ``{word: vector}`` as safetensors with its format and width (atomically)."""
    return save_word_vector(word, model.text.token.weight[tokenizer.index[word]], path, metadata)


def save_word_vector(
    word: str, vector: Tensor, path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """The embedding file of one word (``{word: vector}``, format ``difflab-ti/1``)."""
    from safetensors.torch import save

    from ..runs import atomic_write_bytes

    vector = vector.detach().float().cpu()
    meta = {**(metadata or {}), "format": TI_FORMAT, "word": word, "width": str(len(vector))}
    atomic_write_bytes(Path(path), save({word: vector.contiguous()}, metadata=meta))
    return Path(path)


def read_word_vector(path: str | Path) -> tuple[str, Tensor]:
    """``(word, vector)`` of an embedding file; loud about anything else."""
    from .lora import read_tagged

    _, tensors = read_tagged(path, TI_FORMAT, "embedding")
    if len(tensors) != 1:
        raise ValueError(f"{path} holds {len(tensors)} tensors; an embedding file holds one")
    ((word, vector),) = tensors.items()
    return word, vector


def attach_word_vector(model: nn.Module, vector: Tensor) -> nn.Parameter:
    """Register ``vector`` as ``model.ti_word``: the trained embedding of a word added to a
    frozen pretrained text encoder (CLIP, T5), saved and averaged with the network."""
    param = nn.Parameter(vector.detach().clone())
    model.register_parameter(WORD_PARAM, param)
    return param


def load_embedding(
    model: TextConditionedUNet, tokenizer: WordTokenizer, path: str | Path
) -> WordTokenizer:
    """Add the word of an embedding file to ``model`` and return the extended tokenizer.

    :raises ValueError: not a difflab embedding, a width that does not fit this encoder, or
        a word the vocabulary already has.
    """
    word, vector = read_word_vector(path)
    width = model.text.token.embedding_dim
    if vector.shape != (width,):
        raise ValueError(
            f"{path} holds a {tuple(vector.shape)} embedding for {word!r}, but this text "
            f"encoder's tokens have width {width}"
        )
    extended, _ = add_word(model, tokenizer, word, vector, trainable_only=False)
    model.eval()
    return extended
