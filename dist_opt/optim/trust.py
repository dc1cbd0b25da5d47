"""Layer-wise adaptive rules with exact per-layer trust ratios under sharding.

LARS (You, Gitman, Ginsburg 2017, Alg. 1) and LAMB (You et al. 2019, Alg. 2). A layer's norms
are sums of squares over all of its pieces on all ranks: each rank adds its pieces into a
[k, n_layers] matrix and ``ctx.layer_sumsq`` completes it with ONE all-reduce per step.
Zero-norm guard: the ratio is 1 when a norm it depends on is 0 (never 0, never NaN).
Excluded layers (``hp["trust"] is False``: biases, norms) use ratio 1 and no weight decay.
LARS's ``momentum`` and LAMB's ``betas`` are read from each param group at every step.

Speed: both rules make as few passes over the shard as the trust ratio allows and allocate
nothing per step. LARS: one norm pass, then torch's fused SGD kernel per layer (its momentum,
dampening and weight-decay arguments express b = m·b + γλ(g + βp), p -= b). LAMB: the Adam
direction plus λp is written into a persistent scratch buffer by torch's fused AdamW kernel
(lr = -1, so the kernel *adds* the direction to the λp it finds there), one norm pass, then
p -= lr·ratio·u per layer. Where the fused kernels do not apply (LAMB without bias correction,
unusual dtypes) the same arithmetic runs as foreach operations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dist_opt.optim.base import (
    GroupShard,
    Rule,
    Scratch,
    StepContext,
    fusable,
    group_betas,
    group_momentum,
    sumsq_into,
)


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    ok = (num > 0) & (den > 0)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.ones_like(num))


def _summarize(ctx: StepContext, ratios: Tensor, trusted: Tensor) -> None:
    ctx.stats["trust_ratios"] = ratios  # per layer (slot order), 1 for excluded layers
    if not bool(trusted.any()):
        return
    r = ratios[trusted]
    ctx.stats["trust_ratio/mean"] = float(r.mean())
    ctx.stats["trust_ratio/min"] = float(r.min())
    ctx.stats["trust_ratio/max"] = float(r.max())
    idx = torch.nonzero(trusted).flatten()
    if ctx.layer_names:
        ctx.stats["trust_ratio/argmin"] = ctx.layer_names[int(idx[int(r.argmin())])]
        ctx.stats["trust_ratio/argmax"] = ctx.layer_names[int(idx[int(r.argmax())])]


def _trusted_mask(groups: Sequence[GroupShard], n_layers: int) -> Tensor:
    trusted = torch.zeros(n_layers, dtype=torch.bool)
    for g in groups:
        if g.hp.get("trust", True):
            trusted[list(g.layers)] = True
    return trusted


def _decay(g: GroupShard) -> float:
    """The group's weight decay, 0 for layers excluded from the trust ratio."""
    return float(g.hp["weight_decay"]) if g.hp.get("trust", True) else 0.0


class LARS(Rule):
    """λ = η‖p‖/(‖g‖ + β‖p‖) (or η‖p‖/‖g + βp‖, the TF/MLPerf form); b = m·b + γ·λ·(g + βp); p -= b."""

    group_hyper_keys = ("momentum",)

    uses_trust_ratio = True

    def __init__(self, *, momentum: float, trust_coefficient: float, lars_denominator: str):
        if lars_denominator not in ("paper", "tf"):
            raise ValueError(f"optimizer.lars_denominator: must be 'paper' or 'tf', got {lars_denominator!r}")
        self.momentum, self.eta, self.denominator = momentum, trust_coefficient, lars_denominator
        self.state_names = ("momentum_buffer",) if momentum else ()

    def step(self, groups: Sequence[GroupShard], ctx: StepContext) -> None:
        mus = [group_momentum(g, self.momentum) for g in groups]  # checked before any update
        partial = torch.zeros(3, ctx.n_layers, dtype=torch.float64)
        for g in groups:
            sumsq_into(partial, 0, g.layers, g.params)
            sumsq_into(partial, 1, g.layers, g.grads)
            if self.denominator == "tf":  # ‖g + βp‖ needs the direction (a temporary)
                wd = _decay(g)
                d = torch._foreach_add(g.grads, g.params, alpha=wd) if wd else list(g.grads)
                sumsq_into(partial, 2, g.layers, d)
        norms = ctx.layer_sumsq(partial).sqrt()
        p_norm, g_norm, d_norm = norms[0], norms[1], norms[2]
        trusted = _trusted_mask(groups, ctx.n_layers)
        wd_of = torch.zeros(ctx.n_layers, dtype=torch.float64)
        for g in groups:
            if g.hp.get("trust", True):
                wd_of[list(g.layers)] = g.hp["weight_decay"]
        den = g_norm + wd_of * p_norm if self.denominator == "paper" else d_norm
        ratio = _safe_ratio(self.eta * p_norm, den)
        ratio = torch.where(trusted & (g_norm > 0), ratio, torch.ones_like(ratio))
        _summarize(ctx, ratio, trusted)
        rl = ratio.tolist()
        for g, mu in zip(groups, mus, strict=True):
            scale = [g.hp["lr"] * rl[i] for i in g.layers]
            if fusable(g.params, g.grads):
                self._fused(g, mu, scale)
            else:
                self._foreach(g, mu, scale)

    @staticmethod
    def _fused(g: GroupShard, mu: float, scale: list[float]) -> None:
        # torch's fused SGD: b = mu·b + (1 - dampening)·(g + wd·p); p -= lr·b. With lr = 1 and
        # dampening = 1 - s this is LARS's b = mu·b + s·(g + wd·p); p -= b (no momentum: lr = s)
        wd = _decay(g)
        bufs = g.state["momentum_buffer"] if mu else list(g.params)  # (unused without momentum)
        for p, gr, b, s in zip(g.params, g.grads, bufs, scale, strict=True):
            common: dict[str, Any] = {"weight_decay": wd, "nesterov": False, "maximize": False}
            if mu:
                torch._fused_sgd_(
                    [p], [gr], [b], momentum=mu, lr=1.0, dampening=1.0 - s, is_first_step=False, **common
                )
            else:
                torch._fused_sgd_(
                    [p], [gr], [], momentum=0.0, lr=s, dampening=0.0, is_first_step=False, **common
                )

    @staticmethod
    def _foreach(g: GroupShard, mu: float, scale: list[float]) -> None:
        wd = _decay(g)
        d = torch._foreach_add(g.grads, g.params, alpha=wd) if wd else list(g.grads)
        if mu:
            bufs = g.state["momentum_buffer"]
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, torch._foreach_mul(d, scale))
            torch._foreach_sub_(g.params, bufs)
        else:
            torch._foreach_sub_(g.params, torch._foreach_mul(d, scale))


class LAMB(Rule):
    """Adam direction r = m̂/(√v̂ + ε), u = r + λp (decoupled), p -= lr·φ(‖p‖)/‖u‖·u."""

    group_hyper_keys = ("betas",)

    uses_trust_ratio = True
    decoupled_weight_decay = True
    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        *,
        betas: tuple[float, float],
        eps: float,
        bias_correction: bool,
        trust_clip: tuple[float, float] | None,
    ):
        b1, b2 = betas
        clip = tuple(trust_clip) if trust_clip else None
        self.betas, self.eps, self.bias_correction, self.trust_clip = (b1, b2), eps, bias_correction, clip
        self._scratch = Scratch()

    def step(self, groups: Sequence[GroupShard], ctx: StepContext) -> None:
        updates = []
        partial = torch.zeros(2, ctx.n_layers, dtype=torch.float64)
        for gi, g in enumerate(groups):
            b1, b2 = group_betas(g, self.betas)
            fused = self.bias_correction and fusable(g.params, g.grads, *g.state.values())
            u = (
                self._fused_direction(gi, g, b1, b2, ctx.step)
                if fused
                else self._direction(g, b1, b2, ctx.step)
            )
            updates.append(u)
            sumsq_into(partial, 0, g.layers, g.params)
            sumsq_into(partial, 1, g.layers, u)
        norms = ctx.layer_sumsq(partial).sqrt()
        p_norm, u_norm = norms[0], norms[1]
        phi = p_norm if self.trust_clip is None else p_norm.clamp(*self.trust_clip)
        trusted = _trusted_mask(groups, ctx.n_layers)
        guarded = torch.where(p_norm > 0, _safe_ratio(phi, u_norm), torch.ones_like(phi))
        ratio = torch.where(trusted, guarded, torch.ones_like(phi))
        _summarize(ctx, ratio, trusted)
        rl = ratio.tolist()
        for g, u in zip(groups, updates, strict=True):
            lr = g.hp["lr"]
            for p, x, i in zip(g.params, u, g.layers, strict=True):
                p.add_(x, alpha=-(lr * rl[i]))

    def _fused_direction(self, gi: int, g: GroupShard, b1: float, b2: float, t: int) -> list[Tensor]:
        """u = r + λp in this group's scratch buffer; updates m and v (one fused pass)."""
        u = self._scratch.like(gi, g.params)
        wd = _decay(g)
        if wd:
            for x, p in zip(u, g.params, strict=True):
                torch.mul(p, wd, out=x)
        else:
            torch._foreach_zero_(u)
        step = self._scratch.step_tensor(t)
        # fused AdamW on x with lr = -1, no decay: x += m̂/(√v̂ + ε), and m, v updated in place
        torch._fused_adamw_(
            u,
            list(g.grads),
            g.state["exp_avg"],
            g.state["exp_avg_sq"],
            [],
            [step] * len(u),
            lr=-1.0,
            beta1=b1,
            beta2=b2,
            weight_decay=0.0,
            eps=self.eps,
            amsgrad=False,
            maximize=False,
        )
        return u

    def _direction(self, g: GroupShard, b1: float, b2: float, t: int) -> list[Tensor]:
        """The same direction with foreach operations (temporaries; any bias-correction setting)."""
        bc1 = 1 - b1**t if self.bias_correction else 1.0
        bc2_sqrt = (1 - b2**t) ** 0.5 if self.bias_correction else 1.0
        m, v = g.state["exp_avg"], g.state["exp_avg_sq"]
        torch._foreach_lerp_(m, g.grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, g.grads, g.grads, 1 - b2)
        # bias correction into temporaries; m and v themselves are never rescaled (Alg. 2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, self.eps)
        u = torch._foreach_div(m, denom)
        torch._foreach_div_(u, bc1)
        wd = _decay(g)
        if wd:
            torch._foreach_add_(u, g.params, alpha=wd)
        return list(u)
