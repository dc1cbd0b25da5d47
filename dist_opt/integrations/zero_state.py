"""dist-opt's state API over DeepSpeed ZeRO-1/2's flat fp32 partitions (dist-opt's DCP checkpoints).

At ZeRO-1/2 DeepSpeed concatenates each param group's parameters into one flat buffer, splits it
into one partition per rank and calls dist-opt's client optimizer
(:class:`~dist_opt.integrations.pieces.LocalRuleOptimizer`) on this rank's fp32 partition, so the
rule's state (``exp_avg``, ``step``, ...) lives in ``client.state[partition]``. DeepSpeed records,
for every parameter, which contiguous range of the *flattened parameter* lies in this rank's
partition and where (``param._hp_mapping``: ``lp_fragment_address`` / ``hp_fragment_address``; the
link its own universal checkpoints use). :class:`ZeroPartitionState` turns that into dist-opt's
:class:`~dist_opt.engine.state_codec.ShardSpec` per parameter (offset = the fragment's start in the
flattened parameter), so the checkpoint writes every rank's fragments under the native keys and
shapes (``optim/<param>/<state>`` of shape ``(numel,)``) and any world size or engine reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dist_opt.engine.state_api import restore_group_hyper
from dist_opt.engine.state_codec import ShardSpec, load_piece
from dist_opt.integrations.pieces import LocalRuleOptimizer


class ZeroPartitionState:
    """``shard_specs`` / ``sharded_state`` / ``load_state_dict`` of a DeepSpeed ZeRO-1/2 engine."""

    def __init__(self, zero: Any, client: LocalRuleOptimizer, module: nn.Module):
        self.zero, self.client = zero, client
        self.named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self._group = {id(p): i for i, g in enumerate(zero.bit16_groups) for p in g}
        world = dist.get_world_size()
        self._specs = []
        for n, p in self.named:
            m = getattr(p, "_hp_mapping", None)
            lo, k = (m.lp_fragment_address.start, m.lp_fragment_address.numel) if m else (p.numel(), 0)
            self._specs.append(ShardSpec(n, tuple(p.shape), p.numel(), lo, k, k, world))

    def _partition(self, p: Tensor) -> Tensor:
        return self.zero.single_partition_of_fp32_groups[self._group[id(p)]]

    def _partition_state(self, p: Tensor) -> dict[str, Any]:
        """The client's state of ``p``'s partition, created (as the first step would) if missing."""
        return self.client.ensure_state(self._partition(p))

    def shard_specs(self) -> list[ShardSpec]:
        """This rank's fragment of every parameter (``valid`` 0 where its partition holds none)."""
        return list(self._specs)

    def sharded_state(self) -> dict[str, dict[str, Tensor]]:
        """``{param: {state_key: this rank's fragment (views), 0-d counters of its partition}}``."""
        out: dict[str, dict[str, Tensor]] = {}
        for s, (_, p) in zip(self._specs, self.named, strict=True):
            flat, st = self._partition(p), self._partition_state(p)
            m = getattr(p, "_hp_mapping", None)
            start = m.hp_fragment_address.start if s.valid and m is not None else 0
            out[s.name] = {
                k: v if v.dim() == 0 else v.narrow(0, start, s.valid)
                for k, v in st.items()
                if torch.is_tensor(v) and (v.dim() == 0 or v.shape == flat.shape)
            }
        return out

    @torch.no_grad()
    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Load ``{"state": pieces by global offset, "offsets", counters}`` (the state API's format)
        after the model's parameters were loaded: DeepSpeed's fp32 partitions are set from them."""
        state, offsets = sd["state"], sd.get("offsets", {})
        missing = [s.name for s in self._specs if s.name not in state]
        if missing:
            raise KeyError(f"optimizer state has no entry for parameters: {', '.join(missing[:5])}")
        mine = self.sharded_state()
        for s, (_, p) in zip(self._specs, self.named, strict=True):
            if s.valid:
                mapping: Any = getattr(p, "_hp_mapping", None)
                mapping.update_hp()  # fp32 partition <- the loaded parameter
            for k, dst in mine[s.name].items():
                if k not in state[s.name]:
                    raise KeyError(f"optimizer state of {s.name} lacks {k!r}")
                src = state[s.name][k]
                load_piece(dst, src, s, int(offsets.get(s.name, 0)), f"optimizer state {s.name}.{k}")
        self.client.rule.load_rule_state_dict(sd.get("rule_state", {}))
        applied = int(sd.get("applied_steps", 0))
        for flat in self.zero.single_partition_of_fp32_groups:
            self.client.ensure_state(flat)["applied_steps"] = applied
        for g, saved in zip(self.client.param_groups, sd.get("param_groups", []), strict=False):
            restore_group_hyper(g, saved)
