"""Sharded data parallelism (``train.parallel: fsdp``) and sharded checkpoints.

Owns how a network is spread over the ranks of a ``torchrun`` job, on PyTorch's own engine:

- :func:`parallelize`: DDP (a whole replica per rank) or FSDP2 (``fully_shard``, ZeRO-3 style:
  Rajbhandari et al. 2020, "ZeRO"; Zhao et al. 2023, "PyTorch FSDP") over a 1-D device mesh,
  one FSDP unit per U-Net stage (a ResBlock with its attention layers, a down/upsampler, the
  middle block) or per DiT block, and one at the root.  Parameters, gradients and AdamW
  moments are sharded DTensors; the EMA copy is sharded the same way, so its update is a
  shard-local ``lerp``.  ``train.mixed_precision`` becomes a ``MixedPrecisionPolicy`` (bf16 /
  fp16 compute copies of the weights, fp32 gradient reduction); ``train.cpu_offload`` keeps
  the shards in CPU memory (CUDA only).  Frozen modules (autoencoder, CLIP/T5) are not part
  of the trained network and are never sharded.
- With ``train.tensor_parallel: N`` :func:`parallelize` first splits the DiT blocks over
  the ``"tp"`` dimension of a 2-D ``("dp", "tp")`` mesh (:mod:`difflab.train.tensor_parallel`)
  and then shards every parameter over ``"dp"`` (torchtitan's layout).
- :func:`no_sync` / :func:`clip_grad_norm`: gradient accumulation and clipping under either
  wrapper.  FSDP reduce-scatters every micro-batch into the sharded gradients (they stay
  sharded while accumulating); the clipping norm is the global one over all shards.
- :func:`save_sharded` / :func:`load_sharded`: checkpoints through
  ``torch.distributed.checkpoint`` (DCP).  Each rank writes its shards of model, EMA and the
  optimiser's tensors into ``train_state.tmp-XXXX/dcp``; rank 0 adds the whole-model
  ``model/ema.safetensors`` (gathered), RNG states and ``state.json`` (the optimiser's
  param groups as JSON) and renames the directory into place like every difflab checkpoint.
  DCP reshards on load, so a checkpoint written by N ranks resumes on M (1 included), and a
  plain (DDP / one-process) checkpoint resumes sharded.  No pickled Python objects are
  written; DCP's ``.metadata`` index is read through an allow-list unpickler.

Knows nothing of data, losses or the loop's schedule; the loop calls these five functions.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checkpoint import (
    Checkpoint,
    _read_state,
    commit_state_dir,
    find_checkpoint,
    load_checkpoint,
    new_state_dir,
    write_state_files,
)
from .distributed import DistInfo, wrap_ddp
from .memory import shard_units
from .tensor_parallel import restore_strided, whole_strided

__all__ = [
    "DCP_DIR",
    "clip_grad_norm",
    "is_sharded",
    "is_sharded_checkpoint",
    "load_sharded",
    "no_sync",
    "parallelize",
    "save_sharded",
    "shard_units",
]

DCP_DIR = "dcp"  # the DCP shards inside train_state/
# Trainer features that sample or score on rank 0 alone: a sharded network cannot run there
# without the other ranks (its forward all-gathers), so they are refused under FSDP for now.
_RANK0_ONLY = {
    "train.sample_every": "sample grids",
    "train.val_every": "validation loss",
    "train.eval_every": "periodic metrics",
    "train.posthoc_ema": "post-hoc EMA snapshots",
}


# --------------------------------------------------------------------------- wrapping
def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _check_supported(cfg: Any) -> None:
    """Refuse (one line each) the features that do not yet run on a sharded network."""
    tc = cfg.train
    on = {
        "train.sample_every": tc.sample_every,
        "train.val_every": tc.val_every,
        "train.eval_every": tc.eval_every,
        "train.posthoc_ema": tc.posthoc_ema,
    }
    for key, value in on.items():
        if value:
            raise ValueError(
                f"train.parallel=fsdp does not run {_RANK0_ONLY[key]} during training yet "
                f"({key}={value!r}); set {key}=0 (or null) and sample/evaluate the published "
                "weights after the run, or use train.parallel=ddp"
            )
    if tc.compile:
        raise ValueError("train.compile with train.parallel=fsdp is not supported yet")
    if cfg.finetune.base_run is not None:
        raise ValueError("fine-tuning (finetune.base_run) with train.parallel=fsdp is not "
                         "supported yet; use train.parallel=ddp")  # fmt: skip


def _policies(precision: Any, cpu_offload: bool, device: torch.device) -> dict[str, Any]:
    """``fully_shard`` keyword arguments: mixed precision and offload policies."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    kwargs: dict[str, Any] = {}
    if precision.dtype is not None:  # compute in bf16/fp16, reduce gradients in fp32
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=precision.dtype, reduce_dtype=torch.float32
        )
    if cpu_offload:
        if device.type != "cuda":
            raise ValueError(
                f"train.cpu_offload moves FSDP shards from the GPU to CPU memory; on "
                f"{device.type} they are already there (set train.cpu_offload=false)"
            )
        kwargs["offload_policy"] = CPUOffloadPolicy()
    return kwargs


def _fully_shard(model: nn.Module, mesh: Any, kwargs: dict[str, Any]) -> None:
    from torch.distributed.fsdp import fully_shard

    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)


def parallelize(cfg: Any, model: nn.Module, ema: Any, info: DistInfo, precision: Any) -> nn.Module:
    """The module the loop runs forward/backward through: ``model`` itself in one process,
    a ``DistributedDataParallel`` wrapper under ``train.parallel: ddp``, or ``model`` sharded
    in place by FSDP2 under ``fsdp`` (``ema.model`` sharded alike).

    :param cfg: the resolved ``TrainConfig``.
    :param ema: the run's ``EMA`` (built from ``model`` before this call).
    :param precision: the resolved ``Precision`` of ``train.mixed_precision``.
    """
    if info.is_main:  # the memory each rank will need, before any of it is spent
        print(_memory_line(cfg, model, info, precision), flush=True)
    if not info.distributed:
        return model
    if cfg.train.tensor_parallel > 1:
        return _parallelize_2d(cfg, model, ema, info, precision)
    if cfg.train.parallel == "ddp":
        return wrap_ddp(model, info)
    from torch.distributed.device_mesh import init_device_mesh

    _check_supported(cfg)
    kwargs = _policies(precision, cfg.train.cpu_offload, info.device)
    mesh = init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("dp",))
    _fully_shard(model, mesh, kwargs)
    _fully_shard(ema.model, mesh, {k: v for k, v in kwargs.items() if k != "mp_policy"})
    return model


def _parallelize_2d(
    cfg: Any, model: nn.Module, ema: Any, info: DistInfo, precision: Any
) -> nn.Module:
    """``train.tensor_parallel: N``: the DiT blocks split over ``"tp"`` groups of N ranks
    (:mod:`difflab.train.tensor_parallel`), then every parameter sharded by FSDP2 over
    ``"dp"`` on the 2-D mesh ``(world / N, N)`` (a ``"dp"`` of 1 rank shards nothing; it
    makes every parameter a DTensor for the optimiser, EMA, clipping and DCP)."""
    from torch.distributed.device_mesh import init_device_mesh

    from .tensor_parallel import check_tensor_parallel, fsdp_placement, tensor_parallelize

    n = cfg.train.tensor_parallel
    check_tensor_parallel(model, n, info.world_size)
    dp = info.world_size // n
    if dp > 1 and cfg.train.parallel != "fsdp":
        raise ValueError(
            f"train.tensor_parallel={n} on {info.world_size} ranks leaves {dp} model replicas; "
            "they are sharded by FSDP over the 'dp' mesh dimension: set train.parallel=fsdp "
            "(DDP does not take tensor-parallel DTensor parameters)"
        )
    _check_supported(cfg)
    kwargs = _policies(precision, cfg.train.cpu_offload, info.device)
    kwargs["shard_placement_fn"] = fsdp_placement  # fused q/k/v: FSDP splits the columns
    mesh = init_device_mesh(info.device.type, (dp, n), mesh_dim_names=("dp", "tp"))
    ema_kwargs = {k: v for k, v in kwargs.items() if k != "mp_policy"}  # EMA stays fp32
    for net, kw in ((model, kwargs), (ema.model, ema_kwargs)):
        tensor_parallelize(net, mesh["tp"])
        _fully_shard(net, mesh["dp"], kw)
    return model


def _memory_line(cfg: Any, model: nn.Module, info: DistInfo, precision: Any) -> str:
    """``difflab.train.memory``'s per-rank report of this run.  Under torchrun the
    activations of one micro-batch are measured on fake tensors (seconds: it loads
    torch's fake-tensor machinery, so a single process skips it and says n/a)."""
    from .memory import memory_report, model_activation_bytes

    acts = None
    if info.distributed:
        batch = max(1, cfg.train.batch_size // info.data_world)
        with torch.random.fork_rng(devices=[]):  # the probe's random inputs draw no real RNG
            acts = model_activation_bytes(model, batch, precision)
    report = memory_report(
        model, parallel=cfg.train.parallel, world_size=info.world_size,
        compute_dtype=precision.dtype, activations=acts,
    )  # fmt: skip
    return report.format()


def no_sync(module: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """The context of a micro-batch that is not the last of an accumulated step: DDP's
    ``no_sync`` (gradients summed locally, all-reduced once); nothing under FSDP, which
    reduce-scatters each micro-batch so that gradients stay sharded while they accumulate."""
    if is_sharded(module):
        return contextlib.nullcontext()
    return module.no_sync()  # type: ignore[operator]


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """``clip_grad_norm_`` over every rank's shards; returns the global norm as a plain
    tensor (DTensor gradients give a replicated DTensor norm, unwrapped here).

    Under FSDP x TP the gradients live on two meshes (the 2-D ``("dp", "tp")`` one for the
    split projections, ``"dp"`` for the rest), which one ``clip_grad_norm_`` cannot mix: the
    norm is then taken per mesh, made whole, and combined (``sqrt(sum of squares)``)."""
    params = [p for p in parameters if p.grad is not None]
    groups: dict[int, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault(id(getattr(p.grad, "device_mesh", None)), []).append(p)
    if len(groups) <= 1:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full = getattr(norm, "full_tensor", None)
        return full() if full is not None else norm
    norms = []
    for group in groups.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in group if p.grad is not None])
        full = getattr(n, "full_tensor", None)
        norms.append(full() if full is not None else n)
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))  # clip_grad_norm_'s
    if coef < 1.0:
        for p in params:
            grad: Any = p.grad
            (grad.to_local() if hasattr(grad, "to_local") else grad).mul_(coef)
    return total


# --------------------------------------------------------------------------- checkpoints
def is_sharded_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir``'s checkpoint keeps its state in DCP shards."""
    state_dir = find_checkpoint(run_dir)
    if state_dir is None:
        return False
    return _read_state(state_dir).get("sharded") is not None


def _split_optimizer(osd: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An FQN-keyed optimiser state dict as (tensors for DCP, param groups as JSON)."""
    tensors = {fqn: {k: v for k, v in st.items() if isinstance(v, Tensor)}
               for fqn, st in osd["state"].items()}  # fmt: skip
    for fqn, st in osd["state"].items():
        extra = [k for k, v in st.items() if not isinstance(v, Tensor)]
        if extra:
            raise ValueError(f"optimizer state of {fqn} has non-tensor entries {extra}")
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
              for g in osd["param_groups"]]  # fmt: skip
    return tensors, groups


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_sharded(
    run_dir: str | Path,
    model: nn.Module,
    ema: Any,
    optimizer: torch.optim.Optimizer,
    rng: dict[str, Tensor],
    meta: dict[str, Any],
    info: DistInfo,
) -> Path:
    """Write a sharded checkpoint atomically (every rank calls it); returns ``train_state``.

    :param rng: the named RNG states (rank 0's are written).
    :param meta: ``state.json``'s scalars (``step``, ``ema_updates``, ...).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    run_dir = Path(run_dir)
    box = [str(new_state_dir(run_dir)) if info.is_main else None]
    dist.broadcast_object_list(box, src=0)  # one temp directory for every rank
    tmp = Path(str(box[0]))
    try:
        msd, osd = get_state_dict(model, optimizer)
        opt_tensors, groups = _split_optimizer(osd)
        state = {"model": msd, "ema": get_model_state_dict(ema.model), "optimizer": opt_tensors}
        state, _ = whole_strided(state)  # TP's fused q/k/v shards: written whole
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp / DCP_DIR, sync_files=True))
        model_full = get_model_state_dict(model, options=_full_options())  # rank 0 only
        ema_full = get_model_state_dict(ema.model, options=_full_options())
        final = run_dir / "train_state"
        if info.is_main:
            sharded = {"format": "torch.distributed.checkpoint", "world_size": info.world_size,
                       "optimizer_groups": groups}  # fmt: skip
            ckpt = Checkpoint(model=model_full, ema=ema_full, optimizer={}, rng=rng,  # type: ignore[arg-type]  # full state dicts: tensors
                              meta=meta)
            write_state_files(tmp, ckpt, {"sharded": sharded})
            final = commit_state_dir(run_dir, tmp)
    except BaseException:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return final


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` index is a pickle; only its own plain classes may be built."""

    _MODULES = ("torch.distributed.checkpoint.", "collections")
    _NAMES = {
        "builtins": ("set", "frozenset", "tuple", "list", "dict"),
        "pathlib": ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"),
        "torch.serialization": ("_get_layout",),  # "torch.strided" -> torch.strided
    }

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and (
            name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return getattr(torch, name)
        if name in self._NAMES.get(module, ()) or module.startswith(self._MODULES):
            return super().find_class(module, name)
        raise ValueError(f"DCP metadata refers to {module}.{name}, which difflab does not load")


def _reader(path: Path) -> Any:
    """A DCP ``FileSystemReader`` whose metadata is read through the allow-list unpickler."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            meta_path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(meta_path, "rb") as fh:
                metadata = _MetadataUnpickler(io.BytesIO(fh.read())).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def load_sharded(
    run_dir: str | Path, model: nn.Module, ema: Any, optimizer: torch.optim.Optimizer
) -> Checkpoint:
    """Restore model, EMA and optimiser of ``run_dir``'s checkpoint in place, whatever the
    number of ranks that wrote it; returns its ``meta`` and ``rng`` (weights left empty).

    A sharded checkpoint is read through DCP (which reshards); a plain one (DDP or one
    process) is read whole on every rank and sharded into ``model`` when it is sharded.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    ck = load_checkpoint(run_dir, optimizer_like=optimizer.state_dict())
    state_dir = find_checkpoint(run_dir)
    assert state_dir is not None
    sharded = ck.meta.get("sharded")
    if sharded is None:  # a whole-model checkpoint into a sharded model
        _load_whole(ck, model, ema, optimizer)
    else:
        msd, osd = get_state_dict(model, optimizer)  # initialises AdamW's moments (lr 0)
        opt_tensors, _ = _split_optimizer(osd)
        state = {"model": msd, "ema": get_model_state_dict(ema.model), "optimizer": opt_tensors}
        whole, swapped = whole_strided(state, empty=True)  # TP's fused q/k/v: read whole
        dcp.load(whole, storage_reader=_reader(state_dir / DCP_DIR))
        restore_strided(swapped)
        live: Any = osd["param_groups"]  # a list of dicts (typed loosely by torch)
        groups = [_tuples(g, ref) for g, ref in zip(sharded["optimizer_groups"], live)]
        osd = {"state": state["optimizer"], "param_groups": groups}
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=osd)
        set_model_state_dict(ema.model, state["ema"])
    ema.num_updates = int(ck.meta["ema_updates"])
    return Checkpoint(model={}, ema={}, optimizer={}, rng=ck.rng, meta=ck.meta)


def _tuples(group: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """JSON lists back to the tuples the live optimiser's group holds (AdamW's ``betas``)."""
    return {k: tuple(v) if isinstance(ref.get(k), tuple) else v for k, v in group.items()}


def _shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` cut the way ``like`` (a DTensor parameter) is sharded, from this rank's own
    copy (every rank read the whole file: no communication); plain tensors pass through."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or full.shape != like.shape:
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def _load_whole(
    ck: Checkpoint, model: nn.Module, ema: Any, optimizer: torch.optim.Optimizer
) -> None:
    """A plain checkpoint (DDP or one process) into a sharded model, EMA and optimiser."""
    for net, weights in ((model, ck.model), (ema.model, ck.ema)):
        live = net.state_dict()
        net.load_state_dict({k: _shard_like(v, live[k]) if k in live else v
                             for k, v in weights.items()})  # fmt: skip
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {
        int(i): {
            k: _shard_like(v, params[int(i)]) if isinstance(v, Tensor) else v for k, v in st.items()
        }  # fmt: skip
        for i, st in ck.optimizer["state"].items()
    }
    optimizer.load_state_dict({"state": state, "param_groups": ck.optimizer["param_groups"]})
