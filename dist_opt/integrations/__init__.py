"""dist-opt's optimizers inside other engines: DeepSpeed (``deepspeed``) and PyTorch FSDP2 (``fsdp2``).

Which optimizer runs where, and why (details in ``deepspeed`` and ``fsdp2``):

* native, zero stage 0/1/2: every optimizer; LARS/LAMB with exact per-layer trust ratios.
* deepspeed, zero stage 0: every optimizer. DeepSpeed all-reduces the gradients; dist-opt's client
  optimizer keeps and updates 1/N of every layer's state and all-gathers the parameters, so
  LARS/LAMB trust ratios stay exact (partial norms, one all-reduce); Shampoo's blocks are owned by
  ranks as in the native engine. dist-opt's own checkpoints work (the native state layout).
* deepspeed, zero stage 1/2: elementwise optimizers only (sgd, momentum, nesterov, adagrad,
  rmsprop, adam, adamw) via ``zero_allow_untested_optimizer``. DeepSpeed's ZeRO flattens each
  param group into one partition per rank, so the client optimizer never sees a layer: LARS/LAMB
  (per-layer norms) and Shampoo (per-parameter blocks) are refused. dist-opt's checkpoints work: the
  state of DeepSpeed's partitions is saved per parameter fragment in the native layout (``zero_state``).
* fsdp2 (always ZeRO-3): every optimizer but Shampoo, on the local DTensor shards; LARS/LAMB norms
  exact (partial sums over shards, one all-reduce). Shampoo is refused: its blocks span the dim-0
  shards of several ranks. dist-opt's checkpoints work (the sharded parameters under the native keys
  and full shapes, the state per dim-0 row range).
* checkpoints of every engine resume exactly, reshard to other world sizes and export
  (``dist-opt export``): all use the native engine's keys and shapes.
* SWA needs the native engine.
* precision: every engine runs ``precision.compute: bf16`` (the trainer's autocast; parameters,
  gradients and state stay fp32). bf16 parameters with fp32 masters, bf16 gradient reduction and
  fp16 loss scaling are the native engine's; with deepspeed / fsdp2 they are refused (DeepSpeed's
  ``bf16``/``fp16`` modes and FSDP2's ``MixedPrecisionPolicy`` would replace dist-opt's client
  optimizer's parameter handling and are not mapped).

This module holds the config checks that need no engine import (run before any process starts)
and the helpers the training loop uses whatever the engine.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dist_opt.config.schema import Config
from dist_opt.optim.spec import rule_spec


def check_engine(cfg: Config, world: int | None = None) -> list[str]:
    """Problems of the engine / optimizer / zero-stage / feature combination (one line each)."""
    engine = cfg.distributed.engine
    if engine == "native":
        return [f"deepspeed.config: set but distributed.engine is {engine}"] if cfg.deepspeed.config else []
    return check_engine_combination(cfg, world) + _features(cfg)


def _features(cfg: Config) -> list[str]:
    """Loop features that need the native engine (precision modes, SWA)."""
    engine, stage = cfg.distributed.engine, cfg.distributed.zero_stage
    where = f"distributed.engine={engine}" + (
        f" at distributed.zero_stage={stage}" if engine == "deepspeed" else ""
    )
    problems = _precision(cfg, where)
    if cfg.swa.enabled:
        problems.append(
            f"swa.enabled: SWA averages the native engine's parameter shards; not available with {where}"
        )
    if cfg.distributed.overlap_param_gather:
        problems.append(
            f"distributed.overlap_param_gather: a native-engine feature; not available with {where}"
        )
    return problems


def _precision(cfg: Config, where: str) -> list[str]:
    """``precision`` settings only the native engine implements."""
    p, problems = cfg.precision, []
    if p.params != "fp32":
        problems.append(
            f"precision.params: {p.params} parameters with fp32 master copies need distributed.engine=native; "
            f"with {where} keep precision.params=fp32 (precision.compute=bf16 autocast works everywhere)"
        )
    if p.reduce != "fp32":
        problems.append(
            f"precision.reduce: {p.reduce} gradient reduction needs distributed.engine=native, not {where}"
        )
    if p.compute == "fp16":
        problems.append(
            f"precision.compute: fp16 needs loss scaling, which only distributed.engine=native implements "
            f"(not {where}); use precision.compute=bf16"
        )
    return problems


def check_engine_combination(cfg: Config, world: int | None = None) -> list[str]:
    """Problems of the engine / optimizer / zero-stage / ``deepspeed.config`` combination."""
    engine, name, stage = cfg.distributed.engine, cfg.optimizer.name, cfg.distributed.zero_stage
    if engine == "deepspeed":
        from dist_opt.integrations.deepspeed import check_deepspeed_config

        return check_deepspeed_config(cfg)
    if engine == "fsdp2":
        problems = []
        if world == 1:
            # (FSDP2 on one rank also loses all but the last micro-step's gradient under accumulation)
            problems.append(
                "distributed.engine: fsdp2 shards parameters over ranks; with one rank there is "
                "nothing to shard: use distributed.engine=native"
            )
        if stage != 0:
            problems.append(
                f"distributed.zero_stage: {stage} does not apply to distributed.engine=fsdp2, which "
                "always shards parameters, gradients and optimizer state (ZeRO-3); leave it at 0"
            )
        if rule_spec(name).whole_tensors:
            problems.append(
                f"optimizer.name: {name} is not supported with distributed.engine=fsdp2: it works on whole "
                "parameters (e.g. Shampoo's preconditioner blocks), which span the dim-0 shards FSDP2 gives "
                "each rank, so every step would have to gather whole parameters and gradients; use engine "
                "native or deepspeed with distributed.zero_stage=0"
            )
        if cfg.deepspeed.config:
            problems.append("deepspeed.config: set but distributed.engine is fsdp2")
        return problems
    return [f"distributed.engine: unknown engine {engine!r}"]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state (CPU copies) on every rank. Collective under FSDP2: call on all ranks."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        out[k] = v.detach().cpu().clone()
    return out


def engine_name(opt: Any) -> str:
    """``native``, ``deepspeed`` or ``fsdp2``: which engine built ``opt``."""
    return getattr(opt, "engine_name", "native")
