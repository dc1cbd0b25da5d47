"""Config -> ShardedOptimizer (native engine), or the engine named by ``distributed.engine``."""

from __future__ import annotations

from typing import Any

from torch import nn

from dist_opt.config.schema import Config, OptimizerConfig
from dist_opt.engine.precision import DTYPES, loss_scaler
from dist_opt.engine.sharded import ShardedOptimizer
from dist_opt.optim.base import Rule
from dist_opt.optim.registry import build_rule, rule_spec


def rule_hyper(o: OptimizerConfig) -> dict[str, Any]:
    """The optimizer.* values the chosen optimizer's rule reads: exactly the keys it declares."""
    return {k: getattr(o, k, None) for k in rule_spec(o.name).keys}


def rule_from_config(o: OptimizerConfig) -> Rule:
    """The update rule ``optimizer.*`` describes (engines other than the native one use this)."""
    return build_rule(o.name, **rule_hyper(o))


def build_optimizer(
    model: nn.Module, cfg: Config, lr: float, track_local_grad_norm: bool = False
) -> ShardedOptimizer:
    o = cfg.optimizer
    opt = ShardedOptimizer(
        model.named_parameters(),
        o.name,
        lr=lr,
        weight_decay=o.weight_decay,
        zero_stage=cfg.distributed.zero_stage,
        bucket_mb=cfg.distributed.bucket_mb,
        max_grad_norm=o.max_grad_norm,
        exclude_from_weight_decay=o.exclude_from_weight_decay,
        exclude_from_trust_ratio=o.exclude_from_trust_ratio,
        lr_multipliers=o.lr_multipliers,
        track_local_grad_norm=track_local_grad_norm,
        reduce_dtype=DTYPES[cfg.precision.reduce],
        loss_scale=loss_scaler(cfg.precision),
        overlap_param_gather=cfg.distributed.overlap_param_gather,
        **rule_hyper(o),
    )
    if cfg.distributed.overlap_param_gather:
        # whoever reads the model's state (checkpoints, final weights) sees the finished gather
        model.register_state_dict_pre_hook(lambda *_: opt.wait_params())  # type: ignore[no-untyped-call]
    return opt


def build_engine(
    cfg: Config, model: nn.Module, lr: float, track_local_grad_norm: bool = False
) -> tuple[nn.Module, Any]:
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
