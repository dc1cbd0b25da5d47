"""The model-parameter and optimizer-state tensors of a checkpoint (``model/...`` and ``optim/...`` keys).

Everything here goes through the engine optimizers' public state API (``shard_specs()``,
``sharded_state()``, ``load_state_dict()``, see :mod:`dist_opt.engine.state_api`): the optimizer state
of a parameter is saved as its *flattened* tensor of global shape ``(numel,)``, a DTensor
``Shard(0)`` of this rank's piece when the state is split over ranks (``spec.shards > 1``), the
whole tensor when every rank holds it (saved once); 0-d step counters as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor, Shard

from dist_opt.checkpoint.pieces import FlatPiece, flat_piece

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from dist_opt.engine.core import PieceOptimizer
    from dist_opt.engine.state_codec import ShardSpec

#: need(key, shape, dtype, what) -> whether the checkpoint holds that tensor (else a problem is noted)
Need = Callable[[str, tuple[int, ...], torch.dtype, str], bool]


def copy_cpu(t: Tensor) -> Tensor:
    """A CPU copy that training can no longer change."""
    return t.detach().to("cpu", copy=True).contiguous()


def shard_piece(local: Tensor, numel: int, mesh: DeviceMesh) -> DTensor:
    """``local`` (this rank's valid piece of a flattened tensor of ``numel`` elements, torch.chunk
    layout) as a DTensor ``Shard(0)`` of global shape ``(numel,)``. Extensions may put such values in
    their ``state_dict`` to have them saved sharded and resharded on load."""
    return DTensor.from_local(
        local, mesh, [Shard(0)], shape=torch.Size((numel,)), stride=(1,), run_check=False
    )


def trained_names(opt: PieceOptimizer) -> set[str]:
    """Names of the parameters the optimizer trains (the rest of the model's state are buffers)."""
    return {s.name for s in opt.shard_specs()}


def describe_tensors(opt: PieceOptimizer) -> dict[str, Any]:
    """World-size independent ``params`` / ``states`` description and the state's ``shard_world``."""
    specs = opt.shard_specs()
    state = opt.sharded_state()
    return {
        "params": {s.name: {"shape": list(s.shape), "numel": s.numel} for s in specs},
        "states": {
            s.name: {k: ("scalar" if v.dim() == 0 else "flat") for k, v in state[s.name].items()}
            for s in specs
        },
        "shard_world": specs[0].shards if specs else 1,
    }


def capture_tensors(opt: PieceOptimizer, model_sd: dict[str, Tensor], mesh: DeviceMesh) -> dict[str, Tensor]:
    """``model/<param>`` and ``optim/<param>/<state>`` tensors of this rank (CPU copies)."""
    out: dict[str, Tensor] = {}
    specs = opt.shard_specs()
    for s in specs:
        p = model_sd[s.name]
        out[f"model/{s.name}"] = (
            _dtensor_like(p, copy_cpu(p.to_local()), mesh) if isinstance(p, DTensor) else copy_cpu(p)
        )
    state = opt.sharded_state()
    for s in specs:
        for k, v in state[s.name].items():
            key = f"optim/{s.name}/{k}"
            if v.dim() == 0 or s.shards == 1:
                out[key] = copy_cpu(v)
            else:
                out[key] = piece_tensor(copy_cpu(v), s, mesh)
    return out


def piece_tensor(local: Tensor, s: ShardSpec, mesh: DeviceMesh) -> Tensor:
    """This rank's piece of a flattened state tensor as DCP saves / loads it at its global offset: a
    DTensor ``Shard(0)`` for the native ``torch.chunk`` split, else a :func:`~.pieces.flat_piece`
    (FSDP2's dim-0 rows, DeepSpeed ZeRO-1/2 partition fragments)."""
    rank = mesh.get_local_rank()
    c = -(-s.numel // s.shards)
    lo = min(rank * c, s.numel)
    if s.shards == mesh.size() and s.offset == lo and s.valid == min(c, s.numel - lo):
        return shard_piece(local, s.numel, mesh)
    return flat_piece(local, s.offset, s.numel)


def _dtensor_like(t: DTensor, local: Tensor, mesh: DeviceMesh) -> DTensor:
    """``local`` (CPU) as a DTensor with ``t``'s placements and global shape (a sharded parameter) on
    the checkpoint's CPU ``mesh`` (``t``'s mesh spans the same ranks, maybe on another device)."""
    if t.device_mesh.ndim != 1 or t.device_mesh.size() != mesh.size():
        raise ValueError(
            f"sharded parameter on a {t.device_mesh.shape} mesh; checkpoints need all ranks on one dim"
        )
    return DTensor.from_local(local, mesh, t.placements, shape=t.shape, stride=t.stride(), run_check=False)


def local_tensor(t: Tensor) -> Tensor:
    """The local elements of a loaded template (DTensor, flat piece or plain tensor)."""
    return t.to_local() if isinstance(t, (DTensor, FlatPiece)) else t


def plan_tensors(
    opt: PieceOptimizer,
    model_sd: dict[str, Tensor],
    saved: dict[str, Any],
    here: dict[str, Any],
    need: Need,
    problems: list[str],
    mesh: DeviceMesh,
) -> dict[str, Tensor]:
    """Templates DCP loads the model parameters and the optimizer state into; mismatches with the
    checkpoint's description ``saved`` go to ``problems`` (``need`` checks one saved tensor)."""
    templates: dict[str, Tensor] = {}
    specs = opt.shard_specs()
    sp, hp = saved["params"], here["params"]
    missing = [n for n in hp if n not in sp]
    unexpected = [n for n in sp if n not in hp]
    if missing:
        problems.append(
            f"model parameters missing from the checkpoint: {', '.join(missing[:8])}"
            + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        )
    if unexpected:
        problems.append(
            f"checkpoint has parameters this model lacks: {', '.join(unexpected[:8])}"
            + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else "")
        )
    for s in specs:
        if s.name in sp:
            p = model_sd[s.name]
            if need(f"model/{s.name}", tuple(p.shape), p.dtype, f"parameter {s.name}"):
                templates[f"model/{s.name}"] = (
                    _dtensor_like(p, torch.empty(p.to_local().shape, dtype=p.dtype), mesh)
                    if isinstance(p, DTensor)
                    else torch.empty(p.shape, dtype=p.dtype)
                )

    if saved["param_groups"] != here["param_groups"] and not problems:
        problems.append(
            "optimizer parameter groups differ from the checkpoint's (changed "
            "exclude_from_weight_decay, exclude_from_trust_ratio or lr_multipliers?)"
        )
    state = opt.sharded_state()
    for s in specs:
        if s.name not in sp:
            continue
        saved_states = saved["states"].get(s.name, {})
        extra = sorted(set(saved_states) - set(state[s.name]))
        if extra:
            problems.append(
                f"optimizer state of {s.name}: checkpoint has {', '.join(extra)} which this "
                f"optimizer does not keep"
            )
        for k, v in state[s.name].items():
            key = f"optim/{s.name}/{k}"
            what = f"optimizer state {s.name}.{k}"
            if k not in saved_states:
                problems.append(f"{what}: missing from the checkpoint")
                continue
            if v.dim() == 0:
                if need(key, (), v.dtype, what):
                    templates[key] = torch.empty((), dtype=v.dtype)
            elif need(key, (s.numel,), v.dtype, what):
                if s.shards > 1:
                    templates[key] = piece_tensor(torch.empty(s.valid, dtype=v.dtype), s, mesh)
                else:
                    templates[key] = torch.empty(s.numel, dtype=v.dtype)
    return templates


@torch.no_grad()
def load_params(opt: PieceOptimizer, model_sd: dict[str, Tensor], templates: dict[str, Tensor]) -> None:
    """Copy the loaded ``model/<param>`` tensors into the model."""
    for s in opt.shard_specs():
        p = model_sd[s.name]
        if isinstance(p, DTensor):  # a sharded parameter (FSDP2): this rank's rows
            p.to_local().copy_(local_tensor(templates[f"model/{s.name}"]))
        else:
            p.copy_(templates[f"model/{s.name}"])


def loaded_state(
    opt: PieceOptimizer, templates: dict[str, Tensor], device: torch.device
) -> tuple[dict[str, dict[str, Tensor]], dict[str, int]]:
    """The loaded optimizer state as this rank's pieces on ``device``, and their global offsets
    (the ``state`` / ``offsets`` of ``opt.load_state_dict``)."""
    specs = opt.shard_specs()
    keys = opt.sharded_state()
    state: dict[str, dict[str, Tensor]] = {}
    for s in specs:
        state[s.name] = {}
        for k in keys[s.name]:
            v = templates[f"optim/{s.name}/{k}"]
            state[s.name][k] = local_tensor(v).to(device)
    return state, {s.name: s.offset for s in specs}
