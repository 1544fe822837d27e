"""Distributed: 2 gloo processes under torchrun equal one process with the same global batch."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchrun_helpers import run_once_more_on_exit_abort, torchrun, worker_env
from train_helpers import (  # noqa: F401
    ToyData,
    one_thread,
    save_tiny_clip,
    tiny_config,
    write_captioned_images,
)

from difflab.train import load_checkpoint, train

HERE = Path(__file__).parent
OPTS = [
    "model.dropout=0",  # dropout masks come from each rank's own global RNG
    "train.max_steps=3",
    "train.grad_accum=2",
    "diffusion.cond_drop_prob=0.3",
    "diffusion.timestep_sampler=importance",
]

SCRIPT = """
import os
import sys
import torch
torch.set_num_threads(1)
from train_helpers import ToyData, tiny_config
from difflab.train import train
dataset = ToyData() if sys.argv[2] in ("toy", "latent") else None  # None: the config's
result = train(tiny_config(sys.argv[1], *sys.argv[3:]), dataset=dataset)
if os.environ["RANK"] == "0":  # one writer: two ranks' lines can interleave on one pipe
    print("FINAL", result.final_loss, flush=True)
"""


TEXT = [
    "model.num_classes=null",
    "data.source=digits",
    "text.encoder=transformer",
    "text.width=16",
    "text.heads=2",
    "text.layers=1",
    "text.max_length=8",
]


def _latent_opts(folder):
    """A random autoencoder (8 -> 4 px, 2 latent channels); posterior sampling on."""
    from difflab.models import AutoencoderKL, VAEConfig

    cfg = VAEConfig(in_channels=1, out_channels=1, block_out_channels=(8, 8), latent_channels=2,
                    norm_groups=4, scaling_factor=1.0)  # fmt: skip
    AutoencoderKL(cfg, generator=torch.Generator().manual_seed(0)).save_pretrained(folder)
    return [f"latent.vae={folder}", "model.image_size=4", "model.in_channels=2",
            "model.attention_resolutions=[2]"]  # fmt: skip


def _clip_inversion_opts(tmp_path: Path) -> list[str]:
    """Textual inversion through a frozen tiny CLIP: a base CLIP run, and eight captioned
    images of the new word (its vector is used outside DDP's forward, inside CLIP)."""
    pytest.importorskip("transformers")
    clip = save_tiny_clip(tmp_path / "clip")
    text = ["model.num_classes=null", "text.encoder=clip", f"text.path={clip}",
            "text.max_length=32"]  # fmt: skip
    base = tmp_path / "base"
    train(tiny_config(base, *text, "data.source=digits", "train.max_steps=3"), progress=False)
    folder = write_captioned_images(tmp_path / "instance", ["a digit sks"] * 8)
    return [*text, "data.source=captions", f"data.path={folder}", "data.image_size=8",
            f"finetune.base_run={base}", "finetune.targets=none", "finetune.new_word=sks",
            "finetune.init_word=a", "train.lr=1e-2"]  # fmt: skip


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
@pytest.mark.parametrize("kind", ["toy", "text", "latent", "clip_inversion"])
def test_two_gloo_ranks_equal_one_process(tmp_path, kind):
    """Class labels on toy data; captions through the text encoder (every rank builds
    the same vocabulary from the digits' captions); autoencoder latents (the posterior
    noise is drawn for the global batch, so each rank's rows match one process); a
    textual-inversion word trained through a frozen CLIP."""
    opts = {"toy": OPTS, "text": [*OPTS, *TEXT]}.get(kind)
    if kind == "latent":
        opts = [*OPTS, *_latent_opts(tmp_path / "vae")]
    if kind == "clip_inversion":
        opts = [*OPTS, *_clip_inversion_opts(tmp_path)]
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    cmd = torchrun(str(script), str(tmp_path / "ddp"), kind, *opts)
    proc = run_once_more_on_exit_abort(cmd, worker_env(HERE), 120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    data = ToyData() if kind in ("toy", "latent") else None
    single = train(tiny_config(tmp_path / "single", *opts), dataset=data)
    ddp_loss = float(proc.stdout.split("FINAL")[-1].split()[0])
    assert ddp_loss == pytest.approx(single.final_loss, rel=1e-5)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(tmp_path / "ddp" / name), load_file(tmp_path / "single" / name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    if kind == "clip_inversion":  # the word really trained, in both
        base = load_file(tmp_path / "single" / "model.safetensors")["ti_word"]
        from difflab.models.text import PretrainedTextEncoder

        init = PretrainedTextEncoder(tmp_path / "clip").word_embedding("a")
        assert (base - init).abs().max() > 1e-3
    meta = load_checkpoint(tmp_path / "ddp").meta
    assert meta["world_size"] == 2 and meta["step"] == 3 and meta["ema_updates"] == 3
