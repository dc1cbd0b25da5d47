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
        lam, q = torch.linalg.eigh(a)
        return lam, q
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


# -- statistics update ---------------------------------------------------------------------------
try:  # BLAS syrk does half the work of a general matmul for X·Xᵀ; scipy is optional
    from scipy.linalg import blas as _blas
except ImportError:  # pragma: no cover - depends on the environment
    _blas = None

_SYRK = {torch.float32: "ssyrk", torch.float64: "dsyrk"}


def gram_update_(h: Tensor, x: Tensor, alpha: float, beta: float, use_blas: bool | None = None) -> Tensor:
    """h ← beta·h + alpha·x·xᵀ on (at least) the lower triangle of ``h``, which is all that
    ``torch.linalg.eigh`` reads; use ``symmetrize_`` before exposing ``h``.

    ``h`` is (d, d) C-contiguous, ``x`` (d, k) C- or F-contiguous, both CPU tensors of h's dtype.
    With scipy this is one BLAS syrk on the tensors' memory (half the flops of a matmul);
    otherwise (or with ``use_blas=False``) ``torch.addmm`` on the full matrix.
    """
    blas_ok = (
        _blas is not None
        and h.device.type == "cpu"
        and h.dtype in _SYRK
        and x.dtype == h.dtype
        and h.is_contiguous()
        and (x.is_contiguous() or x.T.is_contiguous())
    )
    if not (blas_ok if use_blas is None else use_blas and blas_ok):
        return h.addmm_(x, x.T, beta=beta, alpha=alpha)
    syrk = getattr(_blas, _SYRK[h.dtype])
    c = h.numpy().T  # Fortran view of h: its upper triangle is h's lower triangle
    if x.is_contiguous():  # x (d, k) row-major = a Fortran (k, d) matrix A = xᵀ: x·xᵀ = AᵀA
        out = syrk(alpha, x.numpy().T, beta=beta, c=c, trans=1, lower=0, overwrite_c=1)
    else:  # x is a Fortran (d, k) matrix A: x·xᵀ = A·Aᵀ
        out = syrk(alpha, x.numpy(), beta=beta, c=c, trans=0, lower=0, overwrite_c=1)
    if out.ctypes.data != c.ctypes.data:  # scipy made a copy after all
        h.copy_(torch.from_numpy(out.T))
    return h


def symmetrize_(h: Tensor) -> Tensor:
    """Copy the lower triangle of a square matrix onto its upper triangle (in place)."""
    strict_lower = torch.tril(h, diagonal=-1)
    h.tril_().add_(strict_lower.T)
    return h
