"""The config schema: every key a user may set, its type, default and meaning.

Names here are a contract (CLI overrides, checkpoints, tracking and other features rely on
them). Every model forbids unknown keys so a typo is an error, not a silently ignored key.
"""

from __future__ import annotations

import math
import os
import re
import signal
from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from dist_opt.config.optimizer import OptimizerConfig
from dist_opt.config.precision import PrecisionConfig
from dist_opt.config.types import MAX_SEED, NonNegFloat, NonNegInt, PosFloat, PosInt, Section, Unit


class RunConfig(Section):
    out_dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/ and exports go here."""
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0
    """Seed of model init, data order and every rank's RNG (0 to 2**53 - 1)."""


BUILTIN_TASKS = ("stdlib_lm", "digits", "synthetic")
"""Names of the built-in tasks (their implementations: ``dist_opt.tasks.TASKS``)."""
TASK_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
"""``package.module:attribute`` (the attribute may be dotted: ``module:Outer.build``)."""


class TaskConfig(Section):
    name: str = "digits"
    """Built-in task: stdlib_lm (byte-level GPT on Python's stdlib source), digits (MLP on sklearn's 8x8 digits), synthetic (teacher-student stream); or your own as an import path 'package.module:attribute' naming a Task subclass or a function returning a Task (called with (task_config, seed))."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Free mapping for your own task (task.name = module:attribute), read as task_config.options; built-in tasks ignore it."""
    # stdlib_lm
    seq_len: PosInt = 64
    """stdlib_lm: tokens (bytes) per sample."""
    d_model: PosInt = 64
    """stdlib_lm: transformer width."""
    n_layers: PosInt = 2
    """stdlib_lm: transformer blocks."""
    n_heads: PosInt = 4
    """stdlib_lm: attention heads (must divide d_model)."""
    max_files: PosInt = 200
    """stdlib_lm: number of stdlib .py files used as corpus (sorted by path, split by file)."""
    # digits
    hidden: PosInt = 64
    """digits/synthetic: hidden width of the MLP."""
    batchnorm: bool = False
    """digits: insert BatchNorm1d after the hidden layer (breaks cross-world-size exactness; SWA uses it)."""
    label_noise: Unit = 0.0
    """digits: fraction of training labels replaced by a random label (deterministic from run.seed)."""
    # synthetic
    kind: Literal["regression", "classification"] = "classification"
    """synthetic: teacher-student regression or classification."""
    dim: PosInt = 32
    """synthetic: input dimension."""
    classes: PosInt = 10
    """synthetic: number of classes (classification)."""
    noise: NonNegFloat = 0.1
    """synthetic: label noise (std for regression, temperature-like for classification)."""
    condition_number: Annotated[float, Field(ge=1, allow_inf_nan=False)] = 1.0
    """synthetic: condition number of the input covariance (rotated, log-spaced spectrum)."""
    eval_size: PosInt = 2048
    """synthetic: size of the held-out eval set."""

    @field_validator("name")
    @classmethod
    def _task_name(cls, name: str) -> str:
        if name in BUILTIN_TASKS or TASK_IMPORT_PATH.fullmatch(name):
            return name
        raise PydanticCustomError(
            "task_name",
            "Input should be a built-in task ({names}) or an import path 'package.module:attribute'",
            {"names": ", ".join(BUILTIN_TASKS)},
        )

    @model_validator(mode="after")
    def _heads_divide(self) -> TaskConfig:
        if self.name == "stdlib_lm" and self.d_model % self.n_heads:
            raise ValueError(f"task.d_model={self.d_model} must be divisible by task.n_heads={self.n_heads}")
        return self


class ModelConfig(Section):
    broadcast_buffers: bool = True
    """Copy rank 0's buffers (BatchNorm running statistics...) to every rank after each step, like DDP's broadcast_buffers, so every rank holds the same model."""
    sync_batchnorm: bool = False
    """Convert BatchNorm layers to torch.nn.SyncBatchNorm (batch statistics over all ranks' micro-batches; CUDA only)."""


class DataConfig(Section):
    global_batch: PosInt = 64
    """Samples per optimizer step over all ranks and micro-steps (B = micro_batch x accumulation x world)."""
    micro_batch: PosInt = 32
    """Samples per rank per forward/backward."""
    num_workers: NonNegInt = 0
    """DataLoader worker processes per rank for tasks that read through a DataLoader (DatasetTask; built-in tasks ignore the data loader keys). 0: read in the training process."""
    pin_memory: bool = False
    """DataLoader: copy batches into page-locked memory (faster host-to-GPU copies; only when CUDA is available)."""
    prefetch_factor: PosInt | None = None
    """DataLoader: batches each worker loads ahead (None: torch's default, 2; needs data.num_workers > 0)."""
    persistent_workers: bool = False
    """DataLoader: keep the worker processes alive between passes over the data (needs data.num_workers > 0)."""

    @model_validator(mode="after")
    def _loader_needs_workers(self) -> DataConfig:
        if self.num_workers == 0:
            for key in ("prefetch_factor", "persistent_workers"):
                if getattr(self, key):
                    raise ValueError(f"data.{key} needs data.num_workers > 0")
        return self


class TrainConfig(Section):
    steps: PosInt | None = None
    """Optimizer steps to run (if both steps and epochs are set, steps wins)."""
    epochs: PosInt | None = None
    """Epochs to run (needs a finite dataset)."""
    eval_every: NonNegInt = 0
    """Evaluate every k optimizer steps (0: only at the end)."""
    eval_max_samples: PosInt | None = 4096
    """Evaluate on at most this many held-out samples (the first ones; None: all)."""
    log_every: PosInt = 1
    """Write a metrics.jsonl line every k steps."""
    progress: bool = True
    """Show a tqdm progress bar on rank 0."""
    max_consecutive_skips: PosInt = 20
    """Stop the run after this many consecutive non-finite (skipped) steps."""
    preemption_signals: list[str] = Field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that make every rank stop at the next step boundary, save a checkpoint and exit with code 4 (SIGINT always does). SLURM: SIGUSR1 with --signal=USR1@120."""

    @field_validator("preemption_signals")
    @classmethod
    def _signal_names(cls, names: list[str]) -> list[str]:
        out = []
        for name in names:
            text = name.strip().upper()
            text = text if text.startswith("SIG") else "SIG" + text
            if text in ("SIGKILL", "SIGSTOP") or text not in signal.Signals.__members__:
                raise ValueError(f"{name!r} is not a catchable signal name (e.g. SIGTERM, SIGUSR1)")
            out.append(text)
        return out

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.steps is None and self.epochs is None:
            raise ValueError("train: set train.steps or train.epochs")
        return self


class ScheduleConfig(Section):
    name: Literal[
        "constant", "step", "multistep", "plateau", "noam", "cosine", "cosine_restarts", "polynomial"
    ] = "constant"
    """LR schedule (composable with schedule.warmup_steps)."""
    warmup_steps: NonNegInt = 0
    """Linear warmup steps (composes with any schedule)."""
    warmup_start_factor: Unit = 0.0
    """LR factor at the start of warmup."""
    step_size: PosInt = 1
    """step: decay every k epochs (or steps if schedule.per_step)."""
    milestones: list[PosInt] = Field(default_factory=list)
    """multistep: epochs (or steps) at which lr is multiplied by gamma."""
    gamma: PosFloat = 0.1
    """step/multistep/plateau decay factor."""
    per_step: bool = False
    """step/multistep: count steps instead of epochs."""
    patience: NonNegInt = 10
    """plateau: evaluations without improvement before decay."""
    threshold: NonNegFloat = 1e-4
    """plateau: relative improvement threshold."""
    min_lr: NonNegFloat = 0.0
    """plateau/cosine/polynomial: floor of the lr."""
    d_model: PosInt | None = None
    """noam: model width d (lr = base * d^-0.5 * min(t^-0.5, t * warmup^-1.5)); None: no d factor."""
    T_0: PosInt = 100
    """cosine_restarts: steps of the first cycle (cosine: total steps if None)."""
    T_mult: PosInt = 1
    """cosine_restarts: cycle length multiplier."""
    power: PosFloat = 2.0
    """polynomial: decay power (2 for LARS/MLPerf)."""
    scale_rule: Literal["none", "linear", "sqrt"] = "none"
    """Large-batch lr scaling against schedule.reference_batch (Goyal et al. linear, or sqrt)."""
    reference_batch: PosInt = 256
    """Batch size at which optimizer.lr was tuned (for scale_rule)."""


class DistributedConfig(Section):
    nproc: PosInt = 2
    """Local ranks to start when no launcher environment is present."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend: auto = nccl when CUDA is available, else gloo."""
    timeout_s: PosFloat = 300.0
    """Timeout of every collective and of the rendezvous."""
    zero_stage: Literal[0, 1, 2] = 0
    """0 all-reduce + replicated state; 1 all-reduce + sharded state; 2 reduce-scatter + sharded state."""
    bucket_mb: PosFloat = 25.0
    """Gradient communication bucket size in MB (overlapped with backward)."""
    overlap_param_gather: bool = False
    """native engine, zero_stage 1/2: the parameter all-gather after each step returns at once and the next forward waits per bucket, only for the parameters of the module about to run (results are bitwise the same)."""
    engine: Literal["native", "deepspeed", "fsdp2"] = "native"
    """Training engine: dist-opt's own, DeepSpeed, or PyTorch FSDP2."""


class SWAConfig(Section):
    enabled: bool = False
    """Stochastic weight averaging on the optimizer shards."""
    kind: Literal["swa", "ema"] = "swa"
    """Equal-weight average (swa) or exponential moving average (ema)."""
    start_epoch: NonNegInt = 0
    """First epoch (0-based) whose end is averaged."""
    every_epochs: PosInt = 1
    """Average at the end of every k epochs."""
    lr: PosFloat | None = None
    """Constant SWA lr reached by annealing (None: keep the schedule)."""
    anneal_epochs: NonNegInt = 0
    """Epochs of annealing to swa.lr."""
    anneal_strategy: Literal["linear", "cos"] = "cos"
    """Annealing shape (torch.optim.swa_utils.SWALR)."""
    ema_decay: Annotated[float, Field(gt=0, lt=1)] = 0.999
    """EMA decay d in w_ema = d w_ema + (1-d) w."""
    update_bn: bool = True
    """Refresh BatchNorm statistics of the averaged weights before evaluation."""


class CheckpointConfig(Section):
    every_steps: NonNegInt = 0
    """Save every k steps (0: off)."""
    every_epochs: NonNegInt = 0
    """Save at the end of every k epochs (0: off)."""
    keep: PosInt = 3
    """Keep the last k complete checkpoints."""
    async_save: bool = Field(default=False, alias="async")
    """Save in the background while training continues (key: checkpoint.async)."""
    at_end: bool = True
    """Save a checkpoint when the run ends (early stops — preemption, non-finite storm — always save)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, populate_by_name=True, use_attribute_docstrings=True
    )


class WandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    """W&B mode (WANDB_MODE still overrides)."""
    project: str = "dist-opt"
    """W&B project."""
    entity: str | None = None
    """W&B entity."""
    group: str | None = None
    """W&B group."""
    name: str | None = None
    """W&B run name."""
    tags: list[str] = Field(default_factory=list)
    """W&B tags."""
    dir: str | None = None
    """W&B directory (default: the run directory)."""


class TrackingConfig(Section):
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    """Weights & Biases settings."""
    noise_scale: bool = True
    """Estimate the gradient noise scale B_simple (McCandlish et al. 2018) when world size > 1."""
    noise_scale_ema: Annotated[float, Field(ge=0, lt=1)] = 0.95
    """EMA factor of the B_simple numerator and denominator."""
    noise_scale_micro: bool = False
    """World size 1 with gradient accumulation: estimate B_simple from the micro-batches instead (one extra gradient copy per micro-step; native engine, ZeRO stage 0/1)."""


class DeepSpeedConfig(Section):
    config: dict = Field(default_factory=dict)
    """Extra DeepSpeed JSON keys merged into the generated config."""


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=100))
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    swa: SWAConfig = Field(default_factory=SWAConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    """Mixed precision: compute, parameter and gradient-reduction dtypes, fp16 loss scaling."""
    resume: str = "none"
    """none (start fresh), latest (newest complete checkpoint; refuse if all are corrupt), latest_or_new (newest, else start fresh), auto (resume a complete checkpoint of this run, else start fresh), or a path to a step, checkpoints or run folder."""

    def check_world(self, world_size: int) -> list[str]:
        """Problems that depend on the world size (global batch divisibility)."""
        d = self.data
        per_step = d.micro_batch * world_size
        index_bytes = 8 * d.global_batch  # the sampler materialises one int64 index per sample of a step
        mem = _physical_memory()
        if mem and index_bytes > mem // 4:
            return [
                f"data.global_batch: {d.global_batch} samples per step need {index_bytes / 2**30:.3g} GiB "
                f"of batch indices alone, more than a quarter of this machine's {mem / 2**30:.3g} GiB"
            ]
        if d.global_batch % per_step:
            return [
                f"data.global_batch: {d.global_batch} is not divisible by data.micro_batch x world size "
                f"= {d.micro_batch} x {world_size} = {per_step}"
            ]
        return []

    def accumulation_steps(self, world_size: int) -> int:
        return self.data.global_batch // (self.data.micro_batch * world_size)


def _physical_memory() -> int:
    """Bytes of physical memory, 0 when unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def is_finite(x: float) -> bool:
    return math.isfinite(x)
