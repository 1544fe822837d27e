"""Every network difflab ships traces under ``torch.compile`` as ONE graph: no graph break
in training (dropout on, gradient checkpointing on and off, channels-last, bf16 autocast) nor
in sampling (eval, no grad, bf16 weights), for the U-Net (class and cross-attention
conditioning), the KL autoencoder, the text transformer and the text-conditioned U-Net.

``torch._dynamo.explain`` traces without compiling (a few seconds per network on one CPU
core); a break would split the compiled step into several graphs with Python in between.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from difflab.models import AutoencoderKL, UNet, UNetConfig, VAEConfig
from difflab.models.layers import Dropout
from difflab.models.text import TextConditionedUNet, TextConfig, TextTransformer

pytestmark = pytest.mark.compile

TINY = dict(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(4,), num_heads=2, norm_groups=4, dropout=0.1)  # fmt: skip
X, T = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 870.0])
CONTEXT = torch.randn(2, 5, 16)
CONTEXT_MASK = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]).bool()  # an all-masked row too


def graph_breaks(fn, *args, **kwargs) -> list[str]:
    """The graph breaks ``torch._dynamo.explain`` finds in ``fn(*args, **kwargs)``, each as
    'reason @ file:line'."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args, **kwargs)
    out = []
    for b in explanation.break_reasons:
        where = b.user_stack[-1] if b.user_stack else None
        line = f"{where.filename}:{where.lineno}" if where else "?"
        out.append(f"{b.reason.splitlines()[0]} @ {line}")
    assert len(out) == explanation.graph_break_count
    return out


def test_the_check_sees_a_break():
    """The harness itself: an in-place random draw (the old CPU dropout mask) is a break."""

    def draw(x):
        return x * torch.empty(x.shape, dtype=torch.int16).random_().float()

    assert len(graph_breaks(draw, X)) == 1


def test_dropout_mask_traces_and_keeps_the_cpu_mask_in_eager():
    layer = Dropout(0.3).train()
    assert graph_breaks(layer, X) == []
    torch.manual_seed(0)
    eager = layer(torch.ones(4096))
    dropped = round(0.3 * 65536) / 65536  # the 16-bit mask's p: still used outside compile
    assert torch.equal(eager[eager != 0], torch.full_like(eager[eager != 0], 1 / (1 - dropped)))


@pytest.mark.parametrize(
    "checkpointing, channels_last, bf16",
    [(False, False, False), (True, True, True), (True, False, False), (False, True, True)],
    ids=["plain", "ckpt-cl-bf16", "ckpt", "cl-bf16"],
)
def test_unet_training_step_traces_as_one_graph(checkpointing, channels_last, bf16):
    model = UNet(UNetConfig(**TINY, num_classes=3, use_checkpoint=checkpointing)).train()
    x = X
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = X.contiguous(memory_format=torch.channels_last)
    amp = torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext()
    with amp:
        assert graph_breaks(model, x, T, class_labels=torch.tensor([0, 3])) == []


def test_cross_attention_unet_traces_in_training_and_in_sampling():
    cfg = UNetConfig(**TINY, context_dim=16, resblock_updown=True, use_scale_shift_norm=False)
    model = UNet(cfg).train()
    assert graph_breaks(model, X, T, context=CONTEXT, context_mask=CONTEXT_MASK) == []
    model = model.eval().to(torch.bfloat16, memory_format=torch.channels_last)
    with torch.no_grad():  # a sampler's call: eval, no grad, bf16 weights, a scalar t
        assert graph_breaks(model, X.bfloat16(), 500.0, context=CONTEXT.bfloat16()) == []


def test_autoencoder_traces_in_training_and_in_sampling():
    cfg = VAEConfig(in_channels=1, out_channels=1, block_out_channels=(8, 16), latent_channels=2,
                    norm_groups=4)  # fmt: skip
    vae = AutoencoderKL(cfg).train()
    noise = torch.randn(2, 2, 4, 4)
    assert graph_breaks(vae, X, noise=noise) == []  # a posterior sample, noise given
    vae.eval()
    with torch.no_grad():
        assert graph_breaks(vae.encode, X) == []
        assert graph_breaks(vae.decode, noise) == []


def test_text_encoder_and_text_conditioned_unet_trace():
    text = TextTransformer(10, TextConfig("transformer", width=16, layers=2, heads=2,
                                          max_length=5))  # fmt: skip
    ids = torch.randint(0, 10, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool()
    model = TextConditionedUNet(UNet(UNetConfig(**TINY, context_dim=16)), text).train()
    assert graph_breaks(model, X, T, input_ids=ids, attention_mask=mask) == []
    model.eval()
    with torch.no_grad():
        assert graph_breaks(model.text, ids, mask) == []
        assert graph_breaks(model, X, T, context=CONTEXT, context_mask=CONTEXT_MASK) == []
