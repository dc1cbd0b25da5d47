"""Shampoo's first moment and graft direction of one block (see ``rule`` for the update).

m = β1·m + (1-β1)·G;  M = m/(1-β1^t)                     (no bias correction: M = m)
    nesterov: M = β1·m/(1-β1^(t+1)) + (1-β1)·G/(1-β1^t)   (NAdam with a constant β1)
D_graft = M / (√A + ε_g), A from G²: adam bias-corrected EMA, rmsprop EMA, adagrad sum;
          sgd / none: D_graft = M
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

GRAFTS = ("adam", "adagrad", "rmsprop", "sgd", "none")
STATEFUL_GRAFTS = ("adam", "rmsprop", "adagrad")  # keep a second moment A per block


def first_moment(
    momentum: Tensor | None, grad: Tensor, t: int, beta1: float, nesterov: bool, bias_correction: bool
) -> Tensor:
    """Update ``momentum`` in place (if β1 > 0) and return the filtered gradient M."""
    b1 = beta1
    if momentum is None:
        return grad
    momentum.lerp_(grad, 1.0 - b1)
    bc = bias_correction
    if nesterov:
        c_m = b1 / (1.0 - b1 ** (t + 1)) if bc else b1
        c_g = (1.0 - b1) / (1.0 - b1**t) if bc else 1.0 - b1
        return torch.add(momentum * c_m, grad, alpha=c_g)
    return momentum / (1.0 - b1**t) if bc else momentum


def graft_direction(
    method: str,
    a: Tensor | None,
    grad: Tensor,
    m: Tensor,
    t: int,
    beta2: float,
    eps: float,
    bias_correction: bool,
) -> Tensor:
    """Update the graft state ``a`` in place and return the graft method's direction D_graft."""
    if a is None:  # sgd / none: the (filtered) gradient itself
        return m
    if method == "adagrad":
        a.addcmul_(grad, grad)
        denom = a.sqrt()
    else:
        b2 = beta2
        a.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
        denom = a.sqrt()
        if method == "adam" and bias_correction:
            denom.div_(math.sqrt(1.0 - b2**t))
    return m / denom.add_(eps)
