"""Loading never draws from the caller's global RNG (the networks' random initialisation is
overwritten by the loaded weights), so a training run that loads a base or a prior mid-way
trains the same as one that does not."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent / "train"))
from train_helpers import ToyData, tiny_config  # noqa: E402

import difflab as dl  # noqa: E402
from difflab.finetune import add_lora, load_lora, save_lora  # noqa: E402
from difflab.models import AutoencoderKL, VAEConfig  # noqa: E402
from difflab.train import train  # noqa: E402


def _unchanged(load) -> bool:
    torch.manual_seed(123)
    load()
    after = torch.rand(4)
    torch.manual_seed(123)
    return torch.equal(after, torch.rand(4))


def test_loaders_leave_the_global_rng_alone(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, "train.max_steps=1"), dataset=ToyData(), progress=False)
    assert _unchanged(lambda: dl.Pipeline.from_run(run))

    vae = AutoencoderKL(VAEConfig(in_channels=1, out_channels=1, block_out_channels=(8,),
                                  latent_channels=2, norm_groups=4))  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    assert _unchanged(lambda: AutoencoderKL.from_pretrained(tmp_path / "vae"))

    pipe = dl.Pipeline.from_run(run)
    add_lora(pipe.model, rank=2, targets="conv", generator=torch.Generator().manual_seed(0))
    path = save_lora(pipe.model, tmp_path / "a.safetensors")
    fresh = dl.Pipeline.from_run(run)
    assert _unchanged(lambda: load_lora(fresh.model, path))


def test_autoencoder_generator_init_is_complete_and_leaves_the_global_rng_alone():
    """``AutoencoderKL(generator=g)`` draws every weight and bias from ``g``: the same
    network whatever the global RNG's state, which it does not advance."""
    cfg = VAEConfig(in_channels=1, out_channels=1, block_out_channels=(8, 16),
                    latent_channels=2, norm_groups=4)  # fmt: skip

    def build() -> dict[str, torch.Tensor]:
        return AutoencoderKL(cfg, generator=torch.Generator().manual_seed(0)).state_dict()

    assert _unchanged(build)
    torch.manual_seed(1)
    a = build()
    torch.manual_seed(2)
    b = build()
    assert all(torch.equal(a[k], b[k]) for k in a)
    biases = [k for k in a if k.endswith(".bias") and "norm" not in k]
    assert biases and all(a[k].abs().sum() > 0 for k in biases)  # drawn, not left at zero
