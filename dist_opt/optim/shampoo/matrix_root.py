"""Inverse p-th roots of symmetric positive semi-definite statistics (pure functions).

``inverse_root(H, e, eps)`` returns (H + eps·I)^(-e) by a symmetric eigendecomposition
H + eps·I = Q diag(λ) Qᵀ in H's dtype (float32 or float64):

    λ ← max(λ, n·u·λ_max)          u = unit round-off of the dtype, n = size of H
    root = Q diag(λ^(-e)) Qᵀ

``eps`` is absolute (added before the eigendecomposition, as in the papers). The floor n·u·λ_max
is the eigensolver's own accuracy: eigenvalues below it are round-off (possibly negative), and
raising them to -e would amplify noise without bound, so they are treated as equal to it. The
floor therefore also bounds the condition number a root can have (≈ 1/(n·u) before the power).

Failure — non-finite input, an eigensolver error (a float32 error is first retried in float64),
non-finite output or λ_max <= 0 — returns ``ok=False`` and no root; the caller keeps its previous
root and counts the failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RootResult:
    root: Tensor | None  # None when ok is False
    ok: bool
    condition: float  # λ_max / λ_min of the (regularised, floored) spectrum; inf on failure


FAILED = RootResult(None, False, math.inf)


def _eigh(a: Tensor) -> tuple[Tensor, Tensor] | None:
    try:
        return torch.linalg.eigh(a)
    except RuntimeError:  # torch.linalg.LinAlgError: no convergence
        if a.dtype == torch.float64:
            return None
    try:
        lam, q = torch.linalg.eigh(a.double())
    except RuntimeError:
        return None
    return lam.to(a.dtype), q.to(a.dtype)


def eigen_floor(lam_max: float, n: int, dtype: torch.dtype) -> float:
    """The smallest eigenvalue a root uses: n·u·λ_max (u = the dtype's machine epsilon)."""
    return max(n * torch.finfo(dtype).eps * lam_max, torch.finfo(dtype).tiny)


def inverse_root(h: Tensor, exponent: float, eps: float) -> RootResult:
    """(h + eps·I)^(-exponent) for a symmetric matrix ``h`` (see the module docstring)."""
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"inverse_root needs a square matrix, got shape {tuple(h.shape)}")
    if not bool(torch.isfinite(h).all()):
        return FAILED
    a = h.clone()
    a.diagonal().add_(eps)
    out = _eigh(a)
    if out is None:
        return FAILED
    lam, q = out
    if not (bool(torch.isfinite(lam).all()) and bool(torch.isfinite(q).all())):
        return FAILED
    lam_max = float(lam.max())
    if not lam_max > 0:
        return FAILED
    floor = eigen_floor(lam_max, h.shape[0], h.dtype)
    lam = lam.clamp(min=floor)
    root = (q * lam.pow(-exponent)) @ q.T
    if not bool(torch.isfinite(root).all()):
        return FAILED
    return RootResult(root, True, lam_max / float(lam.min()))
