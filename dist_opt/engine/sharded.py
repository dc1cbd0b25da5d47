"""The sharded optimizer: gradient sync -> update rule on this rank's shard -> parameter all-gather.

A ``torch.optim.Optimizer`` subclass so that ``param_groups[i]["lr"]`` can be driven by any
``torch.optim.lr_scheduler``; the model's parameters become views into one flat buffer, and
gradients are synchronised by hooks during backward (see ``grad_sync``).

    opt = ShardedOptimizer(model.named_parameters(), "lamb", lr=1e-3, weight_decay=0.01, zero_stage=2)
    loss.backward(); opt.step(); opt.zero_grad()

zero_stage 0: all-reduce, every rank holds all state and updates everything (DDP-like).
zero_stage 1: all-reduce, each rank updates and keeps state for its 1/N of every tensor, all-gather.
zero_stage 2: reduce-scatter into grad shards, shard update, all-gather (one all-reduce's volume).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dist_opt.dist.collectives import Comm
from dist_opt.engine.grad_sync import GradSync
from dist_opt.engine.partition import Layout, Slot, make_layout
from dist_opt.optim.base import GroupShard, Rule, StepContext
from dist_opt.optim.registry import build_rule, group_key

DEFAULT_EXCLUDE = ("bias", "norm", "bn", "ln")


class ShardedOptimizer(torch.optim.Optimizer):
    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        name: str | Rule = "adamw",
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        zero_stage: int = 1,
        process_group: dist.ProcessGroup | None = None,
        bucket_mb: float = 25.0,
        max_grad_norm: float | None = None,
        exclude_from_weight_decay: Iterable[str] = DEFAULT_EXCLUDE,
        exclude_from_trust_ratio: Iterable[str] = DEFAULT_EXCLUDE,
        lr_multipliers: dict[str, float] | None = None,
        exclude_1d_from_weight_decay: bool = True,
        track_local_grad_norm: bool = False,
        broadcast_params: bool = True,
        **hyper: Any,
    ):
        if zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2, got {zero_stage}")
        named = [(n, p) for n, p in named_params if p.requires_grad]
        if not named:
            raise ValueError("ShardedOptimizer got no parameters that require grad")
        self.rule: Rule = name if isinstance(name, Rule) else build_rule(name, **hyper)
        self.name = name if isinstance(name, str) else type(name).__name__.lower()
        if self.rule.replicated_pieces:
            zero_stage = 0  # the rule shards its own work across ranks
        self.zero_stage = zero_stage
        self.max_grad_norm = max_grad_norm
        self.comm = Comm(process_group)
        shard_world = self.comm.world if zero_stage > 0 else 1
        self.shard_rank = self.comm.rank if zero_stage > 0 else 0
        bucket_numel = max(1, int(bucket_mb * 2**20 / 4))
        self.layout: Layout = make_layout([(n, tuple(p.shape)) for n, p in named], shard_world, bucket_numel)
        by_name = dict(named)
        self._slot_params = [by_name[s.name] for s in self.layout.slots]
        dtype = named[0][1].dtype
        device = named[0][1].device
        if any(p.dtype != dtype or p.device != device for _, p in named):
            raise ValueError("ShardedOptimizer needs all parameters on one device with one dtype")

        # groups, in slot order, as torch.optim param_groups (so schedulers can drive lr)
        keys = {}
        for s, p in zip(self.layout.slots, self._slot_params, strict=True):
            k = group_key(s.name, p, weight_decay=weight_decay, exclude_wd=exclude_from_weight_decay,
                          exclude_trust=exclude_from_trust_ratio, lr_multipliers=lr_multipliers or {},
                          trust_rule=self.rule.uses_trust_ratio, exclude_1d=exclude_1d_from_weight_decay)
            keys.setdefault(k, []).append(s.index)
        groups = []
        self._group_slots: list[list[int]] = []
        for k, idx in keys.items():
            groups.append({
                "params": [self._slot_params[i] for i in idx], "lr": lr * k.lr_mult,
                "weight_decay": k.weight_decay, "trust": k.trust, "lr_mult": k.lr_mult,
                "names": [self.layout.slots[i].name for i in idx],
            })
            self._group_slots.append(idx)
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})

        # flat buffers; parameters become views into the full one
        self.full_param = torch.zeros(self.layout.full_numel, dtype=dtype, device=device)
        with torch.no_grad():
            for s, p in zip(self.layout.slots, self._slot_params, strict=True):
                view = self.full_param[s.full_offset:s.full_offset + s.numel]
                view.copy_(p.detach().reshape(-1))
                p.data = view.view(s.shape)
        if broadcast_params:
            self.comm.broadcast(self.full_param, src=0)
        if zero_stage == 2:
            self.full_grad = None
            self.shard_grad = torch.zeros(self.layout.shard_numel, dtype=dtype, device=device)
        else:
            self.full_grad = torch.zeros(self.layout.full_numel, dtype=dtype, device=device)
            self.shard_grad = None
            for s, p in zip(self.layout.slots, self._slot_params, strict=True):
                p.grad = self.full_grad[s.full_offset:s.full_offset + s.numel].view(s.shape)
        self.sync = GradSync(self._slot_params, self.layout, self.comm, zero_stage, self.full_grad,
                             self.shard_grad, track_local_norm=track_local_grad_norm)

        # this rank's pieces (views) and the rule's state for them
        self.param_pieces = [self._piece(self.full_param, s) for s in self.layout.slots]
        if zero_stage == 2:
            self.grad_pieces = [self.shard_grad[s.shard_offset:s.shard_offset + s.chunk] for s in self.layout.slots]
        else:
            self.grad_pieces = [self._piece(self.full_grad, s) for s in self.layout.slots]
        self.shard_state: dict[str, list[Tensor]] = self.rule.init_state(self.param_pieces)
        self.applied_steps = 0
        self.skipped_steps = 0
        self.last_stats: dict[str, Any] = {}
        self._send = torch.empty(self.layout.shard_numel, dtype=dtype, device=device) if shard_world > 1 else None

    # -- layout helpers ---------------------------------------------------------------------------
    def _piece(self, buf: Tensor, s: Slot) -> Tensor:
        """This rank's chunk of a slot in a full buffer (the whole tensor when not sharded)."""
        if self.layout.world == 1:
            return buf[s.full_offset:s.full_offset + s.numel]
        start = s.full_offset + self.shard_rank * s.chunk
        return buf[start:start + s.chunk]

    @property
    def world_size(self) -> int:
        return self.comm.world

    # -- torch.optim API --------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (stages 0/1); stage 2 reduce-scatters every micro-step."""
        old = self.sync.sync_enabled
        self.sync.sync_enabled = False
        try:
            yield
        finally:
            self.sync.sync_enabled = old

    def zero_grad(self, set_to_none: bool = False) -> None:  # noqa: ARG002 (grads are views)
        self.sync.reset()

    @torch.no_grad()
    def step(self, closure: Any = None) -> bool:  # type: ignore[override]
        """Synchronise, check, clip, update this rank's shard and all-gather. Returns False if skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t0 = time.perf_counter()
        micro_steps = self.sync.finish()
        t1 = time.perf_counter()
        stats: dict[str, Any] = {"time/grad_comm_wait_ms": 1e3 * (t1 - t0)}
        # grad norm (and non-finite check) of the reduced gradient over all shards: one small all-reduce
        n = len(self.layout.slots)
        vec = torch.zeros(n + 1, dtype=torch.float64)
        vec[:n] = torch.stack(torch._foreach_norm(self.grad_pieces)).double().square()
        if self.sync.track_local_norm:
            vec[n] = self.sync.local_sumsq
        if self.layout.world > 1:  # partial sums over shards (+ the local-norm entry)
            self.comm.all_reduce(vec)
        elif self.sync.track_local_norm:  # replicated grads: only the local-norm entry needs summing
            self.comm.all_reduce(vec[n:])
        grad_sq = float(vec[:n].sum())
        grad_norm = math.sqrt(grad_sq) if math.isfinite(grad_sq) else float("nan")
        stats["grad_norm"] = grad_norm
        if self.sync.track_local_norm and self.comm.world > 1:
            mean_local = float(vec[n]) / self.comm.world
            if self.zero_stage == 2:  # per micro-step gradients, each of micro_batch samples
                stats["local_grad_sq"] = mean_local / micro_steps
                stats["local_micro_steps"] = 1
            else:  # accumulated sum of micro-step means
                stats["local_grad_sq"] = mean_local / micro_steps**2
                stats["local_micro_steps"] = micro_steps
            stats["global_grad_sq"] = grad_sq
        if not math.isfinite(grad_sq):
            self.skipped_steps += 1
            stats["skipped"] = 1
            self.last_stats = stats
            self.sync.reset()
            return False if loss is None else loss
        if self.max_grad_norm is not None:
            coef = self.max_grad_norm / (grad_norm + 1e-6)
            if coef < 1.0:
                torch._foreach_mul_(self.grad_pieces, coef)
                stats["clip_coef"] = coef
        ctx = StepContext(step=self.applied_steps + 1, n_layers=n, layer_sumsq=self._layer_sumsq,
                          layer_names=[s.name for s in self.layout.slots], stats=stats, comm=self.comm)
        t2 = time.perf_counter()
        self.rule.step(self._group_shards(), ctx)
        self.applied_steps += 1
        t3 = time.perf_counter()
        self._all_gather_params()
        stats["time/optimizer_ms"] = 1e3 * (t3 - t2)
        stats["time/param_all_gather_ms"] = 1e3 * (time.perf_counter() - t3)
        stats["skipped"] = 0
        self.last_stats = stats
        return True if loss is None else loss

    def _layer_sumsq(self, partial: Tensor) -> Tensor:
        if self.layout.world > 1:
            self.comm.all_reduce(partial)
        return partial

    def _group_shards(self) -> list[GroupShard]:
        out = []
        for g, idx in zip(self.param_groups, self._group_slots, strict=True):
            out.append(GroupShard(
                hp=g, layers=idx, params=[self.param_pieces[i] for i in idx],
                grads=[self.grad_pieces[i] for i in idx],
                state={k: [v[i] for i in idx] for k, v in self.shard_state.items()},
                shapes=[self.layout.slots[i].shape for i in idx],
            ))
        return out

    def _all_gather_params(self) -> None:
        if self.layout.world == 1:
            return
        w = self.layout.world
        torch.cat(self.param_pieces, out=self._send)
        pending = []
        for b in self.layout.buckets:
            out = torch.empty(w * b.shard_numel, dtype=self._send.dtype, device=self._send.device)
            work = self.comm.all_gather(out, self._send[b.shard_start:b.shard_end], async_op=True)
            pending.append((work, b, out))
        for work, b, out in pending:
            if work is not None:
                work.wait()
            mat = out.view(w, b.shard_numel)
            dst, src = [], []
            for i in b.slots:
                s = self.layout.slots[i]
                lo = s.shard_offset - b.shard_start
                dst.append(self.full_param[s.full_offset:s.full_offset + s.chunk * w].view(w, s.chunk))
                src.append(mat[:, lo:lo + s.chunk])
            torch._foreach_copy_(dst, src)

    # -- state ------------------------------------------------------------------------------------
    def shard_state_dict(self) -> dict[str, Any]:
        """This rank's optimizer state: per parameter name, its valid piece of each state tensor
        (a slice of the flattened parameter starting at ``offsets[name]``), plus counters."""
        state: dict[str, dict[str, Tensor]] = {}
        offsets = {}
        for s in self.layout.slots:
            valid = s.valid(self.shard_rank) if self.layout.world > 1 else s.numel
            state[s.name] = {k: self._valid(v[s.index], valid) for k, v in self.shard_state.items()}
            offsets[s.name] = s.global_offset(self.shard_rank) if self.layout.world > 1 else 0
        return {
            "state": state, "offsets": offsets, "numel": {s.name: s.numel for s in self.layout.slots},
            "applied_steps": self.applied_steps, "skipped_steps": self.skipped_steps,
            "rule_state": self.rule.rule_state_dict(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
        }

    @staticmethod
    def _valid(t: Tensor, valid: int) -> Tensor:
        return t if t.dim() == 0 else t[:valid]

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The full (unsharded) optimizer state, gathered on every rank: loadable at any world size."""
        sd = self.shard_state_dict()
        full: dict[str, dict[str, Tensor]] = {}
        for s in self.layout.slots:
            full[s.name] = {k: self._gather_full(v[s.index], s) for k, v in self.shard_state.items()}
        sd["state"] = full
        sd["offsets"] = {s.name: 0 for s in self.layout.slots}
        if self.rule.replicated_pieces and self.comm.world > 1:
            # rule state is owned per rank (e.g. Shampoo blocks): merge every rank's entries
            parts: list[Any] = [None] * self.comm.world
            dist.all_gather_object(parts, sd["rule_state"], group=self.comm.group)
            merged: dict[str, Any] = {}
            for part in parts:
                merged.update(part or {})
            sd["rule_state"] = merged
        return sd

    def _gather_full(self, piece: Tensor, s: Slot) -> Tensor:
        if piece.dim() == 0 or self.layout.world == 1:
            return piece.clone()
        out = torch.empty(s.chunk * self.layout.world, dtype=piece.dtype, device=piece.device)
        self.comm.all_gather(out, piece.contiguous())
        return out[:s.numel].clone()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a full state (from ``state_dict()``) or this rank's shard (``shard_state_dict()``)."""
        st, offsets = state_dict["state"], state_dict.get("offsets", {})
        missing = [s.name for s in self.layout.slots if s.name not in st]
        if missing:
            raise KeyError(f"optimizer state has no entry for parameters: {', '.join(missing[:5])}")
        for s in self.layout.slots:
            entry = st[s.name]
            for k, bufs in self.shard_state.items():
                if k not in entry:
                    raise KeyError(f"optimizer state of {s.name} lacks {k!r}")
                src = entry[k]
                dst = bufs[s.index]
                if dst.dim() == 0:
                    dst.copy_(src)
                    continue
                valid = s.valid(self.shard_rank) if self.layout.world > 1 else s.numel
                lo = (s.global_offset(self.shard_rank) if self.layout.world > 1 else 0) - offsets.get(s.name, 0)
                if lo < 0 or lo + valid > src.numel():
                    raise ValueError(f"optimizer state {s.name}.{k}: has {src.numel()} elements from offset "
                                     f"{offsets.get(s.name, 0)}, need [{lo}, {lo + valid}) of {s.numel}")
                dst[:valid].copy_(src.reshape(-1)[lo:lo + valid])
                dst[valid:].zero_()
        self.rule.load_rule_state_dict(state_dict.get("rule_state", {}))
        self.applied_steps = int(state_dict.get("applied_steps", 0))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        for g, saved in zip(self.param_groups, state_dict.get("param_groups", []), strict=False):
            for k in ("lr", "initial_lr"):
                if k in saved:
                    g[k] = saved[k]

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank."""
        return sum(t.numel() * t.element_size() for v in self.shard_state.values() for t in v)
