"""Config -> ShardedOptimizer (native engine), or the engine named by ``distributed.engine``."""

from __future__ import annotations

from typing import Any

from torch import nn

from dist_opt.config.schema import Config
from dist_opt.engine.sharded import ShardedOptimizer

RULE_KEYS = ("momentum", "dampening", "betas", "eps", "alpha", "centered", "lr_decay", "initial_accumulator_value",
             "amsgrad", "bias_correction", "trust_coefficient", "lars_denominator", "trust_clip",
             "max_preconditioner_dim", "precondition_frequency", "start_preconditioning_step", "exponent_override",
             "grafting", "grafting_beta2", "grafting_eps", "preconditioner_dtype", "nesterov")


def build_optimizer(model: nn.Module, cfg: Config, lr: float, track_local_grad_norm: bool = False) -> ShardedOptimizer:
    o = cfg.optimizer
    hyper = {k: getattr(o, k) for k in RULE_KEYS}
    return ShardedOptimizer(
        model.named_parameters(), o.name, lr=lr, weight_decay=o.weight_decay,
        zero_stage=cfg.distributed.zero_stage, bucket_mb=cfg.distributed.bucket_mb,
        max_grad_norm=o.max_grad_norm, exclude_from_weight_decay=o.exclude_from_weight_decay,
        exclude_from_trust_ratio=o.exclude_from_trust_ratio, lr_multipliers=o.lr_multipliers,
        track_local_grad_norm=track_local_grad_norm, **hyper,
    )


def build_engine(cfg: Config, model: nn.Module, lr: float,
                 track_local_grad_norm: bool = False) -> tuple[nn.Module, Any]:
    """(model, optimizer) for ``distributed.engine``: native -> (model, ShardedOptimizer); deepspeed /
    fsdp2 -> the model (fsdp2: ``fully_shard``-ed in place) and an adapter with the same interface
    (``no_sync``, ``step`` -> applied, ``zero_grad``, ``param_groups``, ``last_stats``, ``skipped_steps``,
    ``state_dict``)."""
    engine = cfg.distributed.engine
    if engine == "native":
        return model, build_optimizer(model, cfg, lr, track_local_grad_norm=track_local_grad_norm)
    if engine == "deepspeed":
        from dist_opt.integrations.deepspeed import build_deepspeed

        return build_deepspeed(cfg, model, lr, track_local_grad_norm=track_local_grad_norm)
    if engine == "fsdp2":
        from dist_opt.integrations.fsdp2 import build_fsdp2

        return build_fsdp2(cfg, model, lr, track_local_grad_norm=track_local_grad_norm)
    raise ValueError(f"distributed.engine: unknown engine {engine!r}")
