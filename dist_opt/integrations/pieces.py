"""dist-opt update rules as ``torch.optim.Optimizer`` s over gradients another engine reduced.

DeepSpeed and FSDP2 own the gradient reduction (and, for FSDP2, the parameter sharding); what
they need from dist-opt is an optimizer. :class:`~dist_opt.engine.core.PieceOptimizer` (the native
engine's step sequence and state API) applies a dist-opt ``Rule`` to this rank's *pieces* of every
parameter; :class:`ChunkedOptimizer` here gives it the native layout over replicated parameters
(DeepSpeed ZeRO-0), ``fsdp2.FSDP2Optimizer`` the local shards of DTensors.

:class:`LocalRuleOptimizer` is the other shape: a rule over whatever flat tensors DeepSpeed's
ZeRO-1/2 puts into ``param_groups`` (elementwise rules only; layer boundaries are gone there).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from dist_opt.dist.collectives import Comm
from dist_opt.engine.core import GroupOptions, PieceOptimizer, build_param_groups, optimizer_defaults
from dist_opt.engine.partition import make_layout
from dist_opt.engine.state_codec import ShardSpec, all_gather_pieces, layout_specs
from dist_opt.optim.base import GroupShard, Rule, local_context
from dist_opt.optim.light import LightOptimizer

__all__ = ["ChunkedOptimizer", "LocalRuleOptimizer", "PieceOptimizer"]


class LocalRuleOptimizer(LightOptimizer):
    """An elementwise rule over the tensors in ``param_groups``, state in ``self.state[p]``.

    This is the client optimizer for DeepSpeed ZeRO-1/2, which replaces each group's params by
    one flat fp32 partition per rank and calls ``step()`` once per group; the rule sees each
    partition as one piece. A trust-ratio rule would see flattened groups instead of layers, so
    it is refused.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        rule: Rule,
        *,
        groups: GroupOptions | None = None,
        lr: float,
    ):
        if rule.uses_trust_ratio or rule.replicated_pieces:
            raise ValueError(
                f"{type(rule).__name__} needs whole layers; LocalRuleOptimizer steps flat partitions"
            )
        named = [(n, p) for n, p in named_params if p.requires_grad]
        named.reverse()
        options = groups if groups is not None else GroupOptions()
        param_groups, _ = build_param_groups(named, rule, lr, options)
        super().__init__(param_groups, optimizer_defaults(rule, lr, options))
        self.rule = rule

    @property
    def applied_steps(self) -> int:
        """Steps applied so far (kept per partition in ``state``, so it survives a state_dict round trip)."""
        return max(
            (int(st["applied_steps"]) for st in self.state.values() if "applied_steps" in st), default=0
        )

    def ensure_state(self, p: Tensor) -> dict[str, Any]:
        """``p``'s state, created by the rule (zeros, step 0) if it has none yet."""
        if not self.state[p]:
            self.state[p].update({k: v[0] for k, v in self.rule.init_state([p]).items()})
            self.state[p]["applied_steps"] = 0
        return self.state[p]

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("LocalRuleOptimizer.step does not take a closure")
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                self.ensure_state(p)
            t = self.state[params[0]]["applied_steps"] + 1
            names = [k for k in self.state[params[0]] if k != "applied_steps"]
            shard = GroupShard(
                hp=g,
                layers=list(range(len(params))),
                params=params,
                grads=[p.grad for p in params],
                state={k: [self.state[p][k] for p in params] for k in names},
                shapes=[tuple(p.shape) for p in params],
            )
            self.rule.step([shard], local_context(t, len(params)))
            for p in params:
                self.state[p]["applied_steps"] = t


class ChunkedOptimizer(PieceOptimizer):
    """Replicated parameters with replicated, averaged gradients (DeepSpeed ZeRO stage 0): each rank
    updates and keeps the state of its chunk of every layer (the native engine's layout, so its
    checkpoints use the same format), then one all-gather makes the parameters whole again.

    A rule with ``replicated_pieces`` (Shampoo) distributes its own work over whole tensors.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        rule: Rule,
        *,
        shard: bool = True,
        comm: Comm | None = None,
        **kw: Any,
    ):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        comm = comm if comm is not None else Comm()
        bad = [n for n, p in named if not p.is_contiguous()]
        if bad:
            raise ValueError(f"ChunkedOptimizer needs contiguous parameters: {', '.join(bad[:5])}")
        world = comm.world if shard and not rule.replicated_pieces else 1
        layout = make_layout([(n, tuple(p.shape)) for n, p in named], world, bucket_numel=2**62)
        self._specs = layout_specs(layout, comm.rank if world > 1 else 0)
        self.partial = self.gathers_params = world > 1
        super().__init__(named, rule, comm=comm, **kw)
        assert [s.name for s in self._specs] == self.layer_names
        self._send = torch.zeros(layout.shard_numel, dtype=named[0][1].dtype, device=named[0][1].device)

    def shard_specs(self) -> list[ShardSpec]:
        return list(self._specs)

    def param_pieces(self) -> list[Tensor]:
        return [
            p.detach().view(-1)[s.offset : s.end] for s, p in zip(self._specs, self.layer_params, strict=True)
        ]

    def grad_pieces(self) -> list[Tensor]:
        out = []
        for s, p in zip(self._specs, self.layer_params, strict=True):
            out.append(
                p.grad.detach().view(-1)[s.offset : s.end]
                if p.grad is not None
                else torch.zeros(s.valid, dtype=p.dtype, device=p.device)
            )
        return out

    def after_update(self) -> None:
        """All-gather the updated chunks into every rank's full parameters (one collective)."""
        if self.partial:
            dsts = [p.detach().view(-1) for p in self.layer_params]
            all_gather_pieces(self.comm, self._specs, self.param_pieces(), dsts, send=self._send)
