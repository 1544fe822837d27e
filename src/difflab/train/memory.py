"""Per-rank memory of a training run: parameters, gradients, optimiser state, EMA, activations.

Owns the arithmetic printed at the start of ``train`` and used by ``bench/memory_scale.py``:
under DDP every rank holds the whole model state; under FSDP (``difflab.train.fsdp``) each
holds ``1/N`` of parameters, gradients, AdamW moments and EMA (ZeRO-3, Rajbhandari et al.
2020, Table 1) plus, while a unit computes, that unit's gathered parameters and gradients.
Activations are measured, not guessed: one forward of the per-rank micro-batch runs on fake
tensors (no memory allocated) and the tensors autograd saves for backward are summed.
Also owns :func:`shard_units`, which submodules FSDP shards (used by
:mod:`difflab.train.fsdp`).  Knows nothing of the loop; works on meta-device models
(shapes only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "MemoryReport",
    "activation_bytes",
    "memory_report",
    "model_activation_bytes",
    "shard_units",
]

ADAM_STATES = 2  # exp_avg, exp_avg_sq (fp32)


@dataclass(frozen=True)
class MemoryReport:
    """Bytes per rank.

    :param parallel: ``ddp`` or ``fsdp`` (``ddp`` with one rank: one process).
    :param world_size: ranks.
    :param params / grads / optimizer / ema: persistent model state on one rank.
    :param gathered: FSDP's transient full copy of the largest unit (params + grads, in the
        compute dtype); 0 under DDP.
    :param activations: what autograd saves in one micro-batch's forward (None: not
        measured).
    """

    parallel: str
    world_size: int
    num_params: int
    params: int
    grads: int
    optimizer: int
    ema: int
    gathered: int
    activations: int | None

    @property
    def model_state(self) -> int:
        """Parameters + gradients + optimiser state + EMA: what sharding divides by N."""
        return self.params + self.grads + self.optimizer + self.ema

    @property
    def total(self) -> int:
        return self.model_state + self.gathered + (self.activations or 0)

    def format(self) -> str:
        """One line per item, in MiB."""

        def mib(n: int | None) -> str:
            return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"

        how = f"{self.parallel} x{self.world_size}" if self.world_size > 1 else "one process"
        rows = [
            f"memory per rank ({how}, {self.num_params:,} parameters):",
            f"  parameters {mib(self.params)}, gradients {mib(self.grads)}, "
            f"optimizer {mib(self.optimizer)}, EMA {mib(self.ema)}",
            f"  gathered unit {mib(self.gathered)}, activations {mib(self.activations)} "
            f"(one micro-batch); total {mib(self.total)}",
        ]
        return "\n".join(rows)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules ``difflab.train.fsdp`` makes FSDP units: every U-Net ``Stage`` and
    every ``DiTBlock`` (in module order; the root is sharded separately and holds the rest)."""
    from ..models.dit import DiTBlock
    from ..models.unet import Stage

    return [m for m in model.modules() if isinstance(m, (Stage, DiTBlock)) and m is not model]


def _unit_sizes(model: nn.Module) -> list[int]:
    """Parameter counts of the FSDP units (their own, nested units excluded) and the root."""
    units = shard_units(model)
    inner = {id(p) for u in units for p in u.parameters()}
    sizes = [sum(p.numel() for p in u.parameters()) for u in units]
    sizes.append(sum(p.numel() for p in model.parameters() if id(p) not in inner))
    return sizes


def memory_report(
    model: nn.Module,
    *,
    parallel: str,
    world_size: int,
    compute_dtype: torch.dtype | None = None,
    activations: int | None = None,
) -> MemoryReport:
    """The per-rank memory of training ``model`` (unsharded, any device, meta included).

    :param compute_dtype: FSDP's ``MixedPrecisionPolicy`` dtype of gathered units (None:
        the parameters' own).
    :param activations: bytes from :func:`activation_bytes`, when measured.
    """
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    size = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    fp32_train = sum(p.numel() * 4 for p in params if p.requires_grad)
    shards = world_size if parallel == "fsdp" else 1
    gathered = 0
    if parallel == "fsdp" and world_size > 1:
        item = torch.empty((), dtype=compute_dtype).element_size() if compute_dtype else 4
        gathered = 2 * max(_unit_sizes(model)) * item  # the unit's params and its grads
    return MemoryReport(
        parallel=parallel if world_size > 1 else "ddp",
        world_size=world_size,
        num_params=n,
        params=-(-size // shards),
        grads=-(-trainable // shards),
        optimizer=-(-ADAM_STATES * fp32_train // shards),
        ema=-(-size // shards),
        gathered=gathered,
        activations=activations,
    )


def activation_bytes(run: Callable[[], Tensor]) -> int | None:
    """Bytes autograd saves for backward while ``run()`` computes a loss, measured under
    ``FakeTensorMode`` (shapes only; nothing is allocated); None when the forward cannot run
    on fake tensors.  ``run`` makes its inputs itself (inside the fake mode)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    saved: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        base = t._base if t._base is not None else t
        if isinstance(t, FakeTensor) and not (base.is_leaf and base.requires_grad):
            saved.append(t)  # parameters (and their views) are counted as parameters
        return t

    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                run()
            # every saved tensor is alive here: one storage is one allocation
            sizes = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in saved}
    except Exception:  # noqa: BLE001 - an op without a fake kernel: report "n/a"
        return None
    return sum(sizes.values())


def model_activation_bytes(model: nn.Module, batch: int, precision: object = None) -> int | None:
    """:func:`activation_bytes` of one forward of ``model`` (a difflab U-Net or DiT, read
    through its ``config``) on a micro-batch of ``batch`` random images (class labels and a
    77-token context when the model takes them), under ``precision``'s autocast."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "in_channels") or not hasattr(cfg, "image_size"):
        return None
    param = next(model.parameters(), None)
    dev = param.device if param is not None else torch.device("cpu")
    autocast = getattr(precision, "autocast", None)

    def run() -> Tensor:
        x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=dev)
        t = torch.rand(batch, device=dev)
        kwargs: dict[str, Tensor] = {}
        if getattr(cfg, "num_classes", None) is not None:
            kwargs["class_labels"] = torch.zeros(batch, dtype=torch.long, device=dev)
        if getattr(cfg, "context_dim", None) is not None:
            kwargs["context"] = torch.randn(batch, 77, cfg.context_dim, device=dev)
        with autocast() if autocast is not None else contextlib.nullcontext():
            return model(x, t, **kwargs).float().square().mean()

    return activation_bytes(run)
