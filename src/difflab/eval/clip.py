"""CLIP score (Hessel et al. 2021): prompt-image agreement of generated images.

Owns: loading a Hugging Face ``transformers`` CLIP model and its processor from a *local*
folder (``local_files_only=True``; nothing is downloaded) and the score
``w * max(100 * cos(E_image, E_text), 0)`` per image, with ``w`` (``scale``) and the model
recorded next to every number. Knows nothing of how the images were made.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.eval.metrics import to_uint8


class CLIPScorer:
    """CLIP score of images against prompts (Hessel et al. 2021, eq. 1).

    ``score = scale * max(100 * cos(image_embedding, text_embedding), 0)``; ``scale`` = w,
    1.0 by default as torchmetrics (Hessel et al. use w = 2.5).

    :param path: a local folder with a ``CLIPModel`` and its processor (``save_pretrained``
        output). Loaded with ``local_files_only=True``: nothing is downloaded.
    :param scale: the weight w.
    """

    def __init__(
        self, path: str | os.PathLike, *, scale: float = 1.0, device: str | torch.device = "cpu"
    ) -> None:
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"CLIP model folder '{folder}' not found. difflab loads CLIP only from a local "
                "folder (local_files_only=True); save one first, e.g. with "
                "CLIPModel.from_pretrained(name).save_pretrained(folder) and the same for "
                "CLIPProcessor, on a machine with network access."
            )
        self.model_name = str(folder)
        self.scale = float(scale)
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True)
        # transformers types PreTrainedModel.to (a wrapped method) as unbound
        self.model = self.model.to(self.device).eval().requires_grad_(False)  # type: ignore[arg-type]
        self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        self.id = f"clip:{folder.name}"
        # transformers types CLIPConfig.text_config as dict | CLIPTextConfig | None; loaded, it
        # is a CLIPTextConfig
        self.max_length = int(self.model.config.text_config.max_position_embeddings)  # type: ignore[union-attr]

    def image_embeddings(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings ``[N, D]`` of images ``[N, C, H, W]`` (float in [-1, 1]
        or uint8; quantised with `to_uint8`, grey replicated to RGB)."""
        images = to_uint8(images)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        arrays = list(images.permute(0, 2, 3, 1).cpu().numpy())  # N x (H, W, 3) uint8
        pixels = self.processor(images=arrays, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output
            return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings ``[N, D]``; prompts truncated to the model's context."""
        tokens = self.processor.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        with torch.no_grad():
            out = self.model.text_model(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
            return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)

    def scores(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Per-image CLIP score ``[N]``: ``scale * max(100 * cos, 0)``."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        cos = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)  # (N,)
        return self.scale * (100.0 * cos).clamp(min=0.0)

    def __call__(
        self, images: Tensor, prompts: Sequence[str], *, batch_size: int = 64
    ) -> dict[str, object]:
        """Mean and std of the CLIP score, with the model, scale and sample count."""
        prompts = list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        per_image = torch.cat(
            [
                self.scores(images[i : i + batch_size], prompts[i : i + batch_size])
                for i in range(0, len(images), batch_size)
            ]
        ).double()
        values = per_image.numpy()
        return {
            f"clip_score[{self.id}]": float(np.mean(values)),
            f"clip_score_std[{self.id}]": float(np.std(values)),
            "n": len(values),
            "model": self.model_name,
            "scale": self.scale,
        }


def clip_score(
    images: Tensor,
    prompts: Sequence[str],
    model_path: str | os.PathLike,
    *,
    scale: float = 1.0,
    batch_size: int = 64,
) -> dict[str, object]:
    """CLIP score (Hessel et al. 2021) of ``images [N, C, H, W]`` against ``prompts`` (N)."""
    return CLIPScorer(model_path, scale=scale)(images, prompts, batch_size=batch_size)
