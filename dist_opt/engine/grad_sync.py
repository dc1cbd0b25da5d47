"""Gradient synchronisation overlapped with backward: bucketed all-reduce or reduce-scatter.

Per-parameter post-accumulate-grad hooks count what is ready; buckets are launched strictly in
layout order (a bucket only after all earlier ones), so every rank issues the same collectives
in the same order even when backward visits parameters in a different order. Averaging is
sum-then-divide, once, by (world x micro-steps) (never gloo's AVG; see docs/algorithms.md).

stage 0/1: ``p.grad`` are views into one flat, padded, param-major buffer; autograd accumulates
           in place across micro-steps; on the sync micro-step each full bucket is all-reduced.
stage 2:   on every micro-step each param's fresh gradient is packed rank-major into its bucket's
           staging buffer and released (``p.grad = None``); a full bucket is reduce-scattered
           straight into the rank's grad shard on the first micro-step after a reset, and into a
           persistent per-bucket buffer that is then added to it on later ones. No full gradient is
           kept. The staging buffers are persistent too (allocated once; the engine may lend the
           parameter all-gather's receive buffers, which are idle during backward), so a step
           allocates no bucket-sized tensor.

The gradient buffers have one dtype (the reduction dtype). A parameter of another dtype (bf16
parameters with fp32 reduction) cannot have a view of them as ``.grad``: its hook adds the fresh
gradient into the buffer (upcasting it) and releases ``p.grad``, at every stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dist_opt.dist.collectives import Comm
from dist_opt.engine.partition import Layout, Slot


def pack_rank_major(dst: Tensor, world: int, lo: int, slot: Slot, flat: Tensor) -> None:
    """Write a parameter's flat values into columns [lo, lo+chunk) of a [world, S] matrix view."""
    c, n = slot.chunk, slot.numel
    full_rows, rem = divmod(n, c)
    if full_rows:
        dst[:full_rows, lo : lo + c].copy_(flat[: full_rows * c].view(full_rows, c))
    if rem:
        dst[full_rows, lo : lo + rem].copy_(flat[full_rows * c :])


def zero_padding(dst: Tensor, lo: int, slot: Slot) -> None:
    """Zero the padding of a parameter's columns [lo, lo+chunk) in a [world, S] matrix view (the
    elements past its numel; the buffer may hold other data from an earlier use)."""
    c, n, world = slot.chunk, slot.numel, dst.shape[0]
    if n == c * world:
        return
    full_rows, rem = divmod(n, c)
    if rem:
        dst[full_rows, lo + rem : lo + c].zero_()
        full_rows += 1
    if full_rows < world:
        dst[full_rows:, lo : lo + c].zero_()


class GradSync:
    def __init__(
        self,
        params: Sequence[nn.Parameter],
        layout: Layout,
        comm: Comm,
        stage: int,
        full_grad: Tensor | None,
        shard_grad: Tensor | None,
        track_local_norm: bool = False,
        staging: Sequence[Tensor] | None = None,
        before_backward: Callable[[], None] | None = None,
    ):
        self.params, self.layout, self.comm, self.stage = list(params), layout, comm, stage
        self.full_grad, self.shard_grad = full_grad, shard_grad
        self.world = comm.world if stage > 0 else 1
        self.sync_enabled = True
        self.track_local_norm = track_local_norm
        self.local_sumsq = torch.zeros((), dtype=torch.float64)
        self.micro_steps = 0
        self._bucket_of: dict[int, int] = {}
        for b_i, b in enumerate(layout.buckets):
            for s in b.slots:
                self._bucket_of[s] = b_i
        self._pending_count = [0] * len(layout.buckets)
        self._ready = [False] * len(layout.buckets)
        self._next = 0
        self._before_backward = before_backward
        self._staging: list[Tensor] = []
        self._packed: list[set[int]] = [set() for _ in layout.buckets]
        self._acc: dict[int, Tensor] = {}  # reduce-scatter outputs of accumulating micro-steps
        if stage == 2:
            dt, dev = self._shard.dtype, self._shard.device
            for b_i, b in enumerate(layout.buckets):
                buf = (
                    staging[b_i]
                    if staging is not None
                    else torch.zeros(self.world * b.shard_numel, dtype=dt, device=dev)
                )
                assert buf.numel() == self.world * b.shard_numel and buf.dtype == dt
                self._staging.append(buf.view(self.world, b.shard_numel))
        self._works: list[tuple[dist.Work | None, int, Tensor | None]] = []
        self._seen_backward = False
        self._handles = [
            # torch defines this method without annotations
            p.register_post_accumulate_grad_hook(self._make_hook(i))  # type: ignore[no-untyped-call]
            for i, p in enumerate(self.params)
        ]

    @property
    def _full(self) -> Tensor:
        """The flat full gradient (stage 0/1)."""
        assert self.full_grad is not None, "stage 0/1 gradient sync needs the full gradient buffer"
        return self.full_grad

    @property
    def _shard(self) -> Tensor:
        """This rank's gradient shard (stage 2)."""
        assert self.shard_grad is not None, "stage 2 gradient sync needs the gradient shard"
        return self.shard_grad

    # -- hooks ---------------------------------------------------------------------------------
    def _make_hook(self, slot_index: int) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            self._on_grad(slot_index, p)

        return hook

    def _on_grad(self, i: int, p: Tensor) -> None:
        if not self._seen_backward:
            # first gradient of a new backward pass: count it, and have autograd call us when
            # the pass ends so buckets of unused parameters are launched too (as DDP/FSDP do)
            self._seen_backward = True
            self.micro_steps += 1
            if self._before_backward is not None:
                self._before_backward()  # e.g. finish a parameter all-gather that lent its buffers
            if self._works:  # the previous micro-step's reduce-scatters: their buffers are reused
                self._drain()
            torch.autograd.Variable._execution_engine.queue_callback(self.flush)
        slot = self.layout.slots[i]
        b_i = self._bucket_of[i]
        grad = p.grad
        assert grad is not None  # autograd runs this hook right after accumulating into .grad
        if self.stage == 2:
            self._pack(b_i, slot, grad.detach().reshape(-1))
            p.grad = None
        else:
            view = self._full[slot.full_offset : slot.full_offset + slot.numel].view(slot.shape)
            if grad.data_ptr() != view.data_ptr():
                # the user replaced .grad (e.g. zero_grad(set_to_none=True)), or the parameter's dtype
                # is not the buffer's: fold it in (upcasting), and keep .grad a view when it can be
                view.add_(grad) if self.micro_steps > 1 else view.copy_(grad)
                p.grad = view if grad.dtype == view.dtype else None
            if not self.sync_enabled:
                return
        self._pending_count[b_i] += 1
        if self._pending_count[b_i] == len(self.layout.buckets[b_i].slots):
            self._ready[b_i] = True
            self._launch_ready()

    def _pack(self, b_i: int, slot: Slot, flat: Tensor) -> None:
        b = self.layout.buckets[b_i]
        lo = slot.shard_offset - b.shard_start
        pack_rank_major(self._staging[b_i], self.world, lo, slot, flat)
        zero_padding(self._staging[b_i], lo, slot)
        self._packed[b_i].add(slot.index)

    def _launch_ready(self) -> None:
        while self._next < len(self._ready) and self._ready[self._next]:
            self._launch(self._next)
            self._next += 1
        if self._next == len(self._ready):
            self._end_of_backward()

    def _launch(self, b_i: int) -> None:
        b = self.layout.buckets[b_i]
        if self.stage == 2:
            st = self._staging[b_i]
            for i in b.slots:  # parameters without a gradient in this pass contribute zeros
                if i not in self._packed[b_i]:
                    lo = self.layout.slots[i].shard_offset - b.shard_start
                    st[:, lo : lo + self.layout.slots[i].chunk].zero_()
            self._packed[b_i].clear()
            if self.track_local_norm:
                self.local_sumsq += st.double().square().sum()
            acc: Tensor | None = None
            if self.micro_steps == 1:  # the shard is zero: reduce-scatter straight into it
                out = self._shard[b.shard_start : b.shard_end]
            else:
                if b_i not in self._acc:
                    self._acc[b_i] = torch.empty(b.shard_numel, dtype=st.dtype, device=st.device)
                out = acc = self._acc[b_i]
            work = self.comm.reduce_scatter(out, st.view(-1), async_op=True)
            self._works.append((work, b_i, acc))
        else:
            buf = self._full[b.full_start : b.full_end]
            if self.track_local_norm:
                self.local_sumsq += buf.double().square().sum()
            work = self.comm.all_reduce(buf, async_op=True)
            self._works.append((work, b_i, None))

    def _end_of_backward(self) -> None:
        self._pending_count = [0] * len(self._ready)
        self._ready = [False] * len(self._ready)
        self._next = 0
        self._seen_backward = False

    # -- called by the engine ----------------------------------------------------------------
    def flush(self) -> None:
        """End a backward whose hooks did not all fire (unused parameters): launch the rest."""
        if not self._seen_backward:
            return
        if self.stage < 2 and not self.sync_enabled:
            self._end_of_backward()
            return
        for b_i in range(len(self._ready)):
            if not self._ready[b_i]:
                self._ready[b_i] = True
        self._launch_ready()

    def _drain(self) -> None:
        """Wait for the launched collectives; add accumulating micro-steps' shards."""
        for work, b_i, out in self._works:
            if work is not None:
                work.wait()
            if out is not None:
                b = self.layout.buckets[b_i]
                self._shard[b.shard_start : b.shard_end].add_(out)
        self._works.clear()

    def finish(self, loss_scale: float = 1.0) -> int:
        """Wait for all communication; leave the averaged gradient (divided by ``loss_scale`` too) in
        place. Returns micro-steps."""
        self._drain()
        steps = max(self.micro_steps, 1)
        divisor = float(self.comm.world * steps) * loss_scale
        if self.stage == 2:
            self._shard.div_(divisor)
        else:
            self._full.div_(divisor)
        return steps

    def reset(self) -> None:
        """After the optimizer step: zero gradients and counters."""
        self.micro_steps = 0
        self.local_sumsq = torch.zeros((), dtype=torch.float64)
        if self.stage == 2:
            self._shard.zero_()
        else:
            self._full.zero_()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
