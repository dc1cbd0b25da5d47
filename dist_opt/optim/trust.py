"""Layer-wise adaptive rules with exact per-layer trust ratios under sharding.

LARS (You, Gitman, Ginsburg 2017, Alg. 1) and LAMB (You et al. 2019, Alg. 2). A layer's norms
are sums of squares over all of its pieces on all ranks: each rank adds its pieces into a
[k, n_layers] matrix and ``ctx.layer_sumsq`` completes it with ONE all-reduce per step.
Zero-norm guard: the ratio is 1 when a norm it depends on is 0 (never 0, never NaN).
Excluded layers (``hp["trust"] is False``: biases, norms) use ratio 1 and no weight decay.
LARS's ``momentum`` and LAMB's ``betas`` are read from each param group at every step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dist_opt.optim.base import GroupShard, Rule, StepContext, group_betas, group_momentum, sumsq_into


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
        # directions d = g + βp (β = 0 for excluded layers) are needed for the 'tf' denominator
        dirs = []
        for g in groups:
            wd = g.hp["weight_decay"] if g.hp.get("trust", True) else 0.0
            dirs.append(torch._foreach_add(g.grads, g.params, alpha=wd) if wd else list(g.grads))
        rows = 3
        partial = torch.zeros(rows, ctx.n_layers, dtype=torch.float64)
        for g, d in zip(groups, dirs, strict=True):
            sumsq_into(partial, 0, g.layers, g.params)
            sumsq_into(partial, 1, g.layers, g.grads)
            if self.denominator == "tf":
                sumsq_into(partial, 2, g.layers, d)
        norms = ctx.layer_sumsq(partial).sqrt()
        p_norm, g_norm, d_norm = norms[0], norms[1], norms[2]
        trusted = torch.zeros(ctx.n_layers, dtype=torch.bool)
        wd_of = torch.zeros(ctx.n_layers, dtype=torch.float64)
        for g in groups:
            if g.hp.get("trust", True):
                trusted[list(g.layers)] = True
                wd_of[list(g.layers)] = g.hp["weight_decay"]
        den = g_norm + wd_of * p_norm if self.denominator == "paper" else d_norm
        ratio = _safe_ratio(self.eta * p_norm, den)
        ratio = torch.where(trusted & (g_norm > 0), ratio, torch.ones_like(ratio))
        _summarize(ctx, ratio, trusted)
        rl = ratio.tolist()
        for g, d, mu in zip(groups, dirs, mus, strict=True):
            scale = [g.hp["lr"] * rl[i] for i in g.layers]
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

    def step(self, groups: Sequence[GroupShard], ctx: StepContext) -> None:
        t = ctx.step
        updates = []
        partial = torch.zeros(2, ctx.n_layers, dtype=torch.float64)
        for g in groups:
            b1, b2 = group_betas(g, self.betas)
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
            wd = g.hp["weight_decay"] if g.hp.get("trust", True) else 0.0
            if wd:
                torch._foreach_add_(u, g.params, alpha=wd)
            updates.append(u)
            sumsq_into(partial, 0, g.layers, g.params)
            sumsq_into(partial, 1, g.layers, u)
        norms = ctx.layer_sumsq(partial).sqrt()
        p_norm, u_norm = norms[0], norms[1]
        phi = p_norm if self.trust_clip is None else p_norm.clamp(*self.trust_clip)
        trusted = torch.zeros(ctx.n_layers, dtype=torch.bool)
        for g in groups:
            if g.hp.get("trust", True):
                trusted[list(g.layers)] = True
        guarded = torch.where(p_norm > 0, _safe_ratio(phi, u_norm), torch.ones_like(phi))
        ratio = torch.where(trusted, guarded, torch.ones_like(phi))
        _summarize(ctx, ratio, trusted)
        rl = ratio.tolist()
        for g, u in zip(groups, updates, strict=True):
            torch._foreach_mul_(u, [g.hp["lr"] * rl[i] for i in g.layers])
            torch._foreach_sub_(g.params, u)
