"""The parameter all-gather after a sharded update, bucket by bucket, optionally overlapped with
the next forward.

Each rank packs its updated pieces into a persistent send buffer (its shard layout) and launches
one asynchronous all-gather per bucket into that bucket's persistent receive buffer (rank-major,
``[world, bucket shard]``); waiting for a bucket copies its columns into the full parameter
buffer. Buckets are launched last-first: the layout is in reverse registration order, so the
last bucket holds the first layers the next forward needs.

Without overlap every bucket is waited for before the optimizer step returns. With overlap the
step returns at once and a global module forward-pre-hook waits, before a module runs, for the
buckets holding that module's own (direct) parameters; :meth:`ParamGather.wait_all` completes the
rest and is called before anything else reads or writes the parameters or the receive buffers
(the next optimizer step, the first gradient of the next backward, the state API). A module that
reads another module's parameter without calling that module must not run while a gather is
pending; such models keep overlap off.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from dist_opt.dist.collectives import Comm
from dist_opt.engine.partition import Layout


class ParamGather:
    """Persistent-buffer, per-bucket all-gather of one working dtype's pieces (one dtype only)."""

    def __init__(
        self,
        comm: Comm,
        layout: Layout,
        pieces: Sequence[Tensor],
        full: Tensor,
        params: Sequence[nn.Parameter],
        recv: Sequence[Tensor],
        *,
        overlap: bool = False,
    ) -> None:
        self.comm, self.layout, self.overlap = comm, layout, overlap
        self._pieces, self._full, self._recv = list(pieces), full, list(recv)
        w = layout.world
        self._send = torch.zeros(layout.shard_numel, dtype=full.dtype, device=full.device)
        # per slot: its piece's valid elements and the send region they go to; padding stays zero
        self._pack_dst: list[Tensor] = []
        self._pack_src: list[Tensor] = []
        for s, p in zip(layout.slots, self._pieces, strict=True):
            n = s.valid(comm.rank)
            if n:
                self._pack_dst.append(self._send[s.shard_offset : s.shard_offset + n])
                self._pack_src.append(p[:n])
        # per bucket: the full-buffer views and receive-buffer columns of its slots
        self._unpack: list[tuple[list[Tensor], list[Tensor]]] = []
        for b, r in zip(layout.buckets, self._recv, strict=True):
            mat = r.view(w, b.shard_numel)
            dst, src = [], []
            for i in b.slots:
                s = layout.slots[i]
                col = s.shard_offset - b.shard_start
                dst.append(full[s.full_offset : s.full_offset + s.chunk * w].view(w, s.chunk))
                src.append(mat[:, col : col + s.chunk])
            self._unpack.append((dst, src))
        self._bucket_of = {id(params[i]): b_i for b_i, b in enumerate(layout.buckets) for i in b.slots}
        self._pending: dict[int, Any] = {}
        self._hook: RemovableHandle | None = None
        self.exposed_s = 0.0  # time spent waiting for gathers since the last launch

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def launch(self) -> None:
        """Pack this rank's pieces and start every bucket's all-gather (last bucket first)."""
        self.wait_all()
        t0 = time.perf_counter()
        torch._foreach_copy_(self._pack_dst, self._pack_src)
        for b_i in reversed(range(len(self.layout.buckets))):
            b = self.layout.buckets[b_i]
            send = self._send[b.shard_start : b.shard_end]
            self._pending[b_i] = self.comm.all_gather(self._recv[b_i], send, async_op=True)
        self.exposed_s = time.perf_counter() - t0
        if not self.overlap:
            self.wait_all()
        elif self._hook is None:
            self._hook = nn.modules.module.register_module_forward_pre_hook(self._before_forward)

    def wait(self, b_i: int) -> None:
        """Complete bucket ``b_i``'s gather (if pending) into the full parameter buffer."""
        if b_i not in self._pending:
            return
        work = self._pending.pop(b_i)
        t0 = time.perf_counter()
        if work is not None:
            work.wait()
        dst, src = self._unpack[b_i]
        torch._foreach_copy_(dst, src)
        self.exposed_s += time.perf_counter() - t0
        if not self._pending and self._hook is not None:
            self._hook.remove()
            self._hook = None

    def wait_all(self) -> None:
        """Complete every pending gather (in launch order)."""
        for b_i in list(self._pending):
            self.wait(b_i)

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        for p in module._parameters.values():
            if p is not None:
                b_i = self._bucket_of.get(id(p))
                if b_i is not None and b_i in self._pending:
                    self.wait(b_i)
