"""The sharded optimizer: gradient sync -> update rule on this rank's shard -> parameter all-gather.

A ``torch.optim.Optimizer`` subclass so that ``param_groups[i]["lr"]`` can be driven by any
``torch.optim.lr_scheduler``; the model's parameters become views into one flat buffer, and
gradients are synchronised by hooks during backward (see ``grad_sync``). The step sequence and the
state API are those of every engine optimizer (:class:`~dist_opt.engine.core.PieceOptimizer`).

    opt = ShardedOptimizer(model.named_parameters(), "lamb", lr=1e-3, weight_decay=0.01, zero_stage=2)
    loss.backward(); opt.step(); opt.zero_grad()

zero_stage 0: all-reduce, every rank holds all state and updates everything (DDP-like).
zero_stage 1: all-reduce, each rank updates and keeps state for its 1/N of every tensor, all-gather.
zero_stage 2: reduce-scatter into grad shards, shard update, all-gather (one all-reduce's volume).

Communication buffers are persistent (a step allocates no bucket-sized tensor): per bucket one
receive buffer for the parameter all-gather, lent to the stage-2 gradient sync as its staging
buffer during backward (see ``param_gather`` and ``grad_sync``). With ``overlap_param_gather`` the
all-gather of the updated parameters runs while the next forward starts: each module waits only
for the bucket holding its own parameters (see ``param_gather`` for the one model shape that rules
out). :meth:`ShardedOptimizer.wait_params` completes the gather; the step, backward and the state
API call it themselves.

Mixed precision: parameters may be bf16/fp16, and of several dtypes. There is ONE layout (slots,
buckets, shard offsets) for all parameters; the parameters live in one flat full buffer *per working
dtype* (each dtype's slots packed in layout order), and gradients in one flat buffer of the
reduction dtype (``reduce_dtype``; hooks upcast/accumulate into it when it differs from a
parameter's dtype). With ``master_dtype`` (fp32 by default) the rule runs on fp32 master copies of
this rank's low-precision pieces (see ``masters``); the all-gather moves each working dtype
separately. ``loss_scale`` (a :class:`~dist_opt.engine.loss_scale.LossScaler`) divides the gradients
by the loss scale inside the averaging and updates the scale from the agreed overflow check.
An all-fp32 model takes exactly the code path it always did.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dist_opt.dist.collectives import Comm
from dist_opt.engine.core import DEFAULT_EXCLUDE, GroupOptions, PieceOptimizer
from dist_opt.engine.grad_sync import GradSync
from dist_opt.engine.loss_scale import LossScaler, refuse_grad_scaler
from dist_opt.engine.masters import Masters, as_dtypes
from dist_opt.engine.param_gather import ParamGather
from dist_opt.engine.partition import Layout, make_layout
from dist_opt.engine.state_codec import ShardSpec, all_gather_pieces, layout_specs
from dist_opt.optim.base import Rule
from dist_opt.optim.registry import build_rule

__all__ = ["DEFAULT_EXCLUDE", "ShardedOptimizer"]


class ShardedOptimizer(PieceOptimizer):
    _step_supports_amp_scaling = True  # so that torch.amp.GradScaler reaches step() and is refused
    gathers_params = True  # time/param_all_gather_ms is reported at every world size
    norm_time_key = None

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
        master_dtype: torch.dtype | None = torch.float32,
        reduce_dtype: torch.dtype | None = None,
        loss_scale: LossScaler | None = None,
        overlap_param_gather: bool = False,
        **hyper: Any,
    ):
        if zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2, got {zero_stage}")
        named = [(n, p) for n, p in named_params if p.requires_grad]
        if not named:
            raise ValueError("ShardedOptimizer got no parameters that require grad")
        rule = name if isinstance(name, Rule) else build_rule(name, **hyper)
        self.name = name if isinstance(name, str) else type(name).__name__.lower()
        if rule.replicated_pieces:
            zero_stage = 0  # the rule shards its own work across ranks
        self.zero_stage = zero_stage
        comm = Comm(process_group)
        shard_world = comm.world if zero_stage > 0 else 1
        self.shard_rank = comm.rank if zero_stage > 0 else 0
        bucket_numel = max(1, int(bucket_mb * 2**20 / 4))
        self.layout: Layout = make_layout([(n, tuple(p.shape)) for n, p in named], shard_world, bucket_numel)
        self.partial = self.layout.world > 1
        by_name = dict(named)
        slot_params = [by_name[s.name] for s in self.layout.slots]
        device = named[0][1].device
        if any(p.device != device for _, p in named):
            raise ValueError("ShardedOptimizer needs all parameters on one device")
        dtypes = list(dict.fromkeys(p.dtype for p in slot_params))  # in layout order
        if reduce_dtype is None:  # the widest working dtype, at least the master dtype
            widest = max(dtypes, key=lambda d: torch.finfo(d).bits)
            low = master_dtype is not None and torch.finfo(widest).bits < torch.finfo(master_dtype).bits
            reduce_dtype = master_dtype if low and master_dtype is not None else widest
        dtype = reduce_dtype

        # flat parameter buffers, one per working dtype (each holds its slots, padded, in layout
        # order; one dtype: offsets are the layout's); parameters become views into them
        self._at: list[int] = []  # each slot's start in its dtype's full buffer
        sizes = dict.fromkeys(dtypes, 0)
        for s, p in zip(self.layout.slots, slot_params, strict=True):
            self._at.append(sizes[p.dtype])
            sizes[p.dtype] += s.chunk * self.layout.world
        self.full_params = {dt: torch.zeros(n, dtype=dt, device=device) for dt, n in sizes.items()}
        self.full_param = self.full_params[dtypes[0]]
        self._slot_buf = [self.full_params[p.dtype] for p in slot_params]
        with torch.no_grad():
            for s, p, at, buf in zip(self.layout.slots, slot_params, self._at, self._slot_buf, strict=True):
                view = buf[at : at + s.numel]
                view.copy_(p.detach().reshape(-1))
                p.data = view.view(s.shape)
        if broadcast_params:
            for buf in self.full_params.values():
                comm.broadcast(buf, src=0)
        # persistent per-bucket communication buffers (one working dtype, which is the reduction
        # dtype): the all-gather receives into them, stage-2 backward stages gradients in them
        self._pgather: ParamGather | None = None
        comm_bufs = None
        if self.layout.world > 1 and len(dtypes) == 1 and dtypes[0] == reduce_dtype:
            w = self.layout.world
            comm_bufs = [
                torch.zeros(w * b.shard_numel, dtype=reduce_dtype, device=device) for b in self.layout.buckets
            ]
        # gradients: the full flat buffer (stage 0/1) or only this rank's shard (stage 2), and this
        # rank's piece of every slot in it (views, padded to the chunk size)
        self.full_grad: Tensor | None = None
        self.shard_grad: Tensor | None = None
        if zero_stage == 2:
            shard_grad = self.shard_grad = torch.zeros(self.layout.shard_numel, dtype=dtype, device=device)
            grad_pieces = [shard_grad[s.shard_offset : s.shard_offset + s.chunk] for s in self.layout.slots]
        else:
            full_grad = self.full_grad = torch.zeros(self.layout.full_numel, dtype=dtype, device=device)
            for s, p in zip(self.layout.slots, slot_params, strict=True):
                if p.dtype == dtype:  # else the hooks accumulate into the buffer (and upcast)
                    p.grad = full_grad[s.full_offset : s.full_offset + s.numel].view(s.shape)
            grad_pieces = [self._piece(full_grad, s.full_offset, s.chunk) for s in self.layout.slots]
        self.sync = GradSync(
            slot_params,
            self.layout,
            comm,
            zero_stage,
            self.full_grad,
            self.shard_grad,
            track_local_norm=track_local_grad_norm,
            staging=comm_bufs if zero_stage == 2 else None,
            before_backward=self.wait_params,
        )

        # this rank's pieces (views, padded to the chunk size) and the rule's state for them
        self._specs = layout_specs(self.layout, self.shard_rank)
        self._param_pieces = [
            self._piece(buf, at, s.chunk)
            for s, at, buf in zip(self.layout.slots, self._at, self._slot_buf, strict=True)
        ]
        self.masters = Masters(self._param_pieces, master_dtype) if master_dtype is not None else None
        self._rule_pieces = self.masters.pieces if self.masters is not None else self._param_pieces
        self._grad_pieces = grad_pieces
        self.loss_scaler = loss_scale
        groups = GroupOptions(
            weight_decay,
            tuple(exclude_from_weight_decay),
            tuple(exclude_from_trust_ratio),
            dict(lr_multipliers or {}),
            exclude_1d_from_weight_decay,
        )
        super().__init__(named, rule, lr=lr, groups=groups, max_grad_norm=max_grad_norm, comm=comm)
        assert self.layer_names == [s.name for s in self.layout.slots]
        # parameter all-gathers: persistent buffers, bucket by bucket (one working dtype), else one
        # set per working dtype
        self._gathers: list[tuple[list[int], list[tuple[int, int]] | None, Tensor | None]] = []
        if comm_bufs is not None:
            self._pgather = ParamGather(
                comm,
                self.layout,
                self._param_pieces,
                self.full_param,
                slot_params,
                comm_bufs,
                overlap=overlap_param_gather,
            )
        for dt in dtypes if self._pgather is None else ():
            idx = [i for i, p in enumerate(slot_params) if p.dtype == dt]
            spans = [(b.slots[0], b.slots[-1] + 1) for b in self.layout.buckets] if len(dtypes) == 1 else None
            n = sum(self.layout.slots[i].chunk for i in idx)
            send = torch.empty(n, dtype=dt, device=device) if shard_world > 1 else None
            self._gathers.append((idx, spans, send))

    def _piece(self, buf: Tensor, full_offset: int, chunk: int) -> Tensor:
        """This rank's chunk of a slot in a full buffer (the whole tensor when not sharded)."""
        start = full_offset + self.shard_rank * chunk
        return buf[start : start + chunk]

    @property
    def world_size(self) -> int:
        return self.comm.world

    def shard_specs(self) -> list[ShardSpec]:
        return list(self._specs)

    def param_pieces(self) -> list[Tensor]:
        """The pieces the rule updates: fp32 masters where kept, else the working pieces."""
        return self._rule_pieces

    def working_pieces(self) -> list[Tensor]:
        """This rank's pieces of the working (possibly low-precision) parameters."""
        return self._param_pieces

    @property
    def loss_scale(self) -> float:
        """The factor the loss must be multiplied by before backward (1.0 without loss scaling)."""
        return self.loss_scaler.scale if self.loss_scaler is not None else 1.0

    def master_bytes(self) -> int:
        """Bytes of the separate master copies this rank holds (0 for an all-fp32 model)."""
        return self.masters.nbytes() if self.masters is not None else 0

    def _state_lists(self) -> dict[str, list[Tensor | None]]:
        self.wait_params()
        lists = super()._state_lists()
        if self.masters is not None and self.masters.active:
            lists["master"] = self.masters.state()
        return lists

    def wait_params(self) -> None:
        """Complete a pending (overlapped) parameter all-gather: every rank's full parameters are
        then the updated ones. Reading parameters other than through a module's forward after a
        step with ``overlap_param_gather`` needs this first."""
        if self._pgather is not None:
            self._pgather.wait_all()

    @property
    def param_gather_exposed_ms(self) -> float:
        """Milliseconds the last parameter all-gather held this rank up: its launch and the waits
        (in the optimizer step or, overlapped, in the next forward) since."""
        return 1e3 * self._pgather.exposed_s if self._pgather is not None else 0.0

    def gather_params(self, pieces: Any) -> None:
        self.wait_params()
        super().gather_params(pieces)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_params()
        super().load_state_dict(state_dict)
        if self.masters is not None and self.masters.active:
            self._publish()  # working parameters := the loaded masters, everywhere
            self.wait_params()

    def _publish(self) -> None:
        if self.masters is not None:
            self.masters.write_back()
        self.after_update_gather()

    def grad_pieces(self) -> list[Tensor]:
        return self._grad_pieces

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
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            refuse_grad_scaler()  # torch.amp.GradScaler.step(opt) sets these attributes
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.wait_params()  # a forward-less step (no backward either) after an overlapped one
        t0 = time.perf_counter()
        scale = self.loss_scale
        micro_steps = self.sync.finish(scale)
        t1 = time.perf_counter()
        stats: dict[str, Any] = {"time/grad_comm_wait_ms": 1e3 * (t1 - t0)}
        if self.loss_scaler is not None:
            stats["loss_scale"] = scale
        track = self.sync.track_local_norm
        grads = as_dtypes(self._grad_pieces, self._rule_pieces)
        grad_sq, local = self._reduce_norms(grads, stats, self.sync.local_sumsq if track else None)
        if local is not None and self.comm.world > 1:
            local = local / scale**2
            mean_local = local / self.comm.world
            if self.zero_stage == 2:  # per micro-step gradients, each of micro_batch samples
                stats["local_grad_sq"] = mean_local / micro_steps
                stats["local_micro_steps"] = 1
            else:  # accumulated sum of micro-step means
                stats["local_grad_sq"] = mean_local / micro_steps**2
                stats["local_micro_steps"] = micro_steps
            stats["global_grad_sq"] = grad_sq
        applied = self._update(self._rule_pieces, grads, grad_sq, stats, t1)
        if self.loss_scaler is not None:
            self.loss_scaler.update(applied)
        if not applied:
            self.sync.reset()
        return applied if loss is None else loss

    def after_update(self) -> None:
        """Round the masters into the working pieces, then all-gather them (see :meth:`after_update_gather`)."""
        self._publish()

    def after_update_gather(self) -> None:
        """All-gather the updated shards into every rank's full parameter buffers (bucketed, async; one
        set of all-gathers per working dtype)."""
        if self._pgather is not None:
            self._pgather.launch()
        elif self.layout.world > 1:
            w = self.layout.world
            for idx, spans, send in self._gathers:
                slots = [self.layout.slots[i] for i in idx]
                dsts = [
                    self._slot_buf[i][self._at[i] : self._at[i] + s.chunk * w]
                    for i, s in zip(idx, slots, strict=True)
                ]
                specs = [self._specs[i] for i in idx]
                pieces = [self._param_pieces[i] for i in idx]
                all_gather_pieces(self.comm, specs, pieces, dsts, spans=spans, send=send)
