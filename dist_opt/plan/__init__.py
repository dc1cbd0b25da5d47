"""Planning a data-parallel run: α-β collective costs, step-time model, noise-scale batch planner.

The cost model (:mod:`~dist_opt.plan.collectives`, :mod:`~dist_opt.plan.fabric`,
:mod:`~dist_opt.plan.step_model`) is pure math and imports no torch; ``dist-opt plan``
(:mod:`~dist_opt.plan.cli`) applies it to a probe run's measurements.
"""

from dist_opt.plan.collectives import Link, collective, flat, ring, tree
from dist_opt.plan.fabric import (
    PRESETS,
    CostModel,
    CostModelError,
    Fabric,
    cost_model_from_dict,
    load_cost_model,
)
from dist_opt.plan.step_model import MODES, StepTime, Workload, layout, step_time

__all__ = [
    "MODES",
    "PRESETS",
    "CostModel",
    "CostModelError",
    "Fabric",
    "Link",
    "StepTime",
    "Workload",
    "collective",
    "cost_model_from_dict",
    "flat",
    "layout",
    "load_cost_model",
    "ring",
    "step_time",
    "tree",
]
