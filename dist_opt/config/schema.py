"""The config schema: every key a user may set, its type, default and meaning.

Names here are a contract (CLI overrides, checkpoints, tracking and other features rely on
them). Every model forbids unknown keys so a typo is an error, not a silently ignored key.
"""

from __future__ import annotations

import math
import signal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Unit = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Beta = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class RunConfig(Section):
    out_dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/ and exports go here."""
    seed: NonNegInt = 0
    """Seed of model init, data order and every rank's RNG."""


class TaskConfig(Section):
    name: Literal["stdlib_lm", "digits", "synthetic"] = "digits"
    """Built-in task: stdlib_lm (byte-level GPT on Python's stdlib source), digits (MLP on sklearn's 8x8 digits), synthetic (teacher-student stream)."""
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

    @model_validator(mode="after")
    def _heads_divide(self) -> TaskConfig:
        if self.name == "stdlib_lm" and self.d_model % self.n_heads:
            raise ValueError(f"task.d_model={self.d_model} must be divisible by task.n_heads={self.n_heads}")
        return self


class DataConfig(Section):
    global_batch: PosInt = 64
    """Samples per optimizer step over all ranks and micro-steps (B = micro_batch x accumulation x world)."""
    micro_batch: PosInt = 32
    """Samples per rank per forward/backward."""


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


def _default_exclude() -> list[str]:
    """The engine's default exclusion patterns (imported when needed: the engine imports the config)."""
    from dist_opt.engine.core import DEFAULT_EXCLUDE

    return list(DEFAULT_EXCLUDE)


class OptimizerConfig(Section):
    name: Literal[
        "sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "lars", "lamb", "shampoo"
    ] = "adamw"
    """Optimizer. Defaults of every hyper-parameter come from its paper / torch.optim."""
    lr: PosFloat = 1e-3
    """Base learning rate (before schedule and scale rule)."""
    weight_decay: NonNegFloat = 0.0
    """L2 (sgd family, adagrad, rmsprop, adam, lars) or decoupled (adamw, lamb, shampoo) weight decay."""
    momentum: Beta | None = None
    """Momentum: momentum/nesterov default 0.9, lars default 0.9, rmsprop default 0."""
    dampening: Unit = 0.0
    """SGD dampening (torch.optim.SGD)."""
    betas: tuple[Beta, Beta] | None = None
    """(beta1, beta2): adam/adamw/lamb (0.9, 0.999); shampoo (0.9, 1.0) where beta2 = 1 means AdaGrad-style sums."""
    eps: PosFloat | None = None
    """Epsilon: adam/adamw/rmsprop 1e-8, adagrad 1e-10, lamb 1e-6, shampoo 1e-12."""
    alpha: Beta = 0.99
    """RMSProp smoothing constant."""
    centered: bool = False
    """RMSProp: centered variant."""
    lr_decay: NonNegFloat = 0.0
    """Adagrad lr decay."""
    initial_accumulator_value: NonNegFloat = 0.0
    """Adagrad initial accumulator."""
    amsgrad: bool = False
    """Adam/AdamW: AMSGrad."""
    bias_correction: bool = True
    """Adam-type bias correction (Kingma & Ba). Turning it off is only an option."""
    trust_coefficient: PosFloat = 0.001
    """LARS trust coefficient eta."""
    lars_denominator: Literal["paper", "tf"] = "paper"
    """LARS trust-ratio denominator: paper ||g|| + wd||p||, tf ||g + wd p|| (MLPerf reference)."""
    trust_clip: tuple[NonNegFloat, PosFloat] | None = None
    """LAMB: clamp phi(||p||) to [low, high], e.g. [0, 10]. None: phi(z) = z."""
    exclude_from_weight_decay: list[str] = Field(default_factory=_default_exclude)
    """Name substrings/regexes of parameters without weight decay (1-D parameters are always excluded for lars/lamb)."""
    exclude_from_trust_ratio: list[str] = Field(default_factory=_default_exclude)
    """Name patterns of parameters whose trust ratio is 1 (lars/lamb); 1-D parameters are always excluded."""
    lr_multipliers: dict[str, PosFloat] = Field(default_factory=dict)
    """Per-group lr multipliers: {name regex: multiplier}; the first matching pattern wins."""
    max_grad_norm: PosFloat | None = None
    """Global gradient-norm clipping on the reduced gradient over all shards (None: off)."""
    # shampoo
    max_preconditioner_dim: PosInt = 1024
    """Shampoo: split dims larger than this into blocks; merge small dims up to it."""
    precondition_frequency: PosInt = 20
    """Shampoo: recompute root inverses every k steps."""
    start_preconditioning_step: PosInt = 1
    """Shampoo: use the graft step before this step."""
    exponent_override: PosFloat | None = None
    """Shampoo: root exponent override (default 1/(2k) for order-k blocks)."""
    grafting: Literal["adam", "adagrad", "rmsprop", "sgd", "none"] = "adam"
    """Shampoo: grafting method (per-block norm of the graft step)."""
    grafting_beta2: Unit = 0.999
    """Shampoo: beta2 of the graft method."""
    grafting_eps: PosFloat = 1e-8
    """Shampoo: epsilon of the graft method."""
    preconditioner_dtype: Literal["float32", "float64"] = "float32"
    """Shampoo: dtype of statistics and root inverses."""
    nesterov: bool = False
    """Shampoo: Nesterov form of the betas[0] gradient average (NAdam-style; Shampoo ignores optimizer.momentum)."""


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

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              use_attribute_docstrings=True)


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
    """Estimate the gradient noise scale B_simple (SPEC 8) when world size > 1."""
    noise_scale_ema: Annotated[float, Field(ge=0, lt=1)] = 0.95
    """EMA factor of the B_simple numerator and denominator."""


class DeepSpeedConfig(Section):
    config: dict = Field(default_factory=dict)
    """Extra DeepSpeed JSON keys merged into the generated config."""


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=100))
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    swa: SWAConfig = Field(default_factory=SWAConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    resume: str = "none"
    """none, latest, or a path to a checkpoint step folder."""

    def check_world(self, world_size: int) -> list[str]:
        """Problems that depend on the world size (global batch divisibility)."""
        d = self.data
        per_step = d.micro_batch * world_size
        if d.global_batch % per_step:
            return [
                f"data.global_batch: {d.global_batch} is not divisible by data.micro_batch x world size "
                f"= {d.micro_batch} x {world_size} = {per_step}"
            ]
        return []

    def accumulation_steps(self, world_size: int) -> int:
        return self.data.global_batch // (self.data.micro_batch * world_size)


def is_finite(x: float) -> bool:
    return math.isfinite(x)
