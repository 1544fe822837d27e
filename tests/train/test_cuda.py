"""Training and sampling on a CUDA device: the same results as on CPU, fp16 + GradScaler for
real, and resume on the GPU.

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest tests/train/test_cuda.py``
(``bench/gpu_check.sh`` does, with ``CUBLAS_WORKSPACE_CONFIG`` set for the deterministic test).
TF32 is switched off here so that float32 on the GPU agrees with the CPU to float32 rounding.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import ToyData, one_thread, tiny_config, train_with_a_cut  # noqa: F401

from difflab.models.layers import attention
from difflab.pipeline import Pipeline
from difflab.train import Trainer, load_checkpoint, train

sys.path.insert(0, str(Path(__file__).parents[1]))
from _tiny_run import make_tiny_run  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NO_DROPOUT = ["model.dropout=0", "diffusion.cond_drop_prob=0.2"]  # dropout draws device RNG


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir).model


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_cuda_training_matches_cpu(tmp_path):
    """Same seed, data, noise and timesteps (drawn by CPU generators) on both devices: the
    losses agree to float32 rounding and the weights stay within a few AdamW steps' noise."""
    opts = [*NO_DROPOUT, "train.max_steps=6"]
    cpu = train(tiny_config(tmp_path / "cpu", *opts, "train.device=cpu"), dataset=ToyData())
    gpu = train(tiny_config(tmp_path / "gpu", *opts, "train.device=cuda"), dataset=ToyData())
    assert gpu.losses[0] == pytest.approx(cpu.losses[0], rel=1e-5)
    assert gpu.losses == pytest.approx(cpu.losses, rel=1e-3)
    # AdamW moves each weight by at most ~lr per step whatever the gradient's size, so 6
    # steps bound any difference by 6 * 2 * lr = 2.4e-3; agreement is far tighter.
    assert _max_diff(_weights(tmp_path / "cpu"), _weights(tmp_path / "gpu")) < 1e-4
    # The run trained on the GPU loads anywhere: the checkpoint is plain CPU tensors.
    assert all(t.device.type == "cpu" for t in _weights(tmp_path / "gpu").values())


def test_cuda_resume_is_bit_exact_in_deterministic_mode(tmp_path):
    """2N steps equal N + resume + N on the GPU, dropout (CUDA RNG) included, when torch's
    deterministic algorithms are on; the checkpoint restores the CUDA RNG state."""
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") is None:
        pytest.skip("set CUBLAS_WORKSPACE_CONFIG=:4096:8 for deterministic cuBLAS")
    torch.use_deterministic_algorithms(True)
    try:
        opts = ["train.device=cuda", "model.dropout=0.1", "train.max_steps=8"]
        data = ToyData(24)
        full = train(tiny_config(tmp_path / "full", *opts), dataset=data)
        rest = train_with_a_cut(tiny_config(tmp_path / "split", *opts), 4, dataset=data)
    finally:
        torch.use_deterministic_algorithms(False)
    assert rest.losses == full.losses[4:]
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "split")
    assert "rank0.torch_cuda" in a.rng
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    for k in a.ema:
        assert torch.equal(a.ema[k], b.ema[k]), k


def test_cuda_resume_in_default_mode_agrees_to_rounding(tmp_path):
    """Without deterministic algorithms some CUDA kernels (atomic adds) may round
    differently from run to run; a resumed run still follows the uninterrupted one."""
    opts = ["train.device=cuda", *NO_DROPOUT, "train.max_steps=8"]
    data = ToyData(24)
    full = train(tiny_config(tmp_path / "full", *opts), dataset=data)
    rest = train_with_a_cut(tiny_config(tmp_path / "split", *opts), 4, dataset=data)
    assert rest.losses == pytest.approx(full.losses[4:], rel=1e-4)
    assert _max_diff(_weights(tmp_path / "full"), _weights(tmp_path / "split")) < 1e-4


def test_fp16_with_grad_scaler_on_cuda(tmp_path):
    """mixed_precision=fp16 on CUDA is fp16 autocast + GradScaler, with no fallback: finite
    losses near the float32 run's; N + resume + N restores the scale and follows 2N."""
    opts = ["train.device=cuda", *NO_DROPOUT, "train.max_steps=10"]
    data = ToyData(24)
    ref = train(tiny_config(tmp_path / "fp32", *opts), dataset=data)
    fp16_opts = [*opts, "train.mixed_precision=fp16"]
    full = train(tiny_config(tmp_path / "full", *fp16_opts), dataset=data)
    trainer = Trainer.from_config(tiny_config(tmp_path / "split", *fp16_opts), dataset=data)
    try:
        assert trainer.precision.mode == "fp16" and trainer.scaler.is_enabled()
        trainer.run(stop_at=5)
    finally:
        trainer.close()
    rest = train(tiny_config(tmp_path / "split", *fp16_opts), dataset=data, resume=True)
    a, b = load_checkpoint(tmp_path / "full").meta, load_checkpoint(tmp_path / "split").meta
    assert a["scaler"]["scale"] == b["scaler"]["scale"] > 0
    assert rest.losses == pytest.approx(full.losses[5:], rel=1e-3)
    assert full.losses == pytest.approx(ref.losses, rel=2e-2)  # fp16 rounding only


def test_bf16_on_cuda_follows_float32(tmp_path):
    opts = ["train.device=cuda", *NO_DROPOUT, "train.max_steps=6"]
    ref = train(tiny_config(tmp_path / "fp32", *opts), dataset=ToyData())
    bf16 = train(
        tiny_config(tmp_path / "bf16", *opts, "train.mixed_precision=bf16"), dataset=ToyData()
    )
    assert bf16.losses == pytest.approx(ref.losses, rel=3e-2)


def test_channels_last_on_cuda_equals_contiguous(tmp_path):
    opts = ["train.device=cuda", *NO_DROPOUT, "train.max_steps=4"]
    a = train(tiny_config(tmp_path / "a", *opts), dataset=ToyData())
    b = train(tiny_config(tmp_path / "b", *opts, "train.channels_last=true"), dataset=ToyData())
    assert b.losses == pytest.approx(a.losses, rel=1e-4)


@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral"])  # deterministic and ancestral
def test_pipeline_samples_the_same_images_on_cuda_and_cpu(tmp_path, sampler):
    """Noise comes from per-image CPU generators, so a seed gives one image on any device."""
    run = make_tiny_run(tmp_path / "run", sampler=sampler)
    cpu = Pipeline.from_run(run)(n=4, class_labels=[0, 1, 2, 3], seed=3)
    gpu = Pipeline.from_run(run, device="cuda")(n=4, class_labels=[0, 1, 2, 3], seed=3)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_pipeline_on_cuda(tmp_path, dtype):
    run = make_tiny_run(tmp_path / "run")
    full = Pipeline.from_run(run, device="cuda")(n=8, class_labels=3, seed=0)
    half = Pipeline.from_run(run, device="cuda").to(dtype=dtype)(n=8, class_labels=3, seed=0)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert 0 < (half - full).abs().mean() < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 4, 64, 32), (2, 1, 1024, 64), (2, 8, 256, 128)])
def test_attention_under_autocast_on_cuda(dtype, shape):
    """The autocast dtype reaches SDPA (flash / memory-efficient kernels) and the result
    matches float64 attention to that dtype's rounding."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape, device="cuda", generator=gen) for _ in range(3))
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / shape[-1] ** 0.5, -1)
    ref = ref @ v.double()
    with torch.autocast("cuda", dtype=dtype):
        out = attention(q, k, v)
    assert out.dtype == torch.float32
    err = (out.double() - ref).norm() / ref.norm()
    assert err < (1e-2 if dtype == torch.bfloat16 else 2e-3)


class _SyncWatch(torch.nn.Module):
    """Calls the network; after its first call (set-up done) any host wait raises."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, t, **cond):
        out = self.inner(x, t, **cond)
        torch.cuda.set_sync_debug_mode("error")
        return out


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler_ancestral", "dpmpp_2m_sde", "unipc",
                                  "dpmpp_3m", "heun", "lms", "pndm", "dpm_solver"])  # fmt: skip
def test_sampling_loop_never_waits_for_the_gpu(name):
    """USER_NEEDS 10 on CUDA: from the first network call on, no synchronisation, ancestral
    noise from CPU generators included (it travels through pinned memory)."""
    from _tiny_run import tiny_unet

    import difflab as dl
    from difflab.samplers.common import randn

    model = _SyncWatch(tiny_unet(num_classes=10).cuda().eval())
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    labels = torch.tensor([1, 2, 3, 4], device="cuda")
    try:
        with torch.inference_mode():
            out = dl.sample(
                model, schedule=dl.NoiseSchedule.cosine(1000), sampler=name, steps=8,
                noise=randn((4, 1, 8, 8), gens, device="cuda"), generator=gens,
                guidance_scale=2.0, cond={"class_labels": labels},
                uncond={"class_labels": torch.full_like(labels, 10)}, clip_x0=True,
                progress=False,
            )  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out).all()
