"""Elementwise optimizers on shard pieces, computed by torch.optim's own kernels.

For elementwise rules a shard piece is just a smaller tensor, so torch.optim's functional
kernels (foreach, or fused where torch has a CPU/GPU fused kernel) give torch.optim's exact
semantics (first-step momentum clone, Adagrad lr decay, RMSProp centered/momentum, AMSGrad)
at torch's speed. ``momentum`` / ``betas`` are read from the param group at every step (torch's
names, so momentum-cycling schedulers drive them). Hyper-parameters have no defaults here: each optimizer's are declared once, in
``dist_opt.optim.catalog``. Adam without bias correction, which torch lacks, is written out here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.optim.adagrad as _adagrad
import torch.optim.adam as _adam
import torch.optim.rmsprop as _rmsprop
import torch.optim.sgd as _sgd
from torch import Tensor

from dist_opt.optim.base import GroupShard, Rule, StepContext, group_betas, group_momentum


def _steps(pieces: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros((), dtype=torch.float32, device=p.device) for p in pieces]


def _fused_ok(pieces: Sequence[Tensor]) -> bool:
    return all(p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) for p in pieces)


class SGD(Rule):
    """SGD, heavy-ball momentum (PyTorch form b = μb + (1-τ)g) and Nesterov; L2 weight decay."""

    group_hyper_keys = ("momentum",)

    def __init__(self, *, momentum: float, dampening: float, nesterov: bool):
        self.momentum, self.dampening, self.nesterov = momentum, dampening, nesterov
        self.state_names = ("momentum_buffer",) if momentum else ()

    def step(self, groups: Sequence[GroupShard], ctx: StepContext) -> None:
        mus = [group_momentum(g, self.momentum) for g in groups]  # checked before any update
        for g, mu in zip(groups, mus, strict=True):
            bufs: list[Tensor | None] = [None] * len(g.params)
            if mu:
                # torch's first step clones the gradient into the buffer (no dampening on step 1);
                # ctx.step counts applied steps, so this also holds after a resume or a skipped step
                first = ctx.step == 1 and self.dampening != 0
                bufs = bufs if first else list(g.state["momentum_buffer"])
            _sgd.sgd(
                g.params,
                g.grads,
                bufs,
                foreach=True,
                weight_decay=g.hp["weight_decay"],
                momentum=mu,
                lr=g.hp["lr"],
                dampening=self.dampening,
                nesterov=self.nesterov,
                maximize=False,
            )
            if mu:
                for dst, src in zip(g.state["momentum_buffer"], bufs, strict=True):
                    if src is not None and src is not dst:
                        dst.copy_(src)


class Adagrad(Rule):
    state_names = ("sum",)

    def __init__(self, *, eps: float, lr_decay: float, initial_accumulator_value: float):
        self.eps, self.lr_decay, self.init_acc = eps, lr_decay, initial_accumulator_value

    def init_state(self, pieces: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        return {"sum": [torch.full_like(p, self.init_acc) for p in pieces], "step": _steps(pieces)}

    def step(self, groups: Sequence[GroupShard], ctx: StepContext) -> None:
        for g in groups:
            _adagrad.adagrad(
                g.params,
                g.grads,
                g.state["sum"],
                g.state["step"],
                foreach=True,
                lr=g.hp["lr"],
                weight_decay=g.hp["weight_decay"],
                lr_decay=self.lr_decay,
                eps=self.eps,
                maximize=False,
            )


class _CountsSteps(Rule):
    """A rule whose torch kernel keeps a step count per piece (next to the zero-filled state)."""

    def init_state(self, pieces: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        st = super().init_state(pieces)
        st["step"] = _steps(pieces)
        return st


class RMSProp(_CountsSteps):
    group_hyper_keys = ("momentum",)

    def __init__(self, *, alpha: float, eps: float, momentum: float, centered: bool):
        self.alpha, self.eps, self.momentum, self.centered = alpha, eps, momentum, centered
        names = (
            ["square_avg"] + (["grad_avg"] if centered else []) + (["momentum_buffer"] if momentum else [])
        )
        self.state_names = tuple(names)

    def step(self, groups: Sequence[GroupShard], ctx: StepContext) -> None:
        mus = [group_momentum(g, self.momentum) for g in groups]  # checked before any update
        for g, mu in zip(groups, mus, strict=True):
            _rmsprop.rmsprop(
                g.params,
                g.grads,
                g.state["square_avg"],
                g.state.get("grad_avg", []),
                g.state.get("momentum_buffer", []),
                g.state["step"],
                foreach=True,
                lr=g.hp["lr"],
                alpha=self.alpha,
                eps=self.eps,
                weight_decay=g.hp["weight_decay"],
                momentum=mu,
                centered=self.centered,
            )


class Adam(_CountsSteps):
    """Adam (L2 decay) or AdamW (decoupled decay), Kingma & Ba with bias correction."""

    group_hyper_keys = ("betas",)

    def __init__(
        self,
        *,
        betas: tuple[float, float],
        eps: float,
        decoupled: bool,
        amsgrad: bool,
        bias_correction: bool,
        fused: bool | None = None,
    ):
        b1, b2 = betas
        self.betas, self.eps, self.amsgrad, self.bias_correction = (b1, b2), eps, amsgrad, bias_correction
        self.decoupled_weight_decay = decoupled
        self.fused = fused
        self.state_names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())

    def step(self, groups: Sequence[GroupShard], ctx: StepContext) -> None:
        for g in groups:
            b1, b2 = group_betas(g, self.betas)
            if not self.bias_correction:
                self._step_uncorrected(g, b1, b2)
                continue
            fused = self.fused if self.fused is not None else _fused_ok(g.params)
            _adam.adam(
                g.params,
                g.grads,
                g.state["exp_avg"],
                g.state["exp_avg_sq"],
                g.state.get("max_exp_avg_sq", []),
                g.state["step"],
                foreach=None if fused else True,
                fused=fused or None,
                decoupled_weight_decay=self.decoupled_weight_decay,
                amsgrad=self.amsgrad,
                beta1=b1,
                beta2=b2,
                lr=g.hp["lr"],
                weight_decay=g.hp["weight_decay"],
                eps=self.eps,
                maximize=False,
            )

    def _step_uncorrected(self, g: GroupShard, b1: float, b2: float) -> None:
        lr, wd = g.hp["lr"], g.hp["weight_decay"]
        grads: list[Tensor] | tuple[Tensor, ...] = g.grads
        torch._foreach_add_(g.state["step"], 1)
        if wd and self.decoupled_weight_decay:
            torch._foreach_mul_(g.params, 1 - lr * wd)
        elif wd:
            grads = torch._foreach_add(grads, g.params, alpha=wd)
        torch._foreach_lerp_(g.state["exp_avg"], grads, 1 - b1)
        torch._foreach_mul_(g.state["exp_avg_sq"], b2)
        torch._foreach_addcmul_(g.state["exp_avg_sq"], grads, grads, 1 - b2)
        v = g.state["exp_avg_sq"]
        if self.amsgrad:
            torch._foreach_maximum_(g.state["max_exp_avg_sq"], v)
            v = g.state["max_exp_avg_sq"]
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(g.params, g.state["exp_avg"], denom, -lr)


def bias_corrections(betas: tuple[float, float], t: int) -> tuple[float, float]:
    """(1 - β1^t, sqrt(1 - β2^t))."""
    return 1 - betas[0] ** t, math.sqrt(1 - betas[1] ** t)
