"""Three clipped AdamW steps of a tiny DiT, in one process or on a ``(dp, tp)`` mesh.

Used by tests/train/test_tensor_parallel.py: ``fsdp_jobs.py`` runs :func:`mesh_steps` on
2 ranks (FSDP x TP on a 2x1 or 1x2 mesh) and the test runs it here with ``mesh=None``; the
two must end with the same weights.  The DiT has cross-attention, so the fused ``to_qkv``
and ``to_kv`` and the separate ``to_q`` are all split.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.models.dit import DiT, DiTConfig

CFG = DiTConfig(image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2,
                num_heads=2, num_classes=4, context_dim=8)  # fmt: skip
BATCH = 4


def _model() -> DiT:
    """The DiT with every weight moved off its (partly zero) initialisation."""
    model = DiT(CFG)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def mesh_steps(mesh_shape: tuple[int, int] | None) -> dict[str, Tensor]:
    """The whole-model state dict after 3 steps; ``mesh_shape = (dp, tp)`` shards the model
    (TP over ``tp`` ranks, FSDP2 over ``dp``) and splits each batch over the ``dp`` rows."""
    from difflab.train.fsdp import clip_grad_norm

    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(BATCH, 1, 8, 8, generator=gen), torch.rand(BATCH, generator=gen) * 99,
             torch.randint(0, 4, (BATCH,), generator=gen), torch.randn(BATCH, 3, 8, generator=gen))
            for _ in range(3)]  # fmt: skip
    model = _model()
    rows = slice(None)
    if mesh_shape is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from difflab.train.fsdp import shard_units
        from difflab.train.tensor_parallel import fsdp_placement, tensor_parallelize

        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "tp"))
        tensor_parallelize(model, mesh["tp"])
        for unit in [*shard_units(model), model]:
            fully_shard(unit, mesh=mesh["dp"], shard_placement_fn=fsdp_placement)
        b = BATCH // mesh_shape[0]
        rows = slice(mesh.get_local_rank("dp") * b, (mesh.get_local_rank("dp") + 1) * b)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for x, t, y, ctx in data:
        opt.zero_grad()
        loss = model(x[rows], t[rows], y[rows], ctx[rows]).square().mean()
        loss.backward()
        clip_grad_norm(model.parameters(), 0.05)  # the norms are ~0.5: every step clips
        opt.step()
    if mesh_shape is None:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)
