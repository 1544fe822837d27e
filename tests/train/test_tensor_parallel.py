"""Tensor parallelism (``train.tensor_parallel``): 2 gloo ranks split the DiT blocks.

One ``torchrun`` launch (module fixture) runs every 2-rank job; the tests compare them with
one-process runs of the same config and global batch:

- T: DiT, TP=2 on a 1x2 ("dp", "tp") mesh (FSDP over a 1-rank "dp"), 4 steps, grad
  accumulation 2, clipping, importance sampling -> equals the one-process run S.
- U: T's config cut after step 2 and resumed on 2 ranks -> bit-exact with T.
- V: cut after step 2 under TP, resumed here in one process without TP -> equals S.
- W: TP alone (train.parallel=ddp, all ranks in one TP group) -> bit-exact with T.
- M12 / M21: three clipped AdamW steps of a DiT with cross-attention on a 1x2 and a 2x1
  mesh (tests/train/tp_step.py) -> equal the same steps in one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchrun_helpers import run_once_more_on_exit_abort, torchrun, worker_env
from tp_step import mesh_steps
from train_helpers import ToyData, one_thread, tiny_dit_config  # noqa: F401

from difflab.train import Trainer, load_checkpoint, train

HERE = Path(__file__).parent
BASE = [
    "train.max_steps=4",
    "train.grad_accum=2",
    "train.grad_clip=0.5",
    "diffusion.cond_drop_prob=0.3",
    "diffusion.timestep_sampler=importance",
]
TP = [*BASE, "train.parallel=fsdp", "train.tensor_parallel=2"]
WEIGHTS = ("model.safetensors", "ema.safetensors")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Run directories T, U, V, W (2 ranks, one launch), S (one process), V resumed; and
    the weight files of the mesh jobs M12 / M21."""
    root = tmp_path_factory.mktemp("tp")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    dirs = {k: root / k for k in ("T", "U", "V", "W", "S")}
    dirs |= {k: root / f"{k}.safetensors" for k in ("M12", "M21")}
    jobs = [
        {"mesh": [1, 2], "out": str(dirs["M12"])},
        {"mesh": [2, 1], "out": str(dirs["M21"])},
        {"dir": str(dirs["T"]), "opts": TP, "dit": True},
        {"dir": str(dirs["U"]), "opts": TP, "dit": True, "cut": 2, "then_resume": True},
        {"dir": str(dirs["V"]), "opts": TP, "dit": True, "cut": 2},
        {"dir": str(dirs["W"]), "opts": [*BASE, "train.tensor_parallel=2"], "dit": True},
    ]
    cmd = torchrun(str(HERE / "fsdp_jobs.py"), json.dumps(jobs))
    proc = run_once_more_on_exit_abort(cmd, worker_env(HERE), 300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (root / "stdout.txt").write_text(proc.stdout)
    train(tiny_dit_config(dirs["S"], *BASE), dataset=ToyData())
    train(tiny_dit_config(dirs["V"], *BASE), dataset=ToyData(), resume=True)  # TP -> 1
    torch.set_num_threads(before)
    return dirs


def _weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(run_dir / name) for name in WEIGHTS}


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    return max(float((wa[n][k] - wb[n][k]).abs().max()) for n in WEIGHTS for k in wa[n])


def test_tp2_training_equals_one_process(runs):
    """Weights and EMA of 4 AdamW steps (2 micro-batches each, clipped, importance-sampled
    timesteps) with the DiT blocks split over 2 ranks == one process, to 1e-5."""
    t, s = _weights(runs["T"]), _weights(runs["S"])
    for name in WEIGHTS:
        assert t[name].keys() == s[name].keys()
        for k in t[name]:
            torch.testing.assert_close(t[name][k], s[name][k], rtol=0, atol=1e-5)
    assert float(s["model.safetensors"]["blocks.0.attn.to_qkv.weight"].abs().max()) > 0.1
    meta = load_checkpoint(runs["T"]).meta
    assert meta["sharded"]["world_size"] == 2 and meta["step"] == 4


def test_tp_alone_without_fsdp_setting_equals_tp_with_fsdp(runs):
    """train.parallel=ddp with every rank in the TP group runs the same 1x2 mesh."""
    a, b = _weights(runs["T"]), _weights(runs["W"])
    for name in WEIGHTS:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)


def test_tp_same_layout_resume_is_bit_exact(runs):
    """DCP checkpoint of the TP-split model cut after step 2, resumed on the same mesh."""
    a, b = _weights(runs["T"]), _weights(runs["U"])
    for name in WEIGHTS:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    finals = [line for line in (runs["T"].parent / "stdout.txt").read_text().splitlines()
              if line.startswith("FINAL")]  # fmt: skip
    assert finals[0] == finals[1]  # T's and U's last loss, printed by rank 0


def test_tp_checkpoint_resumes_in_one_process(runs):
    """DCP reshards the strided (fused q/k/v) and column/row shards back to whole tensors."""
    assert _max_diff(runs["V"], runs["S"]) <= 1e-5
    assert load_checkpoint(runs["V"]).meta["world_size"] == 1


@pytest.mark.parametrize("mesh", ["M12", "M21"])
def test_fsdp_x_tp_mesh_step_equals_one_process(runs, mesh):
    """1x2 (TP only) and 2x1 (FSDP only, on the 2-D mesh) == one process, to 1e-5."""
    got, want = load_file(runs[mesh]), mesh_steps(None)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5)


def test_local_heads_follow_the_projection_width():
    """A column shard of to_qkv ([q_r; k_r; v_r], half the heads) attends with its own
    heads: concatenating the two halves' outputs gives the whole layer's pre-projection."""
    from difflab.models.layers import CrossAttention

    attn = CrossAttention(16, 4)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    seen = {}
    attn.to_out.register_forward_hook(lambda m, inp, out: seen.setdefault("full", inp[0]))
    attn(x)
    w = attn.to_qkv.weight.detach().view(3, 2, 8, 16)  # (q/k/v, rank, rows, in)
    halves = []
    for r in range(2):
        part = CrossAttention(8, 2)  # same head width 4
        part.to_qkv = torch.nn.Linear(16, 24, bias=False)
        part.to_qkv.weight.data = w[:, r].reshape(24, 16)
        part.to_out = torch.nn.Identity()
        halves.append(part(x))
    torch.testing.assert_close(torch.cat(halves, dim=-1), seen["full"])


def test_tensor_parallel_is_validated(tmp_path):
    from difflab.train import load_config
    from difflab.train.tensor_parallel import check_tensor_parallel

    with pytest.raises(ValueError, match="tensor_parallel"):
        load_config(None, ["train.tensor_parallel=0"])
    assert load_config(None, []).train.tensor_parallel == 1
    with pytest.raises(ValueError, match="divisible"):  # one process cannot hold 2 TP ranks
        Trainer.from_config(tiny_dit_config(tmp_path, "train.tensor_parallel=2"), dataset=ToyData())
    from difflab.models.dit import DiT, DiTConfig
    from difflab.models.unet import UNet, UNetConfig

    unet = UNet(UNetConfig.preset("tiny", image_size=8, model_channels=16, norm_groups=4))
    with pytest.raises(ValueError, match="DiT blocks"):
        check_tensor_parallel(unet, 2, 2)
    dit = DiT(DiTConfig(image_size=8, patch_size=2, hidden_size=36, depth=1, num_heads=3))
    with pytest.raises(ValueError, match="num_heads=3"):
        check_tensor_parallel(dit, 2, 2)
    with pytest.raises(ValueError, match="divisible"):
        check_tensor_parallel(dit, 3, 4)


def test_memory_probe_leaves_the_dit_with_real_tensors():
    """The start-of-run memory report runs the DiT on fake tensors; its position-embedding
    cache must not keep the fake grid (a later real forward would come out fake)."""
    from difflab.models.dit import DiT, DiTConfig
    from difflab.train.memory import model_activation_bytes

    dit = DiT(DiTConfig(image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=1,
                        num_heads=2))  # fmt: skip
    assert model_activation_bytes(dit, 2) > 0
    out = dit(torch.zeros(2, 1, 8, 8), torch.zeros(2))
    assert type(out) is torch.Tensor
