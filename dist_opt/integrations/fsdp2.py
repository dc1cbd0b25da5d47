"""``distributed.engine: fsdp2``: parameters sharded by PyTorch's ``fully_shard`` (DTensor, ZeRO-3),
dist-opt's optimizers stepping on the local shards.

``build_fsdp2`` applies ``fully_shard`` to the model's units (each child module with parameters,
looking inside ``ModuleList``/``Sequential``/``ModuleDict`` containers, e.g. transformer blocks)
and then to the root, so every rank holds dim-0 shards of every parameter (1/N of parameter,
gradient and optimizer memory). FSDP2 reduce-scatters gradients with a SUM and divides once by
world size x accumulation steps (the native engine's averaging); accumulation micro-steps run
under ``set_requires_gradient_sync(False)`` (``opt.no_sync()``), so the reduce-scatter happens once,
on the last micro-step.

:class:`FSDP2Optimizer` applies the rule to ``p.to_local()`` of every DTensor parameter; LARS/LAMB
per-layer norms are partial sums over the local shards completed by one all-reduce per step, so
trust ratios are exactly those of the whole layers. Shampoo is refused (``check_engine_combination``).

Checkpoints: the model's ``state_dict()`` holds DTensors and ``opt.state_dict()`` returns the
optimizer state as DTensors with the parameters' placements (plus plain counters), so
``torch.distributed.checkpoint`` saves them sharded and loads them at any world size: load in
place into ``opt.state_dict()``'s tensors, then call ``opt.load_state_dict`` with the result.
``dist_opt.integrations.full_state_dict(model)`` gathers full tensors (a collective).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dist_opt.config.loader import ConfigError
from dist_opt.config.schema import Config
from dist_opt.engine.core import GroupOptions, PieceOptimizer
from dist_opt.engine.state_codec import ShardSpec
from dist_opt.optim.base import Rule

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules that become FSDP2 units, in registration order (the root takes the rest)."""
    units: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, CONTAINERS):
                visit(child)
            elif any(True for _ in child.parameters()):
                units.append(child)

    visit(model)
    return units


def build_fsdp2(
    cfg: Config, model: nn.Module, lr: float, track_local_grad_norm: bool = False
) -> tuple[nn.Module, FSDP2Optimizer]:  # noqa: ARG001
    """Shard ``model`` with ``fully_shard`` and build the optimizer over its local shards.

    The gradient-noise-scale statistics need each rank's gradient before reduction, which FSDP2
    reduce-scatters inside backward, so ``track_local_grad_norm`` is not supported (ignored)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from dist_opt.engine.build import rule_from_config
    from dist_opt.integrations import check_engine_combination

    world = dist.get_world_size()
    problems = check_engine_combination(cfg, world) + cfg.check_world(world)
    if problems:
        raise ConfigError(problems)
    accum = cfg.accumulation_steps(world)
    device = next(model.parameters()).device
    with torch.no_grad():  # every rank starts from rank 0's parameters (as the native engine)
        for p in model.parameters():
            dist.broadcast(p.data, src=0)
    mesh = init_device_mesh(device.type, (world,))
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)  # sum, then divide once (never a pre-divide or AVG)
            m.set_gradient_divide_factor(float(world * accum))
    o = cfg.optimizer
    rule = rule_from_config(o)
    opt = FSDP2Optimizer(
        model, rule, lr=lr, groups=GroupOptions.from_config(o), max_grad_norm=o.max_grad_norm
    )
    return model, opt


class FSDP2Optimizer(PieceOptimizer):
    """A rule over the local shards of a ``fully_shard``-ed model's DTensor parameters."""

    engine_name = "fsdp2"
    partial = True

    def __init__(self, model: nn.Module, rule: Rule, **kw: Any):
        from torch.distributed.tensor import DTensor

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        plain = [n for n, p in named if not isinstance(p, DTensor)]
        if plain:
            raise ValueError(f"FSDP2Optimizer: parameters are not DTensors (not fully_shard-ed): {plain[:5]}")
        if rule.replicated_pieces:
            raise ValueError(f"{type(rule).__name__} needs whole parameters; FSDP2 shards them")
        self.model = model
        super().__init__(named, rule, **kw)
        self._specs = [_row_spec(n, p) for n, p in zip(self.layer_names, self.layer_params, strict=True)]

    def shard_specs(self) -> list[ShardSpec]:
        """This rank's rows of every parameter (FSDP2's dim-0 split, ``ceil(d0 / N)`` rows per rank)."""
        return list(self._specs)

    @property
    def _dparams(self) -> list[DTensor]:
        """The parameters, all DTensors (checked at construction)."""
        return cast("list[DTensor]", self.layer_params)

    def param_pieces(self) -> list[Tensor]:
        return [p.to_local().view(-1) for p in self._dparams]

    def grad_pieces(self) -> list[Tensor]:
        out = []
        for p in self._dparams:
            if p.grad is None:
                local = p.to_local()
                out.append(torch.zeros(local.numel(), dtype=local.dtype, device=local.device))
            else:
                out.append(cast("DTensor", p.grad).to_local().view(-1))  # a DTensor's gradient is one
        return out

    def owned_params(self) -> list[Tensor]:
        """The local shards (the parameters are split over the ranks already)."""
        return self.param_pieces()

    @torch.no_grad()
    def gather_params(self, pieces: Sequence[Tensor]) -> None:
        """Set the local shards from ``pieces`` (no communication: the parameters stay sharded)."""
        torch._foreach_copy_(self.param_pieces(), list(pieces))

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate unsharded gradients locally; the next backward outside reduce-scatters them."""
        from torch.distributed.fsdp import FSDPModule

        model = self.model
        if not isinstance(model, FSDPModule):
            raise TypeError("FSDP2Optimizer.no_sync: the model is not fully_shard-ed")
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    # -- state: DTensors with the parameters' placements (reshardable through DCP) ------------------
    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.tensor import DTensor

        state: dict[str, dict[str, Any]] = {}
        for name, p, entry in zip(
            self.layer_names, self._dparams, self.sharded_state().values(), strict=True
        ):
            state[name] = {
                k: piece
                if piece.dim() == 0
                else DTensor.from_local(
                    piece.view(p.to_local().shape),
                    p.device_mesh,
                    p.placements,
                    shape=p.shape,
                    stride=p.stride(),
                    run_check=False,
                )
                for k, piece in entry.items()
            }
        return {"state": state, **self._counters()}

    def shard_state_dict(self) -> dict[str, Any]:
        """Same as :meth:`state_dict` (the state is already sharded DTensors)."""
        return self.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load DTensor state (any world size, via DCP), full plain tensors (sliced to this shard) or,
        with ``offsets``, plain pieces by global element offset (the state API's format)."""
        from torch.distributed.tensor import DTensor

        st = state_dict["state"]
        if "offsets" in state_dict and not any(
            isinstance(v, DTensor) for entry in st.values() for v in entry.values()
        ):  # pieces by global offset (dist-opt's checkpoints, shard_state_dict of the state API)
            super().load_state_dict(state_dict)
            return
        pieces: dict[str, dict[str, Tensor]] = {}
        offsets: dict[str, int] = {}
        for s, p in zip(self._specs, self._dparams, strict=True):
            if s.name not in st:
                continue  # load_sharded_state names every missing parameter
            entry = pieces[s.name] = {}
            offsets[s.name] = s.offset
            for k, src in st[s.name].items():
                if src.dim() > 0 and tuple(src.shape) != tuple(p.shape):
                    raise ValueError(
                        f"optimizer state {s.name}.{k}: shape {tuple(src.shape)} for a "
                        f"parameter {tuple(p.shape)}"
                    )
                if isinstance(src, DTensor):
                    if src.dim() > 0 and tuple(src.placements) != tuple(p.placements):
                        src = src.redistribute(p.device_mesh, p.placements)
                    src = src.full_tensor() if src.dim() == 0 else src.to_local()
                elif src.dim() > 0:
                    src = src.reshape(-1)[s.offset : s.end]
                entry[k] = src
        self.load_sharded_state(pieces, offsets)
        self._load_counters(state_dict)


def _row_spec(name: str, p: Any) -> ShardSpec:
    """This rank's rows of a DTensor parameter sharded on dim 0, as elements of the flattened one."""
    shape, numel = tuple(p.shape), p.numel()
    world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    d0 = shape[0] if shape else 1
    rows = -(-d0 // world)
    row = numel // d0 if d0 else 0
    lo = min(rank * rows, d0)
    return ShardSpec(name, shape, numel, lo * row, p.to_local().numel(), rows * row, world)
