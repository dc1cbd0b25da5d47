"""``distributed.engine: deepspeed``: dist-opt's optimizers as DeepSpeed client optimizers.

``build_deepspeed`` generates a DeepSpeed config from the dist-opt config (:func:`deepspeed_config`),
hands a dist-opt optimizer to ``deepspeed.initialize`` and returns the user's module (unchanged:
same parameter names, so checkpoints and exports see the same model under every engine)
plus :class:`DeepSpeedOptimizer`, which presents the engine to the training loop with the native
optimizer's interface (``no_sync``, ``step`` -> applied?, ``zero_grad``, ``param_groups``,
``last_stats``, ``skipped_steps``, ``state_dict``).

* ZeRO stage 0: DeepSpeed all-reduces (averages) the gradients; the client optimizer
  (:class:`~dist_opt.integrations.pieces.ChunkedOptimizer`) updates only this rank's 1/N chunk of
  every layer, keeps only that chunk's state, and all-gathers the parameters. LARS/LAMB trust ratios
  stay exact per layer (partial norms + one all-reduce); Shampoo distributes its blocks itself.
  Clipping (``optimizer.max_grad_norm``) is done by the client optimizer, which therefore sees and
  reports the unclipped norm and skips non-finite steps (DeepSpeed reads its ``overflow`` flag).
* ZeRO stage 1/2: DeepSpeed's ZeRO optimizer partitions state (and at 2 gradients) as flat fp32
  partitions and calls the client (:class:`~dist_opt.integrations.pieces.LocalRuleOptimizer`) on
  them (``zero_allow_untested_optimizer``); DeepSpeed clips (``gradient_clipping``) and skips
  non-finite steps. Layer boundaries are gone there, so LARS/LAMB/Shampoo are refused.

The training loop calls ``loss.backward()`` on the plain module and ``opt.step()`` once per
optimizer step. DeepSpeed runs with ``managed_gradient_accumulation: false`` (its ``step()`` is
the accumulation boundary); forward hooks on the module do what ``DeepSpeedEngine.forward`` does
around the module call (scale each output's gradient by 1/gradient_accumulation_steps and, with a
ZeRO optimizer, start DeepSpeed's backward bookkeeping), which makes ``loss.backward()`` equivalent
to ``engine.backward(loss)``.

Checkpoints: the adapter exposes the engine optimizers' state API (``shard_specs``, ``sharded_state``,
``load_state_dict`` with ``offsets``, see :mod:`dist_opt.engine.state_api`): the client's chunks at
stage 0, DeepSpeed's partition fragments at stages 1/2 (:mod:`.zero_state`), so dist-opt's DCP
checkpoints (``checkpoint.*``, ``resume``) save, resume and reshard as with the native engine.
DeepSpeed's own ``opt.save_checkpoint`` / ``opt.load_checkpoint`` work too; ``opt.state_dict()`` at
stages 1/2 is DeepSpeed's ZeRO state of this rank (same world size only; loading is collective).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dist_opt.config.loader import ConfigError
from dist_opt.config.schema import Config
from dist_opt.engine.core import GroupOptions
from dist_opt.engine.state_codec import ShardSpec
from dist_opt.integrations.pieces import ChunkedOptimizer, LocalRuleOptimizer
from dist_opt.integrations.zero_state import ZeroPartitionState

#: keys dist-opt derives itself; the message says which dist-opt key to set instead
OWNED_KEYS = {
    "train_batch_size": "data.global_batch",
    "train_micro_batch_size_per_gpu": "data.micro_batch",
    "gradient_accumulation_steps": "data.global_batch / (data.micro_batch x world size)",
    "gradient_clipping": "optimizer.max_grad_norm",
    "optimizer": "optimizer.* (dist-opt's optimizer is DeepSpeed's client optimizer)",
    "scheduler": "schedule.* (dist-opt drives the learning rate)",
    "managed_gradient_accumulation": "nothing (dist-opt's loop owns the accumulation boundary)",
}
SKIPPED_KEY = "dist_opt_skipped_steps"  # our counter, kept next to DeepSpeed's ZeRO state
UNSUPPORTED_SECTIONS = {
    "fp16": "mixed precision through DeepSpeed (dist-opt's client optimizers step fp32 parameters)",
    "bf16": "mixed precision through DeepSpeed (dist-opt's client optimizers step fp32 parameters)",
}


def check_deepspeed_config(cfg: Config) -> list[str]:
    """Problems of a deepspeed-engine config, without importing deepspeed."""
    from dist_opt.optim.spec import rule_spec

    problems = []
    stage, name = cfg.distributed.zero_stage, cfg.optimizer.name
    spec = rule_spec(name)
    if stage > 0 and not spec.elementwise:  # only an elementwise rule can update a flat partition
        what = (
            "per-layer trust ratios"
            if spec.trust_ratio
            else "whole-parameter preconditioner blocks"
            if spec.whole_tensors
            else "a non-elementwise update"
        )
        problems.append(
            f"optimizer.name: {name} is not supported with distributed.engine=deepspeed at "
            f"distributed.zero_stage={stage}: DeepSpeed's ZeRO-{stage} flattens all parameters of a group "
            f"into one partition per rank, so the client optimizer cannot see layers ({what}); use "
            "distributed.zero_stage=0 (DeepSpeed averages gradients, dist-opt shards the state with exact "
            "per-layer norms) or the native / fsdp2 engine"
        )
    extra = cfg.deepspeed.config
    for key, instead in OWNED_KEYS.items():
        if key in extra:
            problems.append(f"deepspeed.config.{key}: set by dist-opt; set {instead} instead")
    for key, what in UNSUPPORTED_SECTIONS.items():
        sec = extra.get(key)
        if isinstance(sec, dict) and sec.get("enabled", False):
            problems.append(f"deepspeed.config.{key}.enabled: {what} is not supported")
    zero = extra.get("zero_optimization", {})
    if not isinstance(zero, dict):
        problems.append("deepspeed.config.zero_optimization: expected a mapping")
    else:
        if "stage" in zero:
            problems.append(
                "deepspeed.config.zero_optimization.stage: set distributed.zero_stage instead "
                "(0, 1 or 2; for ZeRO-3 use distributed.engine=fsdp2)"
            )
        if zero.get("overlap_comm") and stage != 2:
            problems.append(
                "deepspeed.config.zero_optimization.overlap_comm: DeepSpeed supports it with "
                "dist-opt's loop (unmanaged gradient accumulation) only at distributed.zero_stage=2"
            )
        for key in ("offload_optimizer", "offload_param"):
            if key in zero:
                problems.append(
                    f"deepspeed.config.zero_optimization.{key}: offloading needs DeepSpeed's own "
                    "optimizers, not a client optimizer"
                )
    return problems


def deepspeed_config(cfg: Config, world: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``cfg`` on ``world`` ranks (``deepspeed.config`` keys merged in)."""
    problems = check_deepspeed_config(cfg) + cfg.check_world(world)
    if problems:
        raise ConfigError(problems)
    stage = cfg.distributed.zero_stage
    generated: dict[str, Any] = {
        "train_batch_size": cfg.data.global_batch,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch,
        "gradient_accumulation_steps": cfg.accumulation_steps(world),
        "managed_gradient_accumulation": False,
        "zero_optimization": {"stage": stage},
        # DeepSpeed clips at 1.0 unless told otherwise; at stage 0 the client optimizer clips
        "gradient_clipping": (cfg.optimizer.max_grad_norm or 0.0) if stage > 0 else 0.0,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if stage > 0:
        generated["zero_allow_untested_optimizer"] = True
        bucket = max(1, int(cfg.distributed.bucket_mb * 2**20 / 4))  # elements of fp32
        generated["zero_optimization"].update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    return _merge(generated, cfg.deepspeed.config)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _prepare_environment() -> None:
    """Before importing deepspeed: the CPU accelerator without a GPU, and LOCAL_RANK, which
    ``deepspeed.initialize`` insists on (set by torchrun/deepspeed launchers, not by srun)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "LOCAL_RANK" not in os.environ and "OMPI_COMM_WORLD_LOCAL_RANK" not in os.environ:
        from dist_opt.dist.env import detect

        env = detect(os.environ)
        os.environ["LOCAL_RANK"] = str(env.local_rank if env.is_launched else dist.get_rank())


def _skip_shm_kernel_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel (minutes of C++ on a
    first run) that only its tensor-parallel *inference* all-reduce uses; training never does. Mark
    it unavailable (DeepSpeed caches the dict in the module, so the edit holds); gloo does the rest."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_deepspeed(
    cfg: Config, model: nn.Module, lr: float, track_local_grad_norm: bool = False
) -> tuple[nn.Module, DeepSpeedOptimizer]:
    """``deepspeed.initialize`` with a dist-opt client optimizer; returns (model, optimizer adapter)."""
    from dist_opt.engine.build import rule_from_config

    world = dist.get_world_size()
    ds_cfg = deepspeed_config(cfg, world)
    _prepare_environment()
    try:
        import deepspeed
        from deepspeed.runtime.constants import MANAGED_GRADIENT_ACCUMULATION  # noqa: F401 (>= 0.19)
        from deepspeed.runtime.utils import register_output_backward_hooks  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            [f"distributed.engine: deepspeed needs deepspeed>=0.19 ({e}); pip install 'dist-opt[deepspeed]'"]
        ) from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    _skip_shm_kernel_build()
    o = cfg.optimizer
    rule = rule_from_config(o)
    groups = GroupOptions.from_config(o)
    stage = cfg.distributed.zero_stage
    if stage == 0:
        client: ChunkedOptimizer | LocalRuleOptimizer = ChunkedOptimizer(
            model.named_parameters(), rule, lr=lr, groups=groups, max_grad_norm=o.max_grad_norm
        )
    else:
        client = LocalRuleOptimizer(model.named_parameters(), rule, lr=lr, groups=groups)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=ds_cfg)
    opt = DeepSpeedOptimizer(
        engine,
        client,
        name=o.name,
        zero_stage=stage,
        accumulation=cfg.accumulation_steps(world),
        track_local_grad_norm=track_local_grad_norm and world > 1,
    )
    return model, opt


class DeepSpeedOptimizer:
    """A DeepSpeed engine behind the native optimizer's interface (see the module docstring)."""

    engine_name = "deepspeed"

    def __init__(
        self,
        engine: Any,
        client: ChunkedOptimizer | LocalRuleOptimizer,
        *,
        name: str,
        zero_stage: int,
        accumulation: int,
        track_local_grad_norm: bool = False,
    ):
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        self.engine, self.client, self.name = engine, client, name
        self.zero_stage, self.accumulation = zero_stage, accumulation
        self.track_local_grad_norm = track_local_grad_norm and zero_stage == 0
        self._skipped = 0
        self._partitions: ZeroPartitionState | None = None
        self.last_stats: dict[str, Any] = {}
        self._zero = isinstance(engine.optimizer, ZeROOptimizer)
        if self._zero and not engine._support_torch_style_backward:
            raise RuntimeError(
                "DeepSpeed cannot run loss.backward() at ZeRO-1/2 with this torch "
                "(it lacks the autograd APIs DeepSpeed counts gradients with)"
            )
        self._hooks = self._route_backward_through_engine(engine.module)

    def _route_backward_through_engine(self, module: nn.Module) -> list[Any]:
        """Forward hooks doing what ``DeepSpeedEngine.forward`` does around the module call."""
        from deepspeed.runtime.utils import register_output_backward_hooks

        engine, zero = self.engine, self._zero
        # stage 0: DeepSpeed's prologue only starts timers (and refuses loss.backward() because no ZeRO
        # optimizer would run the epilogue, which without managed accumulation does no communication)
        prologue = engine._backward_prologue if zero else (lambda: None)

        def before(_mod: nn.Module, _args: Any) -> None:
            if zero:
                engine.optimizer.clear_backward_seen_flag()

        def after(_mod: nn.Module, _args: Any, out: Any) -> None:
            if torch.is_grad_enabled():
                register_output_backward_hooks(
                    out,
                    preprocess_once_fn=prologue,
                    preprocess_per_tensor_fn=engine._backward_prologue_per_tensor,
                )

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    # -- the optimizer interface of the training loop -------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.client.param_groups

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Nothing to switch: DeepSpeed reduces at ``step()`` (ZeRO-2: every micro-step, into partitions)."""
        yield

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 (DeepSpeed's step() zeroes)
        return None

    @torch.no_grad()
    def step(self) -> bool:
        """DeepSpeed's step: reduce, (clip,) client step, zero gradients. Returns False if skipped."""
        stats: dict[str, Any] = {}
        local_sq = self._local_grad_sq() if self.track_local_grad_norm else None
        t0 = time.perf_counter()
        self.engine.step()
        stats["time/engine_step_ms"] = 1e3 * (time.perf_counter() - t0)
        applied = bool(self.engine.was_step_applied())
        if self.zero_stage == 0:
            stats.update(self._chunked().last_stats)
        else:
            norm = self.engine.get_global_grad_norm()
            stats["grad_norm"] = float(norm) if norm is not None and applied else float("nan")
        if local_sq is not None and applied and "grad_norm" in stats:
            stats["local_grad_sq"] = local_sq
            stats["local_micro_steps"] = self.accumulation
            stats["global_grad_sq"] = stats["grad_norm"] ** 2
        if not applied and self.zero_stage > 0:
            self._skipped += 1
        stats["skipped"] = int(not applied)
        self.last_stats = stats
        return applied

    def _local_grad_sq(self) -> float:
        """Mean over ranks of this rank's ||local mean gradient||² (before DeepSpeed's all-reduce)."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        vec = torch.zeros(1, dtype=torch.float64)
        if grads:
            vec[0] = torch.stack(torch._foreach_norm(grads)).double().square().sum()
        dist.all_reduce(vec)
        return float(vec[0]) / dist.get_world_size()

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Stage 0: the full gathered state (native format, any world size; collective).
        Stages 1/2: DeepSpeed's ZeRO optimizer state of this rank (same world size only)."""
        if self.zero_stage == 0:
            return self.client.state_dict()
        return {**self.engine.optimizer.state_dict(), SKIPPED_KEY: self._skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (collective; stages 1/2: every rank's partition state is
        exchanged first, as DeepSpeed's loader wants), or pieces with ``offsets`` (the state API)."""
        if self.zero_stage == 0:
            self.client.load_state_dict(state_dict)
            return
        if "offsets" in state_dict:  # pieces by global offset (the state API's format, any world size)
            self._state_api().load_state_dict(state_dict)
            self._skipped = int(state_dict.get("skipped_steps", 0))
            return
        self._skipped = int(state_dict.get(SKIPPED_KEY, 0))
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, {k: v for k, v in state_dict.items() if k != SKIPPED_KEY})
        self.engine.optimizer.load_state_dict(
            everyone, load_optimizer_states=True, load_from_fp32_weights=True
        )

    def shard_state_dict(self) -> dict[str, Any]:  # stage 0 only: this rank's chunks (native format)
        return self._chunked().shard_state_dict()

    # -- the state API (dist-opt's DCP checkpoints): the client's chunks at stage 0, DeepSpeed's
    # partition fragments at stages 1/2 (``zero_state``) ------------------------------------------
    def _chunked(self) -> ChunkedOptimizer:
        if not isinstance(self.client, ChunkedOptimizer):
            raise AttributeError(
                "at DeepSpeed ZeRO-1/2 the optimizer state lives in DeepSpeed's flat partitions"
            )
        return self.client

    def _state_api(self) -> ChunkedOptimizer | ZeroPartitionState:
        if self.zero_stage == 0:
            return self._chunked()
        if self._partitions is None:
            assert isinstance(self.client, LocalRuleOptimizer)
            self._partitions = ZeroPartitionState(self.engine.optimizer, self.client, self.engine.module)
        return self._partitions

    def shard_specs(self) -> list[ShardSpec]:  # this rank's piece of every parameter's state
        return self._state_api().shard_specs()

    def sharded_state(self) -> dict[str, dict[str, torch.Tensor]]:  # {param: {key: valid piece}}
        return self._state_api().sharded_state()

    def load_sharded_state(self, state: dict[str, Any], offsets: dict[str, int] | None = None) -> None:
        """Stage 0: load pieces of the state (``PieceOptimizer.load_sharded_state``)."""
        self._chunked().load_sharded_state(state, offsets)

    @property
    def rule(self) -> Any:
        return self.client.rule

    @property
    def skipped_steps(self) -> int:
        return self._chunked().skipped_steps if self.zero_stage == 0 else self._skipped

    @property
    def applied_steps(self) -> int:
        return self.client.applied_steps

    def save_checkpoint(
        self, save_dir: str, tag: str | None = None, client_state: dict[str, Any] | None = None
    ) -> None:
        """DeepSpeed's own checkpoint (module, optimizer, ``client_state``); call on every rank."""
        self.engine.save_checkpoint(save_dir, tag=tag, client_state=client_state or {})

    def load_checkpoint(self, load_dir: str, tag: str | None = None) -> dict[str, Any]:
        """Load :meth:`save_checkpoint`'s output; returns its ``client_state``."""
        path, client_state = self.engine.load_checkpoint(
            load_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {load_dir} (tag {tag})")
        return client_state or {}
