"""The one step sequence and state API of every dist-opt engine optimizer.

:class:`PieceOptimizer` applies a dist-opt ``Rule`` to this rank's *pieces* of every parameter:
1-D views such as the native engine's shard of its flat buffer, this rank's chunk of a replicated
parameter (DeepSpeed ZeRO-0) or the local shard of an FSDP2 DTensor. Subclasses say what a piece is
(:meth:`~PieceOptimizer.param_pieces`, :meth:`~PieceOptimizer.grad_pieces`,
:meth:`~PieceOptimizer.shard_specs`) and what follows an update (:meth:`~PieceOptimizer.after_update`,
e.g. the parameter all-gather). Every step is the same sequence:

1. squared norms of the (already reduced) gradient pieces, plus any extra entries a subclass
   needs summed over ranks, in ONE small all-reduce (none when the pieces are whole tensors);
2. a non-finite global norm skips the step on every rank (they all see the same sum);
3. clipping to ``max_grad_norm``;
4. ``rule.step`` with a ``StepContext`` whose ``layer_sumsq`` completes per-layer partial sums with
   one all-reduce, so LARS/LAMB trust ratios are those of whole layers;
5. :meth:`~PieceOptimizer.after_update`.

Layers are in the native layout's order (reverse registration) and grouped by ``group_key``, so
trust-ratio statistics and param groups line up across engines.

The state API (what checkpoints and SWA use instead of an engine's buffers) is the mixin
:class:`~dist_opt.engine.state_api.ShardStateAPI`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dist_opt.dist.collectives import Comm
from dist_opt.engine.state_api import ShardStateAPI
from dist_opt.optim.base import GroupShard, Rule, StepContext
from dist_opt.optim.light import LightOptimizer
from dist_opt.optim.registry import group_key
from dist_opt.optim.spec import DEFAULT_EXCLUDE

__all__ = ["DEFAULT_EXCLUDE", "GroupOptions", "PieceOptimizer", "build_param_groups"]

if TYPE_CHECKING:
    from dist_opt.config.schema import OptimizerConfig


@dataclass(frozen=True)
class GroupOptions:
    """How parameters are put into param groups (the ``optimizer.*`` keys of the same names).

    1-D parameters (biases, norm weights) get no trust ratio (LARS/LAMB) and, with ``exclude_1d``,
    no weight decay; name patterns (see ``group_key``) exclude more; ``lr_multipliers`` maps name
    regexes to lr factors (the first match wins)."""

    weight_decay: float = 0.0
    exclude_from_weight_decay: tuple[str, ...] = DEFAULT_EXCLUDE
    exclude_from_trust_ratio: tuple[str, ...] = DEFAULT_EXCLUDE
    lr_multipliers: Mapping[str, float] = field(default_factory=dict)
    exclude_1d: bool = True

    @classmethod
    def from_config(cls, o: OptimizerConfig) -> GroupOptions:
        """The options of a config's ``optimizer`` section."""
        return cls(
            o.weight_decay,
            tuple(o.exclude_from_weight_decay),
            tuple(o.exclude_from_trust_ratio),
            dict(o.lr_multipliers),
        )


def build_param_groups(
    named: Sequence[tuple[str, nn.Parameter]], rule: Rule, lr: float, options: GroupOptions
) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """``torch.optim`` param groups of ``named`` (in the given order) and the indices in each group.

    Each group holds ``params``, ``lr`` (``lr`` x the group's multiplier), ``weight_decay``, the
    rule's :meth:`~dist_opt.optim.base.Rule.group_hyper` (``momentum`` or ``betas``, as in torch.optim's
    groups, which momentum-cycling schedulers change), ``trust``, ``lr_mult`` and the parameter
    ``names``; groups appear in order of their first parameter."""
    keys: dict[Any, list[int]] = {}
    for i, (name, p) in enumerate(named):
        k = group_key(
            name,
            p,
            weight_decay=options.weight_decay,
            exclude_wd=options.exclude_from_weight_decay,
            exclude_trust=options.exclude_from_trust_ratio,
            lr_multipliers=dict(options.lr_multipliers),
            trust_rule=rule.uses_trust_ratio,
            exclude_1d=options.exclude_1d,
        )
        keys.setdefault(k, []).append(i)
    hyper = rule.group_hyper()
    groups, layers = [], []
    for k, idx in keys.items():
        groups.append(
            {
                "params": [named[i][1] for i in idx],
                "lr": lr * k.lr_mult,
                "weight_decay": k.weight_decay,
                **hyper,
                "trust": k.trust,
                "lr_mult": k.lr_mult,
                "names": [named[i][0] for i in idx],
            }
        )
        layers.append(idx)
    return groups, layers


def optimizer_defaults(rule: Rule, lr: float, options: GroupOptions) -> dict[str, Any]:
    """The ``defaults`` of an engine optimizer: ``lr``, ``weight_decay`` and the rule's group
    hyper-parameters (torch schedulers look for ``momentum`` / ``betas`` there)."""
    return {"lr": lr, "weight_decay": options.weight_decay, **rule.group_hyper()}


class PieceOptimizer(ShardStateAPI, LightOptimizer):
    """A rule over this rank's pieces of parameters whose gradients are already averaged.

    Class attributes a subclass may change: ``partial`` (pieces are parts of layers, so norms need
    the all-reduce; may also be set per instance), ``gathers_params`` (``after_update`` all-gathers
    parameters, reported as ``time/param_all_gather_ms``) and ``norm_time_key`` (the stats key of
    the time from the norms to the update, or None).
    """

    partial: bool = True
    gathers_params: bool = False
    norm_time_key: str | None = "time/grad_norm_ms"

    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        rule: Rule,
        *,
        lr: float,
        groups: GroupOptions | None = None,
        max_grad_norm: float | None = None,
        comm: Comm | None = None,
    ):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        if not named:
            raise ValueError(f"{type(self).__name__} got no parameters that require grad")
        named.reverse()  # the native layout's layer order
        self.rule = rule
        self._comm = comm if comm is not None else Comm()
        self.max_grad_norm = max_grad_norm
        self.layer_names = [n for n, _ in named]
        self.layer_params = [p for _, p in named]
        self.layer_shapes = [tuple(p.shape) for p in self.layer_params]
        options = groups if groups is not None else GroupOptions()
        param_groups, self._group_layers = build_param_groups(named, rule, lr, options)
        super().__init__(param_groups, optimizer_defaults(rule, lr, options))
        self.shard_state: dict[str, list[Tensor]] = rule.init_state(self.param_pieces())
        self.applied_steps = 0
        self.skipped_steps = 0
        self.overflow = False  # the last step was skipped (DeepSpeed reads this attribute)
        self.last_stats: dict[str, Any] = {}

    @property
    def comm(self) -> Comm:
        """The collectives of the ranks this optimizer spans (process group, rank, world, traffic ledger)."""
        return self._comm

    # -- what a piece is ---------------------------------------------------------------------
    def param_pieces(self) -> list[Tensor]:
        """This rank's piece of every layer (1-D views into the parameters' storage)."""
        raise NotImplementedError

    def grad_pieces(self) -> list[Tensor]:
        """The averaged gradient of every piece (zeros for a layer without a gradient)."""
        raise NotImplementedError

    def after_update(self) -> None:
        """Called after the rule updated the pieces (nothing by default)."""

    # -- the step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> bool:  # type: ignore[override]
        """Check, clip, apply the rule to the pieces. Returns False if the step was skipped."""
        if closure is not None:
            raise ValueError(f"{type(self).__name__}.step does not take a closure")
        t0 = time.perf_counter()
        params, grads = self.param_pieces(), self.grad_pieces()
        stats: dict[str, Any] = {}
        grad_sq, _ = self._reduce_norms(grads, stats)
        return self._update(params, grads, grad_sq, stats, t0)

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 (always to None)
        for p in self.layer_params:
            p.grad = None

    def _reduce_norms(
        self, grads: Sequence[Tensor], stats: dict[str, Any], extra: Tensor | None = None
    ) -> tuple[float, float | None]:
        """Global ||grad||² (sets ``stats["grad_norm"]``) and the rank-sum of ``extra`` (a scalar),
        in one all-reduce."""
        n = len(grads)
        vec = torch.zeros(n + (extra is not None), dtype=torch.float64)
        if n:
            vec[:n] = torch.stack(torch._foreach_norm(list(grads))).double().square()
        if extra is not None:
            vec[n] = extra
        if self.partial:
            self._comm.all_reduce(vec)
        elif extra is not None:  # whole tensors: only the extra entry needs summing
            self._comm.all_reduce(vec[n:])
        grad_sq = float(vec[:n].sum())
        stats["grad_norm"] = math.sqrt(grad_sq) if math.isfinite(grad_sq) else float("nan")
        return grad_sq, (float(vec[n]) if extra is not None else None)

    def _update(
        self, params: list[Tensor], grads: list[Tensor], grad_sq: float, stats: dict[str, Any], t0: float
    ) -> bool:
        """Skip (non-finite) or clip, update, :meth:`after_update`; record ``stats``. Returns applied."""
        if not math.isfinite(grad_sq):
            self.skipped_steps += 1
            self.overflow = True
            stats["skipped"] = 1
            self.last_stats = stats
            return False
        self.overflow = False
        if self.max_grad_norm is not None:
            coef = self.max_grad_norm / (stats["grad_norm"] + 1e-6)
            if coef < 1.0:
                torch._foreach_mul_(grads, coef)
                stats["clip_coef"] = coef
        ctx = StepContext(
            step=self.applied_steps + 1,
            n_layers=len(params),
            layer_sumsq=self._layer_sumsq,
            layer_names=self.layer_names,
            stats=stats,
            comm=self._comm,
        )
        t1 = time.perf_counter()
        self.rule.step(self._group_shards(params, grads), ctx)
        self.applied_steps += 1
        t2 = time.perf_counter()
        self.after_update()
        stats["time/optimizer_ms"] = 1e3 * (t2 - t1)
        if self.norm_time_key is not None:
            stats[self.norm_time_key] = 1e3 * (t1 - t0)
        if self.gathers_params:
            stats["time/param_all_gather_ms"] = 1e3 * (time.perf_counter() - t2)
        stats["skipped"] = 0
        self.last_stats = stats
        return True

    def _layer_sumsq(self, partial: Tensor) -> Tensor:
        if self.partial:
            self._comm.all_reduce(partial)
        return partial

    def _group_shards(self, params: list[Tensor], grads: list[Tensor]) -> list[GroupShard]:
        out = []
        for g, idx in zip(self.param_groups, self._group_layers, strict=True):
            out.append(
                GroupShard(
                    hp=g,
                    layers=idx,
                    params=[params[i] for i in idx],
                    grads=[grads[i] for i in idx],
                    state={k: [v[i] for i in idx] for k, v in self.shard_state.items()},
                    shapes=[self.layer_shapes[i] for i in idx],
                )
            )
        return out
