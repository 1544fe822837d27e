"""A tiny run directory (config.yaml + safetensors weights) for the pipeline and CLI tests."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from difflab.models import UNet, UNetConfig


def tiny_unet(num_classes: int | None = 10, seed: int = 0, **overrides) -> UNet:
    """The 8x8 ``tiny`` preset with weights perturbed away from the zero-output init."""
    model = UNet(UNetConfig.preset("tiny", num_classes=num_classes, **overrides))
    gen = torch.Generator().manual_seed(seed)
    model.initialize_weights(gen)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def make_tiny_run(
    run_dir: Path,
    num_classes: int | None = 10,
    *,
    sampler: str = "ddim",
    steps: int = 4,
    guidance_scale: float = 2.0,
) -> Path:
    """Write ``config.yaml``, ``ema.safetensors`` and ``model.safetensors`` (different weights)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ema = tiny_unet(num_classes, seed=0)
    raw = tiny_unet(num_classes, seed=1)
    save_file(ema.state_dict(), str(run_dir / "ema.safetensors"), metadata={"step": "3"})
    save_file(raw.state_dict(), str(run_dir / "model.safetensors"), metadata={"step": "3"})
    config = {
        "seed": 0,
        "run_dir": str(run_dir),
        "model": ema.config.to_dict(),
        "diffusion": {
            "schedule": {"name": "cosine", "T": 1000},
            "prediction": "eps",
            "variance": "fixedsmall",
        },
        "data": {"source": "digits", "image_size": 8, "channels": 1},
        "sample": {"sampler": sampler, "steps": steps, "guidance_scale": guidance_scale},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run_dir
