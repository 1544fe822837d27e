"""Shared network layers for difflab models.

Owns: the sinusoidal timestep embedding, ``zero_init``, the GroupNorm helper, ``Dropout``
(with a faster CPU mask than PyTorch's), the self-attention block of ADM (Dhariwal & Nichol
2021) and the cross-attention transformer block of latent diffusion (Rombach et al. 2022).
Knows nothing of noise schedules, parametrizations or training; every layer maps tensors to
tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AttentionBlock",
    "attention",
    "CrossAttention",
    "Dropout",
    "GroupNorm",
    "SpatialTransformer",
    "TransformerBlock",
    "group_norm",
    "timestep_embedding",
    "upsample_conv3x3",
    "upsample_then_conv",
    "zero_init",
]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, Ho et al. 2020, sec. B.

    ``emb[:, i] = cos(t * f_i)`` and ``emb[:, half + i] = sin(t * f_i)`` with
    ``f_i = max_period ** (-i / half)``; an odd ``dim`` gets one trailing zero column.

    :param t: timesteps ``[B]`` in training-timestep units.
    :param dim: embedding width.
    :return: float32 tensor ``[B, dim]``.
    """
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) * (
        -math.log(max_period) / half
    )
    args = t.float()[:, None] * torch.exp(exponent)[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_init(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it (ADM / DiT output layers)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (Wu & He 2018) that normalises channels_last CPU inputs in the
    contiguous layout: PyTorch's channels_last CPU kernel (forward + backward) is 1.5-4x
    (float32) and up to 17x (bfloat16) slower than the contiguous one, which more than pays
    for the two layout copies. Same parameters, same result; the output keeps the input's
    memory format."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.ndim != 4 or x.is_contiguous():
            return super().forward(x)
        if not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)


_MASK_LEVELS = 1 << 16  # the CPU dropout mask compares 16-bit random integers


class Dropout(nn.Dropout):
    """``nn.Dropout`` (Srivastava et al. 2014, inverted: kept units scaled by 1/(1 - p)) whose
    CPU mask costs 2-3x less than PyTorch's, forward and backward together.

    PyTorch draws the CPU mask with ``bernoulli_``, one generator call per element, on one
    thread; here one 64-bit draw from the same default generator (``random_``) gives four
    16-bit integers, and a unit is dropped when its integer falls in the lowest
    ``round(p·65536)`` of the 65,536 values. So p is quantised to 1/65,536 (0.1 becomes
    0.100006), and the kept units are scaled by the exact 1/(1 - p') of that p', which
    keeps E[output] = input. The mask is saved in the input's dtype, as PyTorch saves it.
    Off the CPU (CUDA's fused dropout kernel is fast), in eval mode or at p = 0 this is
    ``nn.Dropout``. The global generator is the one the trainer checkpoints, so a resumed
    run draws the same masks.

    Under ``torch.compile`` it is ``nn.Dropout`` too: the in-place ``random_`` draw cuts
    the compiled graph, and inductor generates the mask inside its fused kernel anyway.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        if torch.compiler.is_compiling():  # inductor draws (and fuses) the mask itself
            return super().forward(x)
        n = x.numel()
        draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)
        bits = draws.view(torch.int16)[:n].view(x.shape)
        dropped = round(self.p * _MASK_LEVELS)
        if dropped == _MASK_LEVELS:
            return torch.zeros_like(x)
        scale = torch.tensor(_MASK_LEVELS / (_MASK_LEVELS - dropped), dtype=x.dtype)
        keep = bits >= dropped - _MASK_LEVELS // 2  # int16 spans [-32768, 32767]
        return x * torch.where(keep, scale, torch.zeros((), dtype=x.dtype))


def group_norm(channels: int, groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm over ``channels`` with ``min(groups, channels)`` groups (ADM's GroupNorm32).

    Tiny widths (fewer channels than ``groups``) fall back to one channel per group; any
    other width must be divisible by the group count.

    :raises ValueError: when ``channels`` is not divisible by the group count.
    """
    if channels < 1 or groups < 1:
        raise ValueError(f"group_norm needs positive channels and groups, got {channels}, {groups}")
    num_groups = min(groups, channels)
    if channels % num_groups:
        raise ValueError(
            f"GroupNorm over {channels} channels cannot use {num_groups} groups "
            f"({channels} is not divisible by {num_groups}); choose norm_groups dividing every "
            f"width of the network, e.g. norm_groups={math.gcd(channels, num_groups)}"
        )
    return GroupNorm(num_groups, channels, eps=eps)


def _autocast_known(device_type: str) -> bool:
    """Whether autocast exists for ``device_type`` (not for ``meta``, say)."""
    available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.3
    return device_type in ("cpu", "cuda") if available is None else available(device_type)


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``torch.is_autocast_enabled(device)`` is
    torch >= 2.4); False on devices autocast does not know (``meta``)."""
    if not _autocast_known(device_type):
        return False
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # older torch: no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device_type == "cuda" and torch.is_autocast_enabled()


def _fold_nearest2x(weight: Tensor, dim: int) -> Tensor:
    """The 4 taps of a stride-2 transposed conv equal to nearest 2x upsampling followed by
    the 3 taps ``(w0, w1, w2)`` of ``weight`` along ``dim`` (padding 1):
    ``y[2i] = w0 x[i-1] + (w1 + w2) x[i]`` and ``y[2i+1] = (w0 + w1) x[i] + w2 x[i+1]``."""
    w0, w1, w2 = weight.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)


_FOLD_MIN_PIXELS = 128  # upsample_conv3x3 folds its kernel from B * H * W input pixels on


def upsample_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv3x3(nearest_upsample_2x(x))`` with padding 1 (DDPM's ``Upsample``), ``[B, C, H, W]
    -> [B, C_out, 2H, 2W]``.

    In float32 on CPU it runs as one stride-2 transposed convolution whose 4x4 kernel is
    folded from the 3x3 one (:func:`_fold_nearest2x`): the same linear map with 16 instead
    of 9 * 4 = 36 multiply-adds per input pixel and channel pair, and no upsampled copy
    (1.4-2x faster forward + backward with oneDNN). With reduced-precision compute (bf16/fp16
    weights or autocast) oneDNN's transposed convolution is slower than its plain one, and
    other devices are unmeasured, so the upsample-then-conv form is kept there. Folding costs
    a pass over the weights on every call, which the smaller convolution repays only from
    about ``B * H * W = 128`` input pixels (one thread, AMD EPYC AVX2, ``bench/sd_sampling.py``:
    at batch 2 the folded form took 2-9x as long on 2x2 and 4x4 inputs, as long on 8x8, half
    as long from 16x16 up); smaller inputs take the plain form too.
    """
    reduced = x.dtype != torch.float32 or weight.dtype != torch.float32
    small = x.shape[0] * x.shape[-2] * x.shape[-1] < _FOLD_MIN_PIXELS
    if x.device.type != "cpu" or reduced or small or _autocast_enabled("cpu"):
        return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    kernel = _fold_nearest2x(_fold_nearest2x(weight, -2), -1)  # (C_out, C_in, 4, 4)
    return F.conv_transpose2d(x, kernel.transpose(0, 1), bias, stride=2, padding=1)


def upsample_then_conv(conv: nn.Module, x: Tensor) -> Tensor:
    """``conv(nearest_upsample_2x(x))``, through :func:`upsample_conv3x3` when ``conv`` is a
    plain, hook-free 3x3 ``nn.Conv2d`` with padding 1; anything else (a LoRA wrapper, a
    hooked layer) is called on the upsampled input as usual."""
    if (
        type(conv) is nn.Conv2d
        and not (conv._forward_hooks or conv._forward_pre_hooks)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    ):  # a plain 3x3 convolution
        return upsample_conv3x3(x, conv.weight, conv.bias)
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _split_heads(x: Tensor, head_dim: int) -> Tensor:
    """``[B, N, H*D] -> [B, H, N, D]`` for heads ``D`` wide (``H`` follows from the width, so a
    tensor-parallel shard of the projection gives this rank's heads)."""
    b, n, _ = x.shape
    return x.view(b, n, -1, head_dim).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """``[B, H, N, D] -> [B, N, H*D]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _autocast_dtype(device_type: str) -> torch.dtype:
    """The dtype autocast lowers to on ``device_type`` (``torch.get_autocast_dtype`` is
    torch >= 2.4)."""
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype()
    return torch.get_autocast_gpu_dtype()


def _float32_attention_is_faster(q: Tensor, k: Tensor) -> bool:
    """Whether float32 beats bfloat16/float16 SDPA (forward + backward) on CPU for these
    heads. Measured with one thread on AVX-512/AMX (``bench/results/train_throughput.md``):
    reduced precision wins only for long, wide heads (2x at 256 tokens x 256 channels, 1.1x
    at 256 x 64, 1.2x at 1024 x 32) and loses up to 8x on short or narrow ones (64 tokens,
    or 256 tokens x 32 channels)."""
    tokens, width = k.shape[-2], q.shape[-1]
    return q.device.type == "cpu" and (tokens < 256 or tokens * width < 16384)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """``softmax(q k^T / sqrt(D)) v`` over ``[B, H, N, D]`` heads, with a float32 softmax.

    ADM (Dhariwal & Nichol 2021) keeps the softmax in float32 under mixed precision. PyTorch's
    SDPA kernels accumulate the softmax in float32 for bf16/fp16 inputs too, so the compute
    precision is chosen for speed: the autocast (or input) dtype, except on CPU for short or
    narrow heads, where the reduced-precision SDPA backward is up to ~10x slower than the
    float32 one (:func:`_float32_attention_is_faster`); there it runs in float32. SDPA is on
    autocast's lower-precision list, so autocast is switched off around it. ``mask``:
    boolean, broadcastable to ``[B, H, N, L]``, True = attend. Returns the dtype of ``q``.
    """
    dtype, device_type = q.dtype, q.device.type
    compute = dtype
    if _autocast_enabled(device_type):
        compute = _autocast_dtype(device_type)
    if compute != torch.float64 and _float32_attention_is_faster(q, k):
        compute = torch.float32
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    if not _autocast_known(device_type):  # e.g. "meta": no autocast to switch off
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).to(dtype)
    with torch.autocast(device_type, enabled=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).to(dtype)


def _check_heads(channels: int, heads: int) -> int:
    if heads < 1 or channels % heads:
        raise ValueError(f"{channels} attention channels cannot be split into {heads} heads")
    return heads


class AttentionBlock(nn.Module):
    """Spatial multi-head self-attention with a residual, ADM (Dhariwal & Nichol 2021).

    ``x + proj(attn(norm(x)))`` over the ``H*W`` positions, with a fused qkv projection,
    :func:`attention` and an output projection that ``UNet.initialize_weights`` zeroes so
    the block starts as the identity. Input and output ``[B, C, H, W]``.
    """

    def __init__(self, channels: int, num_heads: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.num_heads = _check_heads(channels, num_heads)
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C); free if channels_last
        q, k, v = self.qkv(tokens).view(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = _merge_heads(attention(q, k, v))  # (B, HW, C)
        out = self.proj_out(out).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class CrossAttention(nn.Module):
    """Multi-head attention of ``x [B, N, C]`` over ``context [B, L, C_ctx]`` (LDM eq. 3).

    Without a context it is self-attention. With ``fuse_qkv`` the projections are fused
    (``to_qkv`` for self-attention, ``to_q`` and ``to_kv`` for cross-attention); without it
    they are separate bias-free ``to_q``, ``to_k``, ``to_v`` layers, the layout of Stable
    Diffusion checkpoints (so LoRA files that target them map one to one). Both compute the
    same function. ``mask`` is a boolean ``[B, L]``, True = the token takes part. A row with
    every token masked out yields a zero output instead of NaN.
    """

    def __init__(
        self, dim: int, num_heads: int, context_dim: int | None = None, *, fuse_qkv: bool = True
    ) -> None:
        super().__init__()
        self.num_heads = _check_heads(dim, num_heads)
        # Heads are read off the projections' width in units of head_dim, so under tensor
        # parallelism (difflab.train.tensor_parallel) each rank runs its num_heads / N heads.
        self.head_dim = dim // num_heads
        self.is_cross = context_dim is not None
        self.fused = fuse_qkv
        if not fuse_qkv:
            source_dim = dim if context_dim is None else context_dim
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_k = nn.Linear(source_dim, dim, bias=False)
            self.to_v = nn.Linear(source_dim, dim, bias=False)
        elif context_dim is not None:
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def _qkv(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values, each ``[B, H, N or L, D]``."""
        b, n, _ = x.shape
        source = x
        if self.is_cross:
            if context is None:
                raise ValueError("cross-attention needs a context tensor [B, L, context_dim]")
            source = context
        if not self.fused:
            q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)
            d = self.head_dim
            return _split_heads(q, d), _split_heads(k, d), _split_heads(v, d)
        if self.is_cross:
            q = _split_heads(self.to_q(x), self.head_dim)
            kv = self.to_kv(source).view(b, source.shape[1], 2, -1, self.head_dim)
            k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, H, L, D)
            return q, k, v
        q, k, v = self.to_qkv(x).view(b, n, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(
        self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        q, k, v = self._qkv(x, context)
        attn_mask = keep_row = None
        if mask is not None:
            keep_row = mask.any(dim=-1)  # (B,)
            attn_mask = (mask | ~keep_row[:, None])[:, None, None, :]  # (B, 1, 1, L)
        out = self.to_out(_merge_heads(attention(q, k, v, attn_mask)))
        if keep_row is not None:
            out = out * keep_row[:, None, None].to(out.dtype)
        return out


class FeedForward(nn.Module):
    """GEGLU feed-forward ``W2 (GELU(W_g x) * W_v x)`` (Shazeer 2020), as used by LDM."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(value * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attn, cross-attn on the context, GEGLU (LDM, Rombach
    et al. 2022, appendix). Input and output tokens ``[B, N, C]``."""

    def __init__(
        self, dim: int, num_heads: int, context_dim: int, *, fuse_qkv: bool = True
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = CrossAttention(dim, num_heads, fuse_qkv=fuse_qkv)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads, context_dim, fuse_qkv=fuse_qkv)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """LDM's spatial transformer (Rombach et al. 2022): GroupNorm, project to tokens,
    ``depth`` transformer blocks conditioned on ``context``, zero-initialised projection
    back, residual. Input and output ``[B, C, H, W]``.

    Stable Diffusion's GroupNorm here uses ``norm_eps=1e-6``; its 1.x checkpoints store
    ``proj_in``/``proj_out`` as 1x1 convolutions, the same linear map as these ``Linear``
    layers (the interop key mappings reshape the weights).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        context_dim: int,
        depth: int = 1,
        norm_groups: int = 32,
        *,
        norm_eps: float = 1e-5,
        fuse_qkv: bool = True,
    ) -> None:
        super().__init__()
        self.norm = group_norm(channels, norm_groups, eps=norm_eps)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(
            TransformerBlock(channels, num_heads, context_dim, fuse_qkv=fuse_qkv)
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        for block in self.blocks:
            tokens = block(tokens, context, mask)
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)
