"""Content-addressed caches of frozen encoders' outputs (``train.encoder_cache``).

Latent diffusion encodes every training image with the frozen autoencoder, and a run
conditioned through a frozen text encoder encodes every caption, at every step. Both are
pure functions of their input, so :class:`EncoderCache` keeps each result under a key made
of what determines it (USER_NEEDS 15):

- an image's posterior (mean and log-variance): the transformed image's bytes, so the
  file's content, the resolution, the crop and any flip, with its shape and dtype;
- a caption's tokens: the caption text;

inside a namespace that names the encoder by a digest of its weights and settings
(:func:`module_digest`), so another autoencoder, text encoder, ``max_length`` or dtype never
reads these entries. Entries live in memory and, given a folder, on disk as one safetensors
file each, ``folder/<namespace>/<key[:2]>/<key>.safetensors``, written atomically (so ranks
sharing the folder, or a crash, never leave a torn entry). A file that does not read back
with its own key is named in a warning and recomputed.

Each item is computed alone (a batch of one), so a cached value does not depend on which
batch first met it: a run trains the same with a cold or a warm cache. Knows nothing of
the training loop.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import Tensor, nn

from ..runs import atomic_write_bytes

__all__ = ["EncoderCache", "content_key", "module_digest", "tensor_key"]

FORMAT = "difflab-encoder-cache-1"
Entry = dict[str, Tensor]


def content_key(*parts: bytes | str) -> str:
    """A hex digest of ``parts`` (each length-prefixed, so boundaries count)."""
    h = hashlib.blake2b(digest_size=20)
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def tensor_key(t: Tensor, *extra: str) -> str:
    """Key of a tensor's exact contents, shape and dtype (plus ``extra`` strings)."""
    t = t.detach().cpu().contiguous()
    raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return content_key(raw, str(tuple(t.shape)), str(t.dtype), *extra)


def module_digest(module: nn.Module, *settings: str) -> str:
    """A short digest of ``module``'s weights (names, shapes, dtypes, values) and
    ``settings``: the namespace of its cached outputs."""
    parts: list[bytes | str] = []
    for name, value in sorted(module.state_dict().items()):
        parts += [name, tensor_key(value)]
    return content_key(type(module).__name__, *parts, *settings)[:20]


class EncoderCache:
    """Outputs of one frozen encoder, by content key (see the module doc).

    :param namespace: names the encoder and its settings (:func:`module_digest`).
    :param folder: where entries persist across runs; None keeps them in memory only.
    """

    def __init__(self, namespace: str, folder: str | Path | None = None) -> None:
        self.namespace = namespace
        self.folder = None if folder is None else Path(folder) / namespace
        self.memory: dict[str, Entry] = {}
        self.hits = 0  # found in memory or on disk
        self.computed = 0

    def get(self, keys: Sequence[str], compute: Callable[[int], Entry]) -> list[Entry]:
        """The entries of ``keys``; a missing one is ``compute(i)`` for its position ``i``
        (stored on the CPU, and on disk when the cache has a folder)."""
        out = []
        for i, key in enumerate(keys):
            entry = self.memory.get(key)
            if entry is None and self.folder is not None:
                entry = self._read(key)
            if entry is None:
                entry = {k: v.detach().cpu().contiguous() for k, v in compute(i).items()}
                self.computed += 1
                if self.folder is not None:
                    self._write(key, entry)
            else:
                self.hits += 1
            self.memory[key] = entry
            out.append(entry)
        return out

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / key[:2] / f"{key}.safetensors"

    def _read(self, key: str) -> Entry | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                entry = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        except Exception as err:  # a torn or foreign file: say so, then recompute
            warnings.warn(f"unreadable cache entry {path} ({err}); recomputing it", stacklevel=3)
            return None
        if meta.get("format") != FORMAT or meta.get("key") != key:
            warnings.warn(
                f"cache entry {path} does not hold key {key} of {self.namespace}; recomputing it",
                stacklevel=3,
            )
            return None
        return entry

    def _write(self, key: str, entry: Entry) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "key": key, "namespace": self.namespace}
        atomic_write_bytes(path, st_save(entry, metadata=meta))

    def __repr__(self) -> str:
        where = "memory" if self.folder is None else str(self.folder)
        return (
            f"EncoderCache({self.namespace}, {where}: {self.hits} hits, {self.computed} computed)"
        )
