"""The contract between the sharded engine and an update rule.

A rule sees, per parameter group, lists of this rank's 1-D shard pieces (params, reduced and
averaged grads, state) and never calls a collective itself: per-layer norms come from
``StepContext.layer_sumsq``, which the engine implements as one all-reduce of a small
[k, n_layers] matrix of partial sums of squares (a no-op when state is not sharded). With a
local context the same rule runs on whole tensors in one process, which is how it is tested.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class GroupShard:
    """This rank's pieces of one parameter group."""

    hp: dict[str, Any]  # the live param_group dict: lr, weight_decay, trust, momentum / betas, ...
    layers: list[int]  # layer (slot) index of each piece
    params: list[Tensor]
    grads: list[Tensor]
    state: dict[str, list[Tensor]] = field(default_factory=dict)
    shapes: list[tuple[int, ...]] = field(default_factory=list)  # full shape of each piece's layer


@dataclass
class StepContext:
    step: int  # 1-based index of the optimizer step being taken
    n_layers: int
    layer_sumsq: Callable[[Tensor], Tensor]  # [k, n_layers] partial sums -> full sums (one collective)
    layer_names: Sequence[str] = ()
    stats: dict[str, Any] = field(default_factory=dict)  # rules may leave health metrics here
    comm: Any = None  # dist_opt.dist.collectives.Comm, only for rules with ``replicated_pieces``


def local_context(step: int, n_layers: int, names: Sequence[str] = ()) -> StepContext:
    return StepContext(step=step, n_layers=n_layers, layer_sumsq=lambda t: t, layer_names=names)


class Rule(ABC):
    """An optimizer update rule over shard pieces."""

    #: state tensors per piece, created zero-filled with the piece's shape
    state_names: tuple[str, ...] = ()
    #: excluded layers (biases, norms) get trust ratio 1 and no weight decay by default
    uses_trust_ratio: bool = False
    #: weight decay is decoupled (AdamW-style) rather than L2 added to the gradient
    decoupled_weight_decay: bool = False
    #: the rule distributes its own work (e.g. Shampoo blocks owned by ranks): the engine hands it
    #: whole tensors (all-reduced gradients, replicated parameters, any zero_stage) and ``ctx.comm``,
    #: and the rule must leave every rank with identical parameters
    replicated_pieces: bool = False

    def init_state(self, pieces: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        return {n: [torch.zeros_like(p) for p in pieces] for n in self.state_names}

    #: attributes published in every param group (see :meth:`group_hyper`)
    group_hyper_keys: tuple[str, ...] = ()

    def group_hyper(self) -> dict[str, Any]:
        """Hyper-parameters the rule reads from its param group at every step, with the values it was
        built with, under torch.optim's names (``momentum``; ``betas`` as a tuple). The engines put
        them into every param group (and the optimizer's ``defaults``), so torch schedulers that
        cycle momentum (``OneCycleLR``, ``CyclicLR``) drive them; a group without the key (a
        hand-built ``GroupShard``) falls back to the built value. By default the attributes named in
        ``group_hyper_keys``."""
        return {k: getattr(self, k) for k in self.group_hyper_keys}

    @abstractmethod
    def step(self, groups: Sequence[GroupShard], ctx: StepContext) -> None:
        """Update ``params`` of every group in place."""

    def rule_state_dict(self) -> dict[str, Any]:
        """State the rule keeps outside the per-piece buffers (e.g. Shampoo blocks this rank owns),
        keyed by world-size-independent names so a checkpoint can be resharded."""
        return {}

    def load_rule_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``rule_state_dict`` (entries for blocks this rank does not own are ignored)."""
        return None


def sumsq_into(out: Tensor, row: int, layers: Sequence[int], tensors: Sequence[Tensor]) -> None:
    """out[row, layer] += ||t||² for each piece (norms via one foreach kernel)."""
    if not tensors:
        return
    norms = torch._foreach_norm(list(tensors))
    sq = torch.stack(norms).to(out.dtype).square()
    out[row].index_add_(0, torch.as_tensor(list(layers), dtype=torch.long), sq)


def group_momentum(g: GroupShard, built: float) -> float:
    """The group's ``momentum`` (``built`` when the group has none). A rule built with momentum 0
    keeps no momentum buffer, so a non-zero value set later (by a scheduler) is refused, not ignored."""
    mu = float(g.hp.get("momentum", built))
    _need_buffer(mu, built, "momentum")
    return mu


def group_betas(
    g: GroupShard, built: tuple[float, float], *, beta1_buffer: bool = False
) -> tuple[float, float]:
    """The group's ``betas`` (``built`` when the group has none). ``beta1_buffer``: the rule keeps its
    first moment only when built with beta1 > 0 (Shampoo), so a later non-zero beta1 is refused."""
    b1, b2 = g.hp.get("betas", built)
    if beta1_buffer:
        _need_buffer(b1, built[0], "betas[0]")
    return b1, b2


def _need_buffer(value: float, built: float, key: str) -> None:
    if value and not built:
        raise ValueError(
            f"param group {key} = {value}, but the optimizer was built with {key} = 0 and keeps no "
            f"buffer for it; build it with a non-zero optimizer.{key.split('[')[0]} to schedule it"
        )


_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def fusable(*lists: Sequence[Tensor]) -> bool:
    """Whether torch's fused optimizer kernels take these tensors: one dtype they support, one
    device, and every tensor contiguous (shard pieces always are)."""
    first = next((t for ts in lists for t in ts), None)
    if first is None or first.dtype not in _FUSED_DTYPES:
        return False
    return all(t.dtype == first.dtype and t.device == first.device for ts in lists for t in ts)


class Scratch:
    """Persistent work buffers of a rule, reused at every step (never part of its state).

    ``like(key, pieces)`` returns views of one flat buffer shaped like ``pieces``; the buffer is
    kept per ``key`` (e.g. a param group's index) and rebuilt only when the pieces' sizes change."""

    def __init__(self) -> None:
        self._bufs: dict[Any, tuple[tuple[Any, ...], list[Tensor]]] = {}
        self._step: Tensor | None = None

    def like(self, key: Any, pieces: Sequence[Tensor]) -> list[Tensor]:
        sig = tuple((p.numel(), p.dtype, p.device) for p in pieces)
        held = self._bufs.get(key)
        if held is None or held[0] != sig:
            n = sum(p.numel() for p in pieces)
            flat = (
                torch.empty(n, dtype=pieces[0].dtype, device=pieces[0].device) if pieces else torch.empty(0)
            )
            views, at = [], 0
            for p in pieces:
                views.append(flat[at : at + p.numel()].view(p.shape))
                at += p.numel()
            held = self._bufs[key] = (sig, views)
        return held[1]

    def step_tensor(self, t: int) -> Tensor:
        """A float32 scalar tensor holding ``t`` (fused kernels read the step count from tensors)."""
        if self._step is None:
            self._step = torch.zeros((), dtype=torch.float32)
        self._step.fill_(float(t))
        return self._step
