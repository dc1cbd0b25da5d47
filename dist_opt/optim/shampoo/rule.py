"""Distributed Shampoo as an engine rule: blocks owned by ranks, grafting, one all-gather per step.

Update of one block with gradient G at step t (Gupta et al. 2018; Anil et al. 2020; β1, β2 = ``betas``):

    M = first moment of G ("filtered gradient", bias-corrected; nesterov: NAdam form)
    H_i = β2·H_i + (1-β2)·G_(i)·G_(i)ᵀ              one statistic per block dim (β2 = 1: H_i += ...)
    D_graft = M / (√A + ε_g)                        graft state A from G² (``grafting``)
    t >= start:  D = ‖D_graft‖/‖D_sh‖ · D_sh,  D_sh = M ×_1 R_1 … ×_k R_k,  R_i = (H_i + εI)^(-1/(2k))
                 (2-D: D_sh = L^{-1/4}·M·R^{-1/4}; grafting "none": D = D_sh)
    t <  start:  D = D_graft
    p = p·(1 - lr·wd) - lr·D                        decoupled weight decay; lr, wd, betas read each step

Every block's roots are recomputed on step ``start`` and then once every f steps
(f = ``precondition_frequency``) at the block's own phase, staggered across blocks so each step
pays about 1/f of the eigendecompositions (see ``schedule``); they are the identity until the
first refresh, and a failed root keeps the previous one (see ``matrix_root``). With
``preconditioner_dtype: bfloat16`` the preconditioning products run in bfloat16 on float32
statistics and roots (see ``block_math``). 1-D parameters are diagonal blocks: graft method only (SGD direction M for
grafting "none"). With the graft step alone (t < start) the rule is exactly the graft optimizer:
Adam/AdamW, NAdam (nesterov), Adagrad, RMSProp or SGD.

Distribution: the engine hands whole tensors with all-reduced gradients (``replicated_pieces``).
Every block (diagonal ones included) is owned by one rank chosen by the cost model in
``assignment``; only the owner holds its statistics, roots, first moment and graft state and
computes its new values, which it packs into a send buffer (padded to the largest rank's size).
One ``all_gather`` per step gives every rank every block's new value, which all ranks copy into
the parameters — so parameters stay bit-identical across ranks. Root refreshes happen on the
owners, so their cost is spread like the rest. On steps where any block refreshes one more small
all-reduce collects the health statistics ``shampoo/root_failures`` (cumulative) and
``shampoo/max_condition`` (largest condition estimate of any preconditioner statistic).

Hyper-parameter defaults are declared once, with the optimizer, in ``dist_opt.optim.catalog``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dist_opt.optim.base import GroupShard, Rule, StepContext, group_betas
from dist_opt.optim.registry import rule_spec
from dist_opt.optim.shampoo import block_math
from dist_opt.optim.shampoo.assignment import assign, block_cost, root_cost
from dist_opt.optim.shampoo.blocking import Block, LayerBlocking, block_layer, block_view
from dist_opt.optim.shampoo.blocks import BlockInfo, BlockState, factor_names, load_block, save_block
from dist_opt.optim.shampoo.grafting import GRAFTS, STATEFUL_GRAFTS, first_moment, graft_direction
from dist_opt.optim.shampoo.schedule import refresh_phases, refreshes_at

__all__ = ["DTYPES", "GRAFTS", "BlockInfo", "BlockState", "Shampoo", "factor_names"]

_D = rule_spec("shampoo").hyper  # the declared defaults
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.float32}  # statistics, roots
MM_DTYPES = {"bfloat16": torch.bfloat16}  # preconditioning products, where not the statistics' dtype


class Shampoo(Rule):
    """Blocked Shampoo with grafting; blocks owned by ranks (see the module docstring)."""

    replicated_pieces = True
    decoupled_weight_decay = True

    def __init__(
        self,
        betas: tuple[float, float] = _D["betas"],
        eps: float = _D["eps"],
        max_preconditioner_dim: int = _D["max_preconditioner_dim"],
        precondition_frequency: int = _D["precondition_frequency"],
        start_preconditioning_step: int = _D["start_preconditioning_step"],
        exponent_override: float | None = _D["exponent_override"],
        grafting: str = _D["grafting"],
        grafting_beta2: float = _D["grafting_beta2"],
        grafting_eps: float = _D["grafting_eps"],
        preconditioner_dtype: str = _D["preconditioner_dtype"],
        nesterov: bool = _D["nesterov"],
        bias_correction: bool = _D["bias_correction"],
    ):
        b1, b2 = (float(b) for b in betas)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 <= 1.0):
            raise ValueError(f"optimizer.betas: need 0 <= beta1 < 1 and 0 <= beta2 <= 1, got {tuple(betas)}")
        if not eps >= 0:
            raise ValueError(f"optimizer.eps: must be >= 0, got {eps}")
        if max_preconditioner_dim < 1:
            raise ValueError(f"optimizer.max_preconditioner_dim: must be >= 1, got {max_preconditioner_dim}")
        if precondition_frequency < 1:
            raise ValueError(f"optimizer.precondition_frequency: must be >= 1, got {precondition_frequency}")
        if start_preconditioning_step < 1:
            raise ValueError(
                f"optimizer.start_preconditioning_step: must be >= 1, got {start_preconditioning_step}"
            )
        if exponent_override is not None and not 0 < exponent_override <= 1:
            raise ValueError(
                f"optimizer.exponent_override: the exponent e of H^(-e), in (0, 1] (e.g. 0.25; for a "
                f"p-th root use 1/p), got {exponent_override}"
            )
        if grafting not in GRAFTS:
            raise ValueError(f"optimizer.grafting: expected one of {', '.join(GRAFTS)}, got {grafting!r}")
        if not 0.0 <= grafting_beta2 <= 1.0:
            raise ValueError(f"optimizer.grafting_beta2: must be in [0, 1], got {grafting_beta2}")
        if preconditioner_dtype not in DTYPES:
            raise ValueError(
                f"optimizer.preconditioner_dtype: expected float32, float64 or bfloat16, got {preconditioner_dtype!r}"
            )
        self.betas = (b1, b2)
        self.eps = float(eps)
        self.max_dim = int(max_preconditioner_dim)
        self.frequency = int(precondition_frequency)
        self.start = int(start_preconditioning_step)
        self.exponent_override = exponent_override
        self.grafting = grafting
        self.graft_beta2 = float(grafting_beta2)
        self.graft_eps = float(grafting_eps)
        self.pdtype = DTYPES[preconditioner_dtype]
        self.mm_dtype = MM_DTYPES.get(preconditioner_dtype)
        self.nesterov = bool(nesterov)
        self.bias_correction = bool(bias_correction)
        self.plan: list[BlockInfo] | None = None
        self.world, self.rank = 1, 0
        self.owned: list[BlockInfo] = []
        self.state: dict[str, BlockState] = {}
        self._signature: tuple[tuple[int, tuple[int, ...]], ...] | None = None
        self._send: Tensor | None = None
        self._recv: Tensor | None = None
        self._pending: dict[str, Any] = {}
        self._stats_dirty = True
        self._clock = [0.0, 0.0, 0.0]
        self._phases: frozenset[int] = frozenset({0})  # phases that have at least one matrix block
        self.global_root_failures = 0
        self.global_max_condition = 1.0

    # -- plan -------------------------------------------------------------------------------------
    def _built_plan(self) -> list[BlockInfo]:
        """The block plan (built at the first step)."""
        if self.plan is None:
            raise RuntimeError("Shampoo: no block plan yet (it is built at the first step)")
        return self.plan

    def _send_buffer(self) -> Tensor:
        """This rank's packed new block values (allocated with the plan)."""
        if self._send is None:
            raise RuntimeError("Shampoo: no block plan yet (it is built at the first step)")
        return self._send

    def exponent(self, order: int) -> float:
        """e in H_i^(-e) for a block of this order: 1/(2k) unless overridden."""
        return float(self.exponent_override) if self.exponent_override is not None else 1.0 / (2 * order)

    def group_hyper(self) -> dict[str, Any]:
        return {"betas": self.betas}

    def refresh_due(self, step: int) -> bool:
        """Whether any block recomputes its roots at ``step`` (the same answer on every rank)."""
        return any(refreshes_at(step, p, self.start, self.frequency) for p in self._phases)

    def refreshing(self, step: int) -> list[BlockInfo]:
        """The matrix blocks (of all ranks) that recompute their roots at ``step``."""
        return [
            b
            for b in self._built_plan()
            if not b.diagonal and refreshes_at(step, b.phase, self.start, self.frequency)
        ]

    def _build(self, groups: Sequence[GroupShard], ctx: StepContext, comm: Any) -> None:
        self.world = comm.world if comm is not None else 1
        self.rank = comm.rank if comm is not None else 0
        pieces = []
        for gi, g in enumerate(groups):
            for pi, (slot, shape) in enumerate(zip(g.layers, g.shapes, strict=True)):
                numel = math.prod(shape)
                if g.params[pi].numel() != numel or g.grads[pi].numel() != numel:
                    raise RuntimeError(
                        "Shampoo needs whole tensors: the engine must hand it replicated pieces "
                        f"(layer {slot}: piece of {g.params[pi].numel()} elements, shape {shape})"
                    )
                pieces.append((slot, gi, pi, tuple(shape)))
        pieces.sort()
        blocks: list[tuple[str, int, int, int, LayerBlocking, Block]] = []
        for slot, gi, pi, shape in pieces:
            name = ctx.layer_names[slot] if slot < len(ctx.layer_names) else f"param{slot}"
            layer = block_layer(shape, self.max_dim)
            blocks += [(f"{name}/{b.index}", slot, gi, pi, layer, b) for b in layer.blocks]
        costs = [block_cost(b.shape, layer.diagonal, self.frequency) for *_, layer, b in blocks]
        owners = assign(costs, self.world)
        phases = refresh_phases(
            {key: root_cost(b.shape, layer.diagonal) for key, *_, layer, b in blocks}, self.frequency
        )
        fill = [0] * self.world
        plan = []
        for (key, slot, gi, pi, layer, b), r in zip(blocks, owners, strict=True):
            plan.append(BlockInfo(key, slot, gi, pi, layer, b, r, fill[r], phases[key]))
            fill[r] += b.numel
        self.plan = plan
        self._phases = frozenset(b.phase for b in plan if not b.diagonal) or frozenset({0})
        self.owned = [b for b in plan if b.owner == self.rank]
        self._signature = tuple((slot, shape) for slot, _, _, shape in pieces)
        ref = groups[0].params[0]
        self.state = {b.key: self._fresh_state(b, ref) for b in self.owned}
        width = max(fill)
        self._send = torch.zeros(width, dtype=ref.dtype, device=ref.device)
        self._recv = (
            torch.zeros(width * self.world, dtype=ref.dtype, device=ref.device) if self.world > 1 else None
        )
        self._apply_pending()

    def _fresh_state(self, b: BlockInfo, ref: Tensor) -> BlockState:
        shape = b.block.shape
        factors = (
            [] if b.diagonal else [torch.zeros(d, d, dtype=self.pdtype, device=ref.device) for d in shape]
        )
        momentum = torch.zeros(shape, dtype=ref.dtype, device=ref.device) if self.betas[0] > 0 else None
        graft = (
            torch.zeros(shape, dtype=ref.dtype, device=ref.device)
            if self.grafting in STATEFUL_GRAFTS
            else None
        )
        return BlockState(factors, [None] * len(factors), momentum, graft, 0, [1.0] * len(factors))

    # -- step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, groups: Sequence[GroupShard], ctx: StepContext) -> None:
        comm = ctx.comm if ctx.comm is not None and ctx.comm.world > 1 else None
        if self.plan is None:
            self._build(groups, ctx, comm)
        else:
            sig = tuple(
                sorted(
                    (slot, tuple(shape))
                    for g in groups
                    for slot, shape in zip(g.layers, g.shapes, strict=True)
                )
            )
            if sig != self._signature:
                raise RuntimeError("Shampoo: the parameter layout changed after the first step")
        t = ctx.step
        refresh = self.refresh_due(t)
        f, start = self.frequency, self.start
        betas = [group_betas(g, self.betas, beta1_buffer=True) for g in groups]
        self._clock = [0.0, 0.0, 0.0]  # statistics, roots, preconditioning (s) of this step
        t0 = time.perf_counter()
        for b in self.owned:
            g = groups[b.group]
            self._update_block(
                b,
                self.state[b.key],
                g.params[b.piece],
                g.grads[b.piece],
                t,
                refresh and refreshes_at(t, b.phase, start, f),
                float(g.hp["lr"]),
                float(g.hp.get("weight_decay", 0.0)),
                betas[b.group],
            )
        t1 = time.perf_counter()
        self._exchange(groups, comm)
        if refresh or self._stats_dirty:
            self._reduce_stats(comm)
        ctx.stats["shampoo/root_failures"] = self.global_root_failures
        ctx.stats["shampoo/max_condition"] = self.global_max_condition
        ctx.stats["shampoo/refresh"] = int(refresh)  # some block (on some rank) refreshed its roots
        ctx.stats["shampoo/refresh_blocks"] = sum(
            1 for b in self.owned if refresh and not b.diagonal and refreshes_at(t, b.phase, start, f)
        )
        ctx.stats["time/shampoo_blocks_ms"] = 1e3 * (t1 - t0)  # this rank's blocks (incl. root refresh)
        ctx.stats["time/shampoo_exchange_ms"] = 1e3 * (time.perf_counter() - t1)  # all-gather + unpack
        for name, sec in zip(("statistics", "roots", "precondition"), self._clock, strict=True):
            ctx.stats[f"time/shampoo_{name}_ms"] = 1e3 * sec  # parts of blocks_ms

    def _update_block(
        self,
        b: BlockInfo,
        st: BlockState,
        param: Tensor,
        grad: Tensor,
        t: int,
        refresh: bool,
        lr: float,
        wd: float,
        betas: tuple[float, float],
    ) -> None:
        grad_b = block_view(grad, b.layer, b.block)
        grad_b = grad_b if grad_b.is_contiguous() else grad_b.contiguous()
        grad_b = grad_b.view(b.block.shape)
        m = first_moment(st.momentum, grad_b, t, betas[0], self.nesterov, self.bias_correction)
        d_graft = graft_direction(
            self.grafting, st.graft, grad_b, m, t, self.graft_beta2, self.graft_eps, self.bias_correction
        )
        if b.diagonal:
            d = d_graft
        else:
            clock = self._clock
            c0 = time.perf_counter()
            block_math.accumulate(st, grad_b, betas[1], self.pdtype)
            c1 = time.perf_counter()
            clock[0] += c1 - c0
            if t >= self.start:
                if refresh:
                    block_math.refresh(st, self.exponent(len(st.factors)), self.eps, self.mm_dtype)
                c2 = time.perf_counter()
                d = block_math.precondition(st, m, self.pdtype)
                clock[1] += c2 - c1
                clock[2] += time.perf_counter() - c2
                if self.grafting != "none":
                    ds_norm = float(torch.linalg.vector_norm(d))
                    dg_norm = float(torch.linalg.vector_norm(d_graft))
                    d = d.mul_(dg_norm / ds_norm if ds_norm > 0 else 0.0)
            else:
                d = d_graft
        new = self._send_buffer()[b.offset : b.offset + b.block.numel].view(b.block.shape)
        p = block_view(param, b.layer, b.block)
        if wd:
            torch.mul(p, 1.0 - lr * wd, out=new)
        else:
            new.copy_(p)
        new.add_(d, alpha=-lr)

    def _exchange(self, groups: Sequence[GroupShard], comm: Any) -> None:
        """All-gather every rank's packed new values and copy them into the parameters."""
        send = self._send_buffer()
        if comm is None:
            buf = send.view(1, -1)
        else:
            recv = self._recv
            assert recv is not None  # allocated with the plan whenever there is more than one rank
            comm.all_gather(recv, send)
            buf = recv.view(self.world, -1)
        for b in self._built_plan():
            src = buf[b.owner, b.offset : b.offset + b.block.numel]
            dst = block_view(groups[b.group].params[b.piece], b.layer, b.block)
            dst.copy_(src.view(dst.shape))

    def _reduce_stats(self, comm: Any) -> None:
        fails = sum(st.root_failures for st in self.state.values())
        cond = max((c for st in self.state.values() for c in st.condition), default=1.0)
        if comm is None:
            self.global_root_failures, self.global_max_condition = fails, cond
        else:
            vec = torch.zeros(2 * self.world, dtype=torch.float64)
            vec[self.rank] = fails
            vec[self.world + self.rank] = cond
            comm.all_reduce(vec)
            self.global_root_failures = int(vec[: self.world].sum())
            self.global_max_condition = float(vec[self.world :].max())
        self._stats_dirty = False

    # -- state ------------------------------------------------------------------------------------
    def rule_state_dict(self) -> dict[str, Any]:
        """{"{layer}/{block}": {...}} for the blocks this rank owns (before the first step: whatever
        was loaded, unchanged)."""
        if self.plan is None:
            return dict(self._pending)
        return {b.key: save_block(b, self.state[b.key]) for b in self.owned}

    def load_rule_state_dict(self, state: dict[str, Any]) -> None:
        """Take the entries of the blocks this rank owns from ``state`` (which may hold any superset,
        e.g. the union of all ranks' saved blocks at another world size). Applied at the first step
        if the block plan does not exist yet."""
        self._pending = dict(state)
        if self.plan is not None:
            self._apply_pending()

    def _apply_pending(self) -> None:
        state, self._pending = self._pending, {}
        if not state:
            return
        known = {b.key for b in self._built_plan()}
        unknown = sorted(set(state) - known)
        if unknown:
            raise KeyError(
                f"shampoo state has blocks this model does not have: {', '.join(unknown[:5])} (different "
                "model or max_preconditioner_dim?)"
            )
        for b in self.owned:
            entry = state.get(b.key)
            if entry is None:
                raise KeyError(f"shampoo state has no entry for block {b.key!r}")
            load_block(b, self.state[b.key], entry, self.pdtype)
            block_math.sync_mm_roots(self.state[b.key], self.mm_dtype)
        self._stats_dirty = True

    # -- introspection ----------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of Shampoo state held by this rank (statistics, roots, first moment, graft)."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.tensors())

    def preconditioner_bytes(self) -> int:
        """Bytes of statistics and roots (with their bfloat16 copies) held by this rank."""
        return sum(
            t.numel() * t.element_size()
            for st in self.state.values()
            for t in list(st.factors) + [r for r in st.roots + st.mm_roots if r is not None]
        )
