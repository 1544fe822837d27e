"""Tensor parallelism (``train.tensor_parallel: N``) of the DiT blocks, composed with FSDP2.

Owns how one DiT block's projections are split over a group of ``N`` ranks (Megatron-LM's
layout: Shoeybi et al. 2019, sec. 3) through DTensor's ``parallelize_module``, and the 2-D
device mesh ``("dp", "tp")`` on which FSDP2 then shards every parameter over ``"dp"``
(torchtitan's layout: TP inside a group, FSDP across groups):

- attention: ``to_q``/``to_k``/``to_v`` column-wise (``ColwiseParallel``: each rank computes
  its ``num_heads / N`` heads), ``to_out`` row-wise (``RowwiseParallel``: one all-reduce of
  the block's ``[B, N, D]`` output).  The fused projections difflab's DiT uses (``to_qkv``,
  and ``to_kv`` of cross-attention) are column-wise with a *strided* shard
  (``_StridedShard(0, split_factor=3 or 2)``): rank ``r`` holds rows ``[q_r; k_r; v_r]``, the
  same heads of q, k and v, and the full tensor (checkpoints, ``ema.safetensors``) keeps its
  ordinary ``[q; k; v]`` layout.  :class:`~difflab.models.layers.CrossAttention` reads its
  head count off the local projection width (``head_dim`` fixed), so no module is changed.
- MLP: ``fc1`` column-wise, ``fc2`` row-wise (one more all-reduce per block); the GELU between
  them is element-wise on the local columns.

Everything else (patch and timestep embeddings, adaLN modulation, norms, the final layer) is
replicated inside a TP group and sharded by FSDP over ``"dp"``.  Every rank of one TP group
must see the same micro-batch and draw the same noise: ``DistInfo.data_rank`` /
``data_world`` give the data-parallel coordinates the loop and the data stream use.

Only DiT blocks are split.  The U-Nets difflab ships are refused: their ADM attention uses a
fused ``qkv`` with a bias laid out per head, their transformer blocks sit at 8x8-32x32 token
grids with 64-320 channels, where the all-reduces would cost more than the GEMMs they split
(``docs/training.md``, "Tensor and pipeline parallelism").
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

__all__ = [
    "FusedColwiseParallel",
    "block_plan",
    "check_tensor_parallel",
    "fsdp_placement",
    "restore_strided",
    "tensor_parallelize",
    "whole_strided",
]


def _fused_colwise() -> type:
    """``FusedColwiseParallel``, built on first use (``torch.distributed.tensor`` imports)."""
    from torch.distributed.tensor import distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel
    from torch.distributed.tensor.placement_types import _StridedShard

    class _FusedColwise(ColwiseParallel):
        """``ColwiseParallel`` for a Linear whose output is ``parts`` projections stacked
        (``[q; k; v]``): each part is split over the ranks, so rank ``r`` holds the ``r``-th
        slice of every part, and the local output is this rank's ``[q_r, k_r, v_r]``."""

        def __init__(self, parts: int) -> None:
            super().__init__()
            self.parts = parts

        def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: Any) -> None:
            for pname, param in list(module.named_parameters()):
                place = [_StridedShard(0, split_factor=self.parts)]
                dist_param = nn.Parameter(
                    distribute_tensor(param, device_mesh, place, src_data_rank=self.src_data_rank),
                    requires_grad=param.requires_grad,
                )
                module.register_parameter(pname, dist_param)

        def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
            if not isinstance(module, nn.Linear):
                raise ValueError(f"FusedColwiseParallel splits nn.Linear, got {type(module)}")
            prepare_in = partial(
                self._prepare_input_fn, self.input_layouts, self.desired_input_layouts
            )
            return distribute_module(
                module, device_mesh, self._partition_linear_fn, prepare_in,
                lambda mod, out, mesh: out.to_local(),  # this rank's [q_r, k_r, v_r]
            )  # fmt: skip

    return _FusedColwise


def FusedColwiseParallel(parts: int) -> Any:  # noqa: N802  (a ParallelStyle, named like one)
    """A column-wise ``ParallelStyle`` for a fused projection of ``parts`` stacked outputs."""
    return _fused_colwise()(parts)


def _attention_plan(prefix: str, attn: nn.Module) -> dict[str, Any]:
    """The plan of one ``CrossAttention``: q/k/v column-wise (fused or not), out row-wise."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, Any] = {f"{prefix}.to_out": RowwiseParallel()}
    if hasattr(attn, "to_qkv"):
        plan[f"{prefix}.to_qkv"] = FusedColwiseParallel(3)
    if hasattr(attn, "to_kv"):
        plan[f"{prefix}.to_kv"] = FusedColwiseParallel(2)
    for name in ("to_q", "to_k", "to_v"):
        if hasattr(attn, name):
            plan[f"{prefix}.{name}"] = ColwiseParallel()
    return plan


def block_plan(block: nn.Module) -> dict[str, Any]:
    """``parallelize_module``'s plan for one ``DiTBlock``: attention (and cross-attention)
    q/k/v column-wise, out row-wise; MLP ``fc1`` column-wise, ``fc2`` row-wise."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = _attention_plan("attn", block.get_submodule("attn"))
    cross = getattr(block, "cross_attn", None)
    if isinstance(cross, nn.Module):
        plan.update(_attention_plan("cross_attn", cross))
    plan["mlp.fc1"] = ColwiseParallel()
    plan["mlp.fc2"] = RowwiseParallel()
    return plan


def check_tensor_parallel(model: nn.Module, n: int, world_size: int) -> None:
    """Refuse (one line each) a ``train.tensor_parallel`` the run cannot split."""
    from ..models.dit import DiT

    if world_size % n:
        raise ValueError(
            f"train.tensor_parallel={n} needs a world size divisible by {n}; this job has "
            f"{world_size} process(es) (launch with torchrun --nproc_per_node a multiple of {n})"
        )
    if not isinstance(model, DiT):
        raise ValueError(
            f"train.tensor_parallel={n} splits the projections of DiT blocks (model.arch=dit); "
            f"this run trains a {type(model).__name__}, whose attention layers are too small "
            "to gain from it (docs/training.md); set train.tensor_parallel=1"
        )
    cfg = model.config
    hidden = int(cfg.hidden_size * cfg.mlp_ratio)
    if cfg.num_heads % n or hidden % n:
        raise ValueError(
            f"train.tensor_parallel={n} must divide the DiT's num_heads={cfg.num_heads} and "
            f"MLP width {hidden}"
        )


def tensor_parallelize(model: nn.Module, tp_mesh: Any) -> nn.Module:
    """Split every ``DiTBlock`` of ``model`` over ``tp_mesh`` (1-D) in place; returns it."""
    from torch.distributed.tensor.parallel import parallelize_module

    from ..models.dit import DiTBlock

    for block in [m for m in model.modules() if isinstance(m, DiTBlock)]:
        parallelize_module(block, tp_mesh, block_plan(block))
    return model


def fsdp_placement(param: nn.Parameter) -> Any:
    """FSDP2's ``shard_placement_fn``: ``Shard(1)`` (the input dimension) for a fused
    projection split by a strided TP shard on dim 0, ``None`` (FSDP's ``Shard(0)``) for the
    rest.  Two strided shards of one dimension do not gather back to the full tensor in
    torch 2.13, so the fused ``[q; k; v]`` rows are split by TP and their columns by FSDP."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    placements = getattr(param, "placements", ())
    return Shard(1) if any(isinstance(p, _StridedShard) for p in placements) else None


# --------------------------------------------------------------------------- checkpoints
def _is_strided(value: Any) -> bool:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import _StridedShard

    return isinstance(value, DTensor) and any(
        isinstance(p, _StridedShard) for p in value.placements
    )


def whole_strided(state: dict[str, Any], *, empty: bool = False) -> tuple[dict[str, Any], list]:
    """``state`` (nested dicts) with every strided-sharded DTensor (the fused q/k/v rows,
    their AdamW moments) as a whole plain tensor, and the ``(dict, key, dtensor)`` swapped.

    DCP records a shard as one box (offset, size) of the full tensor; rank ``r``'s rows
    ``[q_r; k_r; v_r]`` are three boxes, which DCP cannot write.  These entries are written
    whole instead (one copy, DCP drops the duplicates) and read whole, then cut back by
    :func:`restore_strided`.  ``empty``: allocate the whole tensors for a load.
    """
    swapped: list[tuple[dict[str, Any], str, Any]] = []

    import torch

    def walk(d: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in d.items():
            if isinstance(value, dict):
                out[key] = walk(value)
            elif _is_strided(value):
                out[key] = (torch.empty(value.shape, dtype=value.dtype, device=value.device)
                            if empty else value.full_tensor())  # fmt: skip
                swapped.append((out, key, value))
            else:
                out[key] = value
        return out

    return walk(state), swapped


def restore_strided(swapped: list) -> None:
    """Cut each whole tensor read by DCP into this rank's shard of its DTensor (in place)."""
    import torch
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for holder, key, dtensor in swapped:
            part = distribute_tensor(holder[key], dtensor.device_mesh, dtensor.placements,
                                     src_data_rank=None)  # fmt: skip
            dtensor.to_local().copy_(part.to_local())
