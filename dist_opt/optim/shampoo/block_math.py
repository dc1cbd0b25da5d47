"""The matrix work of one Shampoo block: statistics update, root refresh, preconditioning.

Statistics and roots are kept in the preconditioner dtype (float32 or float64). With
``preconditioner_dtype: bfloat16`` they stay float32 and the refresh also keeps a bfloat16 copy
of each root (``BlockState.mm_roots``); the preconditioning products ``R_1 … M … R_k`` then run in
bfloat16 (fp32 accumulation inside the matmul kernels; on CPUs with AMX/AVX512-BF16 several times
the fp32 rate) and the result is returned in the first moment's dtype. Grafting rescales the
direction to the graft step's norm, so the bfloat16 rounding only perturbs its direction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dist_opt.optim.shampoo.blocks import BlockState
from dist_opt.optim.shampoo.matrix_root import gram_update_, inverse_root


def accumulate(st: BlockState, grad: Tensor, b2: float, dtype: torch.dtype) -> None:
    """H_i = β2·H_i + (1-β2)·G_(i)·G_(i)ᵀ (β2 = 1: H_i += G_(i)·G_(i)ᵀ), lower triangles only."""
    beta, alpha = (1.0, 1.0) if b2 == 1.0 else (b2, 1.0 - b2)
    g = grad.to(dtype).contiguous()
    order = g.dim()
    for i, h in enumerate(st.factors):
        if order == 1:
            h.addr_(g, g, beta=beta, alpha=alpha)
        elif i == 0:  # mode-0 unfolding: a row-major view
            gram_update_(h, g.reshape(g.shape[0], -1), alpha, beta)
        elif i == order - 1:  # last-mode unfolding: a column-major view
            gram_update_(h, g.reshape(-1, g.shape[-1]).T, alpha, beta)
        else:
            gram_update_(h, g.movedim(i, 0).reshape(g.shape[i], -1), alpha, beta)


def refresh(st: BlockState, exponent: float, eps: float, mm_dtype: torch.dtype | None) -> None:
    """Recompute every root (a failed one keeps its previous root and is counted)."""
    for i, h in enumerate(st.factors):
        res = inverse_root(h, exponent, eps)
        if res.ok:
            st.roots[i] = res.root
            st.condition[i] = res.condition
        else:
            st.root_failures += 1
    sync_mm_roots(st, mm_dtype)


def sync_mm_roots(st: BlockState, mm_dtype: torch.dtype | None) -> None:
    """(Re)make the low-precision copies of the roots used by ``precondition`` (none when None)."""
    st.mm_roots = [] if mm_dtype is None else [None if r is None else r.to(mm_dtype) for r in st.roots]


def precondition(st: BlockState, m: Tensor, dtype: torch.dtype) -> Tensor:
    """D_sh = M ×_1 R_1 … ×_k R_k (identity for a root never refreshed), in ``m``'s dtype."""
    roots = st.mm_roots if st.mm_roots else st.roots
    x = m.to(next((r.dtype for r in roots if r is not None), dtype))
    if x.dim() == 1:
        out = roots[0] @ x if roots[0] is not None else x.clone()
    elif x.dim() == 2:
        out = roots[0] @ x if roots[0] is not None else x
        out = out @ roots[1] if roots[1] is not None else out
        out = out if out is not x else x.clone()
    else:  # contract each mode in turn; after k steps the modes are back in order
        out = x
        for i, r in enumerate(roots):
            eye = r if r is not None else torch.eye(x.shape[i], dtype=x.dtype, device=x.device)
            out = torch.tensordot(out, eye.to(x.dtype), dims=([0], [0]))
    return out.to(m.dtype)
