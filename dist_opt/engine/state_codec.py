"""Where this rank's piece of every parameter lies, and full <-> piece conversion of per-parameter tensors.

Every engine optimizer keeps, per parameter, a *piece* of the flattened parameter on each rank: the
elements ``[offset, offset + valid)``. Under the native layout (``partition``) that is the
``torch.chunk`` split of the flattened parameter over ``shards`` ranks, i.e. the local tensor of a
DTensor ``Shard(0)`` of shape ``(numel,)``; with one shard it is the whole parameter. A
:class:`ShardSpec` describes one parameter's piece; the functions here turn pieces into full
tensors (one all-gather) and load a piece out of a full tensor or out of another world size's piece
(by global element offset), which is what makes saved state reshardable. Nothing here knows about
optimizer rules; optimizer state, SWA averages and checkpoints all use the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dist_opt.dist.collectives import Comm
from dist_opt.engine.partition import Layout


@dataclass(frozen=True)
class ShardSpec:
    """This rank's piece of one parameter (elements of the *flattened* parameter)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    offset: int  # global element offset of this rank's valid piece
    valid: int  # elements in this rank's piece (0 for a rank past the end of a small parameter)
    chunk: int  # padded size of every rank's piece (ceil(numel / shards) under the native layout)
    shards: int  # ranks the parameter is split over (1: every rank holds all of it)

    @property
    def end(self) -> int:
        """One past the last element of this rank's piece."""
        return self.offset + self.valid


def layout_specs(layout: Layout, rank: int) -> list[ShardSpec]:
    """Rank ``rank``'s piece of every parameter of ``layout``, in layout order."""
    return [
        ShardSpec(
            s.name, tuple(s.shape), s.numel, s.global_offset(rank), s.valid(rank), s.chunk, layout.world
        )
        for s in layout.slots
    ]


def valid_piece(t: Tensor, spec: ShardSpec) -> Tensor:
    """The valid elements of a (possibly padded) piece, as a view; 0-d tensors as they are."""
    return t if t.dim() == 0 else t[: spec.valid]


def piece_of(src: Tensor, spec: ShardSpec, src_offset: int, what: str) -> Tensor:
    """This rank's piece out of ``src``, which holds the flattened tensor's elements from global
    offset ``src_offset`` on (0 for a full tensor). ``what`` names the tensor in the error."""
    flat = src.reshape(-1)
    lo = spec.offset - src_offset
    if lo < 0 or lo + spec.valid > flat.numel():
        raise ValueError(
            f"{what} holds {flat.numel()} elements from offset {src_offset}; this rank needs "
            f"[{spec.offset}, {spec.end}) of {spec.numel}"
        )
    return flat[lo : lo + spec.valid]


@torch.no_grad()
def load_piece(dst: Tensor, src: Tensor, spec: ShardSpec, src_offset: int, what: str) -> None:
    """Copy this rank's piece of ``src`` (see :func:`piece_of`) into ``dst``; padding is zeroed."""
    if dst.dim() == 0:
        dst.copy_(src)
        return
    dst[: spec.valid].copy_(piece_of(src, spec, src_offset, what))
    dst[spec.valid :].zero_()


def all_gather_pieces(
    comm: Comm,
    specs: Sequence[ShardSpec],
    pieces: Sequence[Tensor],
    dsts: Sequence[Tensor],
    *,
    spans: Sequence[tuple[int, int]] | None = None,
    send: Tensor | None = None,
) -> None:
    """Every rank's ``pieces`` -> the full flattened tensors, written into ``dsts`` (a collective).

    ``pieces[i]`` is this rank's piece of parameter ``i`` (``valid`` or ``chunk`` elements); ``dsts[i]``
    receives the ``numel`` elements, or all ``chunk * shards`` when it is that large (padded buffers).
    One all-gather per span ``[first, last)`` of parameters (default: one for all), all launched
    before the first wait; ``send`` is an optional reusable buffer of ``sum(chunk)`` elements.
    """
    if not specs:
        return
    w = specs[0].shards
    if w != comm.world:
        raise ValueError(f"pieces split over {w} ranks cannot be gathered over {comm.world}")
    starts = [0]
    for s in specs:
        starts.append(starts[-1] + s.chunk)
    if send is None:
        send = torch.empty(starts[-1], dtype=pieces[0].dtype, device=pieces[0].device)
    packed, src, tails = [], [], []
    for i, (s, p) in enumerate(zip(specs, pieces, strict=True)):
        n = min(p.numel(), s.chunk)
        packed.append(send[starts[i] : starts[i] + n])
        src.append(p[:n])
        if n < s.chunk:
            tails.append(send[starts[i] + n : starts[i + 1]])
    torch._foreach_copy_(packed, src)
    if tails:
        torch._foreach_zero_(tails)
    pending = []
    for first, last in spans if spans is not None else [(0, len(specs))]:
        lo, hi = starts[first], starts[last]
        out = torch.empty(w * (hi - lo), dtype=send.dtype, device=send.device)
        pending.append((comm.all_gather(out, send[lo:hi], async_op=True), first, last, out))
    for work, first, last, out in pending:
        if work is not None:
            work.wait()
        mat = out.view(w, -1)
        d, v = [], []
        for i in range(first, last):
            s, col = specs[i], starts[i] - starts[first]
            if dsts[i].numel() == s.chunk * w:
                d.append(dsts[i].view(w, s.chunk))
                v.append(mat[:, col : col + s.chunk])
            else:
                d.append(dsts[i].view(-1))
                v.append(mat[:, col : col + s.chunk].reshape(-1)[: s.numel])
        torch._foreach_copy_(d, v)


def gather_full(comm: Comm, specs: Sequence[ShardSpec], pieces: Sequence[Tensor]) -> list[Tensor]:
    """The full flattened tensor of every parameter (new tensors) from every rank's ``pieces``
    (a collective when the parameters are split: one all-gather; call on every rank)."""
    if not specs:
        return []
    if specs[0].shards == 1:
        return [p.reshape(-1)[: s.numel].clone() for s, p in zip(specs, pieces, strict=True)]
    out = [torch.empty(s.numel, dtype=p.dtype, device=p.device) for s, p in zip(specs, pieces, strict=True)]
    all_gather_pieces(comm, specs, pieces, out)
    return out
