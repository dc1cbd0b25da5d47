"""Step time of data-parallel training: DDP vs dist-opt ZeRO-1 / ZeRO-2 (pure math).

With Ψ parameters, ``p = nodes × ranks_per_node`` ranks and global batch ``B``::

    compute = t_sample · B / p                      (forward + backward of this rank's samples)
    ddp     : grad all-reduce(Ψ·grad_bytes)            update u·Ψ
    zero1   : grad all-reduce(Ψ·grad_bytes)            update u·Ψ/p   + param all-gather(Ψ·param_bytes)
    zero2   : grad reduce-scatter(Ψ·grad_bytes)        update u·Ψ/p   + param all-gather(Ψ·param_bytes)
    step    = compute + (1 - overlap)·grad_comm + update + param_comm

``u`` is the measured per-parameter update cost (seconds per parameter updated); ``overlap`` the
share of the gradient collective hidden behind backward (0: none, the conservative default).
dist-opt's ZeRO-1 reduces the whole gradient (each rank then updates its 1/p), its ZeRO-2
reduce-scatters it; both all-gather the updated parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_opt.plan.collectives import collective
from dist_opt.plan.fabric import CostModel

MODES = ("ddp", "zero1", "zero2")


@dataclass(frozen=True)
class Workload:
    """What a step does, per sample and per parameter: ``params`` (Ψ), ``sample_s`` (forward +
    backward seconds per sample on one rank), ``update_s_per_param`` (u), bytes per gradient
    element reduced and per parameter gathered."""

    params: int
    sample_s: float
    update_s_per_param: float
    grad_bytes: float = 4.0
    param_bytes: float = 4.0


@dataclass(frozen=True)
class StepTime:
    """One predicted step (seconds); ``exposed_comm_s`` is the communication not hidden by compute."""

    compute_s: float
    grad_comm_s: float
    param_comm_s: float
    update_s: float
    overlap: float = 0.0

    @property
    def exposed_comm_s(self) -> float:
        return (1.0 - self.overlap) * self.grad_comm_s + self.param_comm_s

    @property
    def total_s(self) -> float:
        return self.compute_s + self.exposed_comm_s + self.update_s

    @property
    def comm_share(self) -> float:
        """Exposed communication / step time."""
        return self.exposed_comm_s / self.total_s if self.total_s > 0 else 0.0


def layout(gpus: int, gpus_per_node: int) -> tuple[int, int]:
    """``(nodes, ranks_per_node)`` for ``gpus`` ranks packed onto nodes of ``gpus_per_node``."""
    if gpus < 1 or gpus_per_node < 1:
        raise ValueError(f"gpus={gpus}, gpus_per_node={gpus_per_node}: expected >= 1")
    if gpus <= gpus_per_node:
        return 1, gpus
    if gpus % gpus_per_node:
        raise ValueError(f"gpus={gpus} is not a multiple of gpus_per_node={gpus_per_node}")
    return gpus // gpus_per_node, gpus_per_node


def step_time(mode: str, work: Workload, batch: float, gpus: int, cm: CostModel) -> StepTime:
    """Predicted step of ``mode`` ("ddp", "zero1", "zero2") at global ``batch`` on ``gpus`` ranks."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    nodes, g = layout(gpus, cm.gpus_per_node)
    intra, inter = cm.intra_link(), cm.inter_link(g)

    def comm(op: str, nbytes: float) -> float:
        return collective(op, nbytes, nodes, g, intra, inter, cm.algorithm)

    grad_bytes = work.params * work.grad_bytes
    grad_op = "reduce_scatter" if mode == "zero2" else "all_reduce"
    sharded = mode != "ddp"
    return StepTime(
        compute_s=work.sample_s * batch / gpus,
        grad_comm_s=comm(grad_op, grad_bytes),
        param_comm_s=comm("all_gather", work.params * work.param_bytes) if sharded else 0.0,
        update_s=work.update_s_per_param * work.params / (gpus if sharded else 1),
        overlap=cm.overlap,
    )
