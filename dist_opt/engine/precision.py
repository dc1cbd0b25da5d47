"""``precision.*`` config -> dtypes, the autocast context, the loss scaler and the model cast.

What the trainer and the engine builder need from the ``precision`` section, in one place:
``compute`` is the autocast dtype of forward and loss (fp32: no autocast), ``params`` the working
dtype of the model's floating parameters, ``reduce`` the dtype of gradient accumulation and
reduction, ``loss_scale`` / ``growth_interval`` the fp16 loss scale.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from dist_opt.engine.loss_scale import LossScaler

if TYPE_CHECKING:
    from dist_opt.config.precision import PrecisionConfig

__all__ = ["DTYPES", "autocast", "cast_params", "loss_scaler"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(p: PrecisionConfig, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast(device.type, compute dtype)``, or a no-op for fp32 compute."""
    if p.compute == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[p.compute])


@torch.no_grad()
def cast_params(model: nn.Module, p: PrecisionConfig) -> nn.Module:
    """Cast the model's floating *parameters* to ``precision.params``. Buffers keep their dtype, and
    so do the affine parameters of BatchNorm-like layers (their fp32 running statistics and a bf16
    weight cannot meet in one CPU kernel; bf16 inputs with fp32 parameters can): the engine accepts
    the resulting mixed-dtype model, those fp32 parameters being their own masters."""
    dtype = DTYPES[p.params]
    if dtype == torch.float32:
        return model
    for module in model.modules():
        if isinstance(module, _NormBase):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
    return model


def loss_scaler(p: PrecisionConfig) -> LossScaler | None:
    """The loss scaler of fp16 compute (None for fp32 / bf16 compute)."""
    if p.compute != "fp16":
        return None
    static = None if p.loss_scale == "dynamic" else float(p.loss_scale)
    return LossScaler(static, growth_interval=p.growth_interval)
