"""The public state API of the engine optimizers: what checkpoints and SWA use.

Checkpoints, SWA and tests talk to an engine optimizer only through these methods, never through
its buffers or layout:

* :meth:`~ShardStateAPI.shard_specs` -- where this rank's piece of every parameter's state lies
  (:class:`~dist_opt.engine.state_codec.ShardSpec`: name, shape, numel, global offset, valid count,
  chunk, shards);
* :meth:`~ShardStateAPI.sharded_state` / :meth:`~ShardStateAPI.load_sharded_state` -- the state as
  ``{param_name: {state_key: this rank's valid piece}}`` (a DTensor ``Shard(0)`` local tensor of the
  flattened state when ``shards > 1``), and loading it from pieces of any world size;
* :meth:`~ShardStateAPI.shard_state_dict`, :meth:`~ShardStateAPI.state_dict` (full, gathered: loadable
  at any world size), :meth:`~ShardStateAPI.load_state_dict` (either), :meth:`~ShardStateAPI.state_bytes`;
* parameters split over all ranks (what SWA averages): :meth:`~ShardStateAPI.owned_specs`,
  :meth:`~ShardStateAPI.owned_params` (views) and :meth:`~ShardStateAPI.gather_params`.

A state dict is ``{"state": {name: {key: tensor}}, "offsets": {name: global offset of the tensors},
"numel": {name: numel}, "applied_steps", "skipped_steps", "rule_state", "param_groups"}`` (plus
``"loss_scale"`` with fp16 loss scaling); with low-precision parameters, ``state`` also holds each
such parameter's fp32 ``master`` copy, split and resharded like the rest of the state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from dist_opt.engine.partition import make_layout
from dist_opt.engine.state_codec import (
    ShardSpec,
    all_gather_pieces,
    gather_full,
    layout_specs,
    load_piece,
    valid_piece,
)

if TYPE_CHECKING:
    from dist_opt.dist.collectives import Comm
    from dist_opt.engine.loss_scale import LossScaler
    from dist_opt.optim.base import Rule


def restore_group_hyper(group: dict[str, Any], saved: Mapping[str, Any]) -> None:
    """Copy the entries a scheduler may have changed from a saved param group into ``group``:
    ``lr`` and ``initial_lr``, and the rule's ``momentum`` / ``betas`` where ``group`` has them (a
    checkpoint written without them keeps the built values; ``betas`` becomes a tuple again)."""
    for k in ("lr", "initial_lr"):
        if k in saved:
            group[k] = saved[k]
    if "momentum" in saved and "momentum" in group:
        group["momentum"] = saved["momentum"]
    if "betas" in saved and "betas" in group:
        group["betas"] = tuple(saved["betas"])


class ShardStateAPI:
    """Mixin of :class:`~dist_opt.engine.core.PieceOptimizer`: state codec over ``shard_state``.

    Expects ``shard_state`` (per state key, one tensor per layer: this rank's piece, possibly padded
    to ``chunk``), ``rule``, ``comm``, ``layer_names``, ``layer_shapes``, ``layer_params``,
    ``param_groups``, ``applied_steps``, ``skipped_steps`` and :meth:`shard_specs`."""

    shard_state: dict[str, list[Tensor]]
    rule: Rule
    layer_names: list[str]
    layer_shapes: list[tuple[int, ...]]
    layer_params: list[Tensor]
    param_groups: list[dict[str, Any]]
    applied_steps: int
    skipped_steps: int
    _owned: list[ShardSpec] | None = None
    loss_scaler: LossScaler | None = None  # fp16 loss scale (its state goes with the counters)

    @property
    def comm(self) -> Comm:
        """The collectives of the ranks the state is split over."""
        raise NotImplementedError

    def shard_specs(self) -> list[ShardSpec]:
        """This rank's piece of every parameter's optimizer state, in layer order."""
        raise NotImplementedError

    # -- optimizer state ---------------------------------------------------------------------
    def _state_lists(self) -> dict[str, list[Tensor | None]]:
        """Per state key, one tensor per layer, or None where that layer does not keep the key: the
        rule's ``shard_state`` plus what an engine keeps besides (fp32 ``master`` copies)."""
        return {k: list(v) for k, v in self.shard_state.items()}

    def sharded_state(self) -> dict[str, dict[str, Tensor]]:
        """``{param_name: {state_key: this rank's valid piece}}`` (views; 0-d counters as they are)."""
        specs = self.shard_specs()
        lists = self._state_lists()
        out: dict[str, dict[str, Tensor]] = {}
        for i, s in enumerate(specs):
            out[s.name] = {}
            for k, v in lists.items():
                t = v[i]
                if t is not None:
                    out[s.name][k] = valid_piece(t, s)
        return out

    @torch.no_grad()
    def load_sharded_state(
        self, state: Mapping[str, Mapping[str, Tensor]], offsets: Mapping[str, int] | None = None
    ) -> None:
        """Load ``{param_name: {state_key: tensor}}`` where each tensor holds the flattened state's
        elements from ``offsets[name]`` on: this rank's pieces (``offsets`` None: as
        :meth:`sharded_state` returns them), full tensors (offset 0) or any piece covering this
        rank's range (another world size's). Raises KeyError / ValueError when it does not fit."""
        specs = self.shard_specs()
        missing = [s.name for s in specs if s.name not in state]
        if missing:
            raise KeyError(f"optimizer state has no entry for parameters: {', '.join(missing[:5])}")
        for i, s in enumerate(specs):
            entry = state[s.name]
            src_offset = s.offset if offsets is None else int(offsets.get(s.name, 0))
            for k, bufs in self._state_lists().items():
                buf = bufs[i]
                if buf is None:
                    continue
                if k not in entry:
                    raise KeyError(f"optimizer state of {s.name} lacks {k!r}")
                load_piece(buf, entry[k], s, src_offset, f"optimizer state {s.name}.{k}")

    def shard_state_dict(self) -> dict[str, Any]:
        """This rank's state: :meth:`sharded_state`, its ``offsets`` and ``numel`` per name, counters."""
        specs = self.shard_specs()
        return {
            "state": self.sharded_state(),
            "offsets": {s.name: s.offset for s in specs},
            "numel": {s.name: s.numel for s in specs},
            **self._counters(),
        }

    def state_dict(self) -> dict[str, Any]:
        """The full (unsharded) state, gathered on every rank (a collective): loads at any world size."""
        sd = self.shard_state_dict()
        specs = self.shard_specs()
        full: dict[str, dict[str, Tensor]] = {s.name: {} for s in specs}
        for k, bufs in self._state_lists().items():
            flat = [i for i, b in enumerate(bufs) if b is not None and b.dim() > 0]
            pieces = [bufs[i] for i in flat]
            gathered = dict(
                zip(
                    flat,
                    gather_full(self.comm, [specs[i] for i in flat], [b for b in pieces if b is not None]),
                    strict=True,
                )
            )
            for i, s in enumerate(specs):
                b = bufs[i]
                if i in gathered:
                    full[s.name][k] = gathered[i]
                elif b is not None:
                    full[s.name][k] = b.clone()
        sd["state"] = full
        sd["offsets"] = {s.name: 0 for s in specs}
        if self.rule.replicated_pieces and self.comm.world > 1:
            # rule state is owned per rank (e.g. Shampoo blocks): merge every rank's entries
            parts: list[Any] = [None] * self.comm.world
            dist.all_gather_object(parts, sd["rule_state"], group=self.comm.group)
            merged: dict[str, Any] = {}
            for part in parts:
                merged.update(part or {})
            sd["rule_state"] = merged
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict` (any world size) or a :meth:`shard_state_dict` (same pieces)."""
        self.load_sharded_state(state_dict["state"], state_dict.get("offsets", {}))
        self._load_counters(state_dict)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (with state a rule keeps itself, e.g. Shampoo's blocks)."""
        own = getattr(self.rule, "state_bytes", None)  # rules that keep state outside shard_state
        rule_bytes = int(own()) if callable(own) else 0
        return rule_bytes + sum(t.numel() * t.element_size() for v in self.shard_state.values() for t in v)

    def _counters(self) -> dict[str, Any]:
        return {
            "applied_steps": self.applied_steps,
            "skipped_steps": self.skipped_steps,
            "rule_state": self.rule.rule_state_dict(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            **({"loss_scale": self.loss_scaler.state_dict()} if self.loss_scaler is not None else {}),
        }

    def _load_counters(self, sd: Mapping[str, Any]) -> None:
        self.rule.load_rule_state_dict(sd.get("rule_state", {}))
        self.applied_steps = int(sd.get("applied_steps", 0))
        self.skipped_steps = int(sd.get("skipped_steps", 0))
        if self.loss_scaler is not None and sd.get("loss_scale") is not None:
            self.loss_scaler.load_state_dict(sd["loss_scale"])
        for g, saved in zip(self.param_groups, sd.get("param_groups", []), strict=False):
            restore_group_hyper(g, saved)

    # -- parameters split over all ranks -----------------------------------------------------
    def owned_specs(self) -> list[ShardSpec]:
        """This rank's piece of every parameter when the parameters are split over all ``comm.world``
        ranks (the ``torch.chunk`` split of each flattened parameter): the optimizer's own shard
        when its state is sharded over all ranks, the same split of the replicated parameters when
        it is not. Per-rank work on parameters (SWA averages) uses this split."""
        if self._owned is None:
            specs = self.shard_specs()
            if specs and specs[0].shards == self.comm.world:
                self._owned = specs
            else:
                registration = list(zip(reversed(self.layer_names), reversed(self.layer_shapes), strict=True))
                self._owned = layout_specs(make_layout(registration, self.comm.world, 2**62), self.comm.rank)
        return list(self._owned)

    def owned_params(self) -> list[Tensor]:
        """Views of the live parameters' elements in :meth:`owned_specs` (``valid`` elements each)."""
        return [
            p.detach().view(-1)[s.offset : s.end]
            for s, p in zip(self.owned_specs(), self.layer_params, strict=True)
        ]

    @torch.no_grad()
    def gather_params(self, pieces: Sequence[Tensor]) -> None:
        """Set the full parameters on every rank from every rank's ``pieces`` (as :meth:`owned_params`:
        this rank's ``valid`` elements of each parameter). A collective: call on every rank."""
        dsts = [p.detach().view(-1) for p in self.layer_params]
        all_gather_pieces(self.comm, self.owned_specs(), pieces, dsts)
