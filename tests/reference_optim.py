"""Plain, per-tensor LARS and LAMB written straight from the papers (LARS: You et al. 2017, LAMB: You et al. 2020), for tests only."""

from __future__ import annotations

import torch


class RefLARS:
    """You, Gitman, Ginsburg 2017, Alg. 1: λ = η‖p‖/(‖g‖ + β‖p‖); b = m b + γ λ (g + β p); p -= b."""

    def __init__(self, params, lr, momentum=0.9, eta=0.001, weight_decay=0.0, excluded=()):
        self.params, self.lr, self.m, self.eta, self.wd = list(params), lr, momentum, eta, weight_decay
        self.excluded = set(excluded)  # indices into params
        self.bufs = [torch.zeros_like(p) for p in self.params]
        self.ratios = []

    @torch.no_grad()
    def step(self):
        self.ratios = []
        for i, p in enumerate(self.params):
            g = p.grad
            if i in self.excluded:
                lam, wd = 1.0, 0.0
            else:
                wd = self.wd
                pn, gn = p.norm().item(), g.norm().item()
                den = gn + wd * pn
                lam = self.eta * pn / den if pn > 0 and gn > 0 and den > 0 else 1.0
            self.ratios.append(lam)
            self.bufs[i] = self.m * self.bufs[i] + self.lr * lam * (g + wd * p)
            p -= self.bufs[i]


class RefLAMB:
    """You et al. 2019, Alg. 2: Adam moments with bias correction, u = m̂/(√v̂+ε) + λp,
    p -= lr · ‖p‖/‖u‖ · u, ratio 1 when a norm is 0."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, excluded=()):
        self.params, self.lr, self.betas, self.eps, self.wd = list(params), lr, betas, eps, weight_decay
        self.excluded = set(excluded)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0
        self.ratios = []

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.betas
        self.ratios = []
        for i, p in enumerate(self.params):
            g = p.grad
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            mh = self.m[i] / (1 - b1**self.t)
            vh = self.v[i] / (1 - b2**self.t)
            u = mh / (vh.sqrt() + self.eps)
            if i in self.excluded:
                ratio = 1.0
            else:
                u = u + self.wd * p
                pn, un = p.norm().item(), u.norm().item()
                ratio = pn / un if pn > 0 and un > 0 else 1.0
            self.ratios.append(ratio)
            p -= self.lr * ratio * u
