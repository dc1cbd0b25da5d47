"""dist-opt update rules as ``torch.optim.Optimizer`` s over gradients another engine reduced.

DeepSpeed and FSDP2 own the gradient reduction (and, for FSDP2, the parameter sharding); what
they need from dist-opt is an optimizer. :class:`PieceOptimizer` applies a dist-opt ``Rule`` to
this rank's *pieces* of every parameter (1-D views: a chunk of a replicated parameter, or the
local shard of a DTensor) with the same contract as the native engine: per-layer norms for
LARS/LAMB are partial sums of squares over the pieces, completed by ONE all-reduce of a small
``[k, n_layers]`` matrix per step (``StepContext.layer_sumsq``), the global gradient norm (for the
non-finite check and ``optimizer.max_grad_norm`` clipping) by one more, and a step whose gradient
is not finite is skipped on every rank.

Layers are ordered as in the native engine (reverse registration order) and grouped by the same
``group_key`` (weight decay / trust-ratio exclusions, lr multipliers), so trust-ratio statistics
and param groups line up across engines.

:class:`LocalRuleOptimizer` is the other shape: a rule over whatever flat tensors DeepSpeed's
ZeRO-1/2 puts into ``param_groups`` (elementwise rules only; layer boundaries are gone there).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dist_opt.dist.collectives import Comm
from dist_opt.engine.partition import Slot, make_layout
from dist_opt.optim.base import GroupShard, Rule, StepContext, local_context
from dist_opt.optim.registry import group_key

DEFAULT_EXCLUDE = ("bias", "norm", "bn", "ln")


def grouped(
    named: Sequence[tuple[str, nn.Parameter]],
    rule: Rule,
    *,
    lr: float,
    weight_decay: float,
    exclude_from_weight_decay: Iterable[str],
    exclude_from_trust_ratio: Iterable[str],
    lr_multipliers: dict[str, float] | None,
    exclude_1d: bool = True,
) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """torch.optim param groups (native engine keys) and the layer indices of each group."""
    keys: dict[Any, list[int]] = {}
    exclude_wd, exclude_trust = tuple(exclude_from_weight_decay), tuple(exclude_from_trust_ratio)
    for i, (name, p) in enumerate(named):
        k = group_key(
            name,
            p,
            weight_decay=weight_decay,
            exclude_wd=exclude_wd,
            exclude_trust=exclude_trust,
            lr_multipliers=lr_multipliers or {},
            trust_rule=rule.uses_trust_ratio,
            exclude_1d=exclude_1d,
        )
        keys.setdefault(k, []).append(i)
    groups, layers = [], []
    for k, idx in keys.items():
        groups.append(
            {
                "params": [named[i][1] for i in idx],
                "lr": lr * k.lr_mult,
                "weight_decay": k.weight_decay,
                "trust": k.trust,
                "lr_mult": k.lr_mult,
                "names": [named[i][0] for i in idx],
            }
        )
        layers.append(idx)
    return groups, layers


class PieceOptimizer(torch.optim.Optimizer):
    """A rule over this rank's pieces of parameters whose gradients are already averaged.

    Subclasses say what a piece is (:meth:`param_pieces`, :meth:`grad_pieces`), whether pieces
    are partial (``self.partial``: norms need the all-reduce) and what happens after the update
    (:meth:`after_update`, e.g. an all-gather of replicated parameters).
    """

    partial: bool = True
    gathers_params: bool = False

    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        rule: Rule,
        *,
        lr: float,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        exclude_from_weight_decay: Iterable[str] = DEFAULT_EXCLUDE,
        exclude_from_trust_ratio: Iterable[str] = DEFAULT_EXCLUDE,
        lr_multipliers: dict[str, float] | None = None,
        comm: Comm | None = None,
    ):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        if not named:
            raise ValueError(f"{type(self).__name__} got no parameters that require grad")
        named.reverse()  # the native layout's layer order
        self.rule = rule
        self.comm = comm if comm is not None else Comm()
        self.max_grad_norm = max_grad_norm
        self.layer_names = [n for n, _ in named]
        self.layer_params = [p for _, p in named]
        self.shapes = [tuple(p.shape) for p in self.layer_params]
        groups, self._group_layers = grouped(
            named,
            rule,
            lr=lr,
            weight_decay=weight_decay,
            exclude_from_weight_decay=exclude_from_weight_decay,
            exclude_from_trust_ratio=exclude_from_trust_ratio,
            lr_multipliers=lr_multipliers,
        )
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})
        self.shard_state: dict[str, list[Tensor]] = rule.init_state(self.param_pieces())
        self.applied_steps = 0
        self.skipped_steps = 0
        self.overflow = False  # DeepSpeed reads this attribute to count a skipped step
        self.last_stats: dict[str, Any] = {}

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
        n = len(params)
        sq = torch.zeros(n, dtype=torch.float64)
        if n:
            sq[:] = torch.stack(torch._foreach_norm(grads)).double().square()
        if self.partial:
            self.comm.all_reduce(sq)
        grad_sq = float(sq.sum())
        grad_norm = math.sqrt(grad_sq) if math.isfinite(grad_sq) else float("nan")
        stats: dict[str, Any] = {"grad_norm": grad_norm}
        if not math.isfinite(grad_sq):
            self.skipped_steps += 1
            self.overflow = True
            stats["skipped"] = 1
            self.last_stats = stats
            return False
        self.overflow = False
        if self.max_grad_norm is not None:
            coef = self.max_grad_norm / (grad_norm + 1e-6)
            if coef < 1.0:
                torch._foreach_mul_(grads, coef)
                stats["clip_coef"] = coef
        ctx = StepContext(
            step=self.applied_steps + 1,
            n_layers=n,
            layer_sumsq=self._layer_sumsq,
            layer_names=self.layer_names,
            stats=stats,
            comm=self.comm,
        )
        t1 = time.perf_counter()
        self.rule.step(self._group_shards(params, grads), ctx)
        self.applied_steps += 1
        t2 = time.perf_counter()
        self.after_update()
        stats["time/optimizer_ms"] = 1e3 * (t2 - t1)
        stats["time/grad_norm_ms"] = 1e3 * (t1 - t0)
        if self.gathers_params:
            stats["time/param_all_gather_ms"] = 1e3 * (time.perf_counter() - t2)
        stats["skipped"] = 0
        self.last_stats = stats
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 (always to None)
        for p in self.layer_params:
            p.grad = None

    def _layer_sumsq(self, partial: Tensor) -> Tensor:
        if self.partial:
            self.comm.all_reduce(partial)
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
                    shapes=[self.shapes[i] for i in idx],
                )
            )
        return out

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank."""
        return sum(t.numel() * t.element_size() for v in self.shard_state.values() for t in v)

    def _counters(self) -> dict[str, Any]:
        return {
            "applied_steps": self.applied_steps,
            "skipped_steps": self.skipped_steps,
            "rule_state": self.rule.rule_state_dict(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
        }

    def _load_counters(self, sd: dict[str, Any]) -> None:
        self.rule.load_rule_state_dict(sd.get("rule_state", {}))
        self.applied_steps = int(sd.get("applied_steps", 0))
        self.skipped_steps = int(sd.get("skipped_steps", 0))
        for g, saved in zip(self.param_groups, sd.get("param_groups", []), strict=False):
            for k in ("lr", "initial_lr"):
                if k in saved:
                    g[k] = saved[k]


class LocalRuleOptimizer(torch.optim.Optimizer):
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
        lr: float,
        weight_decay: float = 0.0,
        exclude_from_weight_decay: Iterable[str] = DEFAULT_EXCLUDE,
        exclude_from_trust_ratio: Iterable[str] = DEFAULT_EXCLUDE,
        lr_multipliers: dict[str, float] | None = None,
    ):
        if rule.uses_trust_ratio or rule.replicated_pieces:
            raise ValueError(
                f"{type(rule).__name__} needs whole layers; LocalRuleOptimizer steps flat partitions"
            )
        named = [(n, p) for n, p in named_params if p.requires_grad]
        named.reverse()
        groups, _ = grouped(
            named,
            rule,
            lr=lr,
            weight_decay=weight_decay,
            exclude_from_weight_decay=exclude_from_weight_decay,
            exclude_from_trust_ratio=exclude_from_trust_ratio,
            lr_multipliers=lr_multipliers,
        )
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})
        self.rule = rule

    @property
    def applied_steps(self) -> int:
        """Steps applied so far (kept per partition in ``state``, so it survives a state_dict round trip)."""
        return max(
            (int(st["applied_steps"]) for st in self.state.values() if "applied_steps" in st), default=0
        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("LocalRuleOptimizer.step does not take a closure")
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p].update({k: v[0] for k, v in self.rule.init_state([p]).items()})
                    self.state[p]["applied_steps"] = 0
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
        self.layout = make_layout([(n, tuple(p.shape)) for n, p in named], world, bucket_numel=2**62)
        self.shard_rank = comm.rank if world > 1 else 0
        self.partial = self.gathers_params = world > 1
        super().__init__(named, rule, comm=comm, **kw)
        assert [s.name for s in self.layout.slots] == self.layer_names
        self._send = torch.zeros(self.layout.shard_numel, dtype=named[0][1].dtype, device=named[0][1].device)

    def _span(self, s: Slot) -> tuple[int, int]:
        """(start, length) of this rank's valid elements of a slot in the flattened parameter."""
        if self.layout.world == 1:
            return 0, s.numel
        return s.global_offset(self.shard_rank), s.valid(self.shard_rank)

    def param_pieces(self) -> list[Tensor]:
        out = []
        for s, p in zip(self.layout.slots, self.layer_params, strict=True):
            lo, n = self._span(s)
            out.append(p.detach().view(-1)[lo : lo + n])
        return out

    def grad_pieces(self) -> list[Tensor]:
        out = []
        for s, p in zip(self.layout.slots, self.layer_params, strict=True):
            lo, n = self._span(s)
            out.append(
                p.grad.detach().view(-1)[lo : lo + n]
                if p.grad is not None
                else torch.zeros(n, dtype=p.dtype, device=p.device)
            )
        return out

    def after_update(self) -> None:
        """All-gather the updated chunks into every rank's full parameters (one collective)."""
        w = self.layout.world
        if w == 1:
            return
        dst, src = [], []
        for s, piece in zip(self.layout.slots, self.param_pieces(), strict=True):
            dst.append(self._send[s.shard_offset : s.shard_offset + piece.numel()])
            src.append(piece)
        torch._foreach_copy_(dst, src)
        out = torch.empty(w * self.layout.shard_numel, dtype=self._send.dtype, device=self._send.device)
        self.comm.all_gather(out, self._send)
        mat = out.view(w, self.layout.shard_numel)
        dst, src = [], []
        for s, p in zip(self.layout.slots, self.layer_params, strict=True):
            dst.append(p.detach().view(-1))
            src.append(mat[:, s.shard_offset : s.shard_offset + s.chunk].reshape(-1)[: s.numel])
        torch._foreach_copy_(dst, src)

    # -- state: the native engine's format ------------------------------------------------------
    def shard_state_dict(self) -> dict[str, Any]:
        """This rank's state: per parameter name its valid piece of every state tensor, starting at
        ``offsets[name]`` of the flattened parameter (as ``ShardedOptimizer.shard_state_dict``)."""
        state = {s.name: {k: v[s.index] for k, v in self.shard_state.items()} for s in self.layout.slots}
        return {
            "state": state,
            "offsets": {s.name: self._span(s)[0] for s in self.layout.slots},
            "numel": {s.name: s.numel for s in self.layout.slots},
            **self._counters(),
        }

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The full state gathered on every rank (a collective: call on all ranks)."""
        sd = self.shard_state_dict()
        sd["state"] = {
            s.name: {k: self._gather_full(v[s.index], s) for k, v in self.shard_state.items()}
            for s in self.layout.slots
        }
        sd["offsets"] = {s.name: 0 for s in self.layout.slots}
        return sd

    def _gather_full(self, piece: Tensor, s: Slot) -> Tensor:
        if piece.dim() == 0 or self.layout.world == 1:
            return piece.clone()
        padded = torch.zeros(s.chunk, dtype=piece.dtype, device=piece.device)
        padded[: piece.numel()] = piece
        out = torch.empty(s.chunk * self.layout.world, dtype=piece.dtype, device=piece.device)
        self.comm.all_gather(out, padded)
        return out[: s.numel].clone()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a full state (``state_dict()``, any world size) or this rank's ``shard_state_dict()``."""
        st, offsets = state_dict["state"], state_dict.get("offsets", {})
        missing = [s.name for s in self.layout.slots if s.name not in st]
        if missing:
            raise KeyError(f"optimizer state has no entry for parameters: {', '.join(missing[:5])}")
        for s in self.layout.slots:
            lo, n = self._span(s)
            for k, bufs in self.shard_state.items():
                if k not in st[s.name]:
                    raise KeyError(f"optimizer state of {s.name} lacks {k!r}")
                src, dst = st[s.name][k], bufs[s.index]
                if dst.dim() == 0:
                    dst.copy_(src)
                    continue
                start = lo - offsets.get(s.name, 0)
                if start < 0 or start + n > src.numel():
                    raise ValueError(
                        f"optimizer state {s.name}.{k}: has {src.numel()} elements from offset "
                        f"{offsets.get(s.name, 0)}, need [{start}, {start + n}) of {s.numel}"
                    )
                dst.copy_(src.reshape(-1)[start : start + n])
        self._load_counters(state_dict)
