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
    the resulting mixed-dtype model, those fp32 parameters being their own masters.

    The model's floating-point inputs are cast to the same dtype by a forward pre-hook on the root
    module (as FSDP2's ``cast_forward_inputs`` does): CPU autocast leaves e.g. LayerNorm's input
    alone, and a bf16 LayerNorm cannot take an fp32 input."""
    dtype = DTYPES[p.params]
    if dtype == torch.float32:
        return model
    for module in model.modules():
        if isinstance(module, _NormBase):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
    model.register_forward_pre_hook(_InputCast(dtype), with_kwargs=True)
    return model


class _InputCast:
    """Forward pre-hook: floating-point tensors among the arguments (nested in lists, tuples and
    dicts) are cast to ``dtype``; everything else passes unchanged."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def _cast(self, x: object) -> object:
        if isinstance(x, torch.Tensor):
            return x.to(self.dtype) if x.is_floating_point() and x.dtype != self.dtype else x
        if isinstance(x, list | tuple):
            return type(x)(self._cast(v) for v in x)
        if isinstance(x, dict):
            return {k: self._cast(v) for k, v in x.items()}
        return x

    def __call__(
        self, module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]
    ) -> tuple[tuple[object, ...], dict[str, object]]:
        return tuple(self._cast(a) for a in args), {k: self._cast(v) for k, v in kwargs.items()}


def loss_scaler(p: PrecisionConfig) -> LossScaler | None:
    """The loss scaler of fp16 compute (None for fp32 / bf16 compute)."""
    if p.compute != "fp16":
        return None
    static = None if p.loss_scale == "dynamic" else float(p.loss_scale)
    return LossScaler(static, growth_interval=p.growth_interval)
