"""The ``precision`` config section: mixed-precision training (schema only; imported by ``schema``).

Kept in its own module so that ``schema.py`` does not grow; ``dist_opt.config.schema.PrecisionConfig``
is the same class.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["PrecisionConfig"]


class PrecisionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    compute: Literal["fp32", "bf16", "fp16"] = "fp32"
    """dtype of forward and loss (torch.autocast on CPU and CUDA; fp32: no autocast)."""
    params: Literal["fp32", "bf16"] = "fp32"
    """Working dtype of the model's floating parameters (bf16: the optimizer keeps fp32 master copies of this rank's shard and runs the update on them; BatchNorm buffers stay fp32)."""
    reduce: Literal["fp32", "bf16"] = "fp32"
    """dtype gradients are accumulated in over micro-steps and reduced in (all-reduce / reduce-scatter)."""
    loss_scale: Literal["dynamic"] | Annotated[float, Field(gt=0, allow_inf_nan=False)] = "dynamic"
    """Loss scale with precision.compute fp16: dynamic (start at 2**16, halve on a non-finite gradient and skip the step, double after growth_interval clean steps) or a fixed positive number; ignored otherwise."""
    growth_interval: Annotated[int, Field(gt=0)] = 2000
    """Dynamic loss scale: clean (applied) steps before the scale is doubled."""

    @model_validator(mode="after")
    def _params_need_autocast(self) -> PrecisionConfig:
        if self.params == "bf16" and self.compute != "bf16":
            raise ValueError(
                "precision.params: bf16 needs precision.compute: bf16 (autocast casts fp32 inputs)"
            )
        return self
