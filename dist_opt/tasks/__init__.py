"""Built-in tasks and the registry that builds one from ``task.*`` config.

Tasks are imported lazily, so scikit-learn (the ``tasks`` extra) is only needed for ``digits``.
The small helpers here (seed derivation, RNG-free model construction, moving a batch to the
model's device) are shared by the built-in tasks.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from dist_opt.tasks.base import Batch, Task

if TYPE_CHECKING:
    from dist_opt.config.schema import TaskConfig

__all__ = [
    "TASKS", "Batch", "Task", "build_task", "check_indices", "cross_entropy_sums", "default_init_", "derive_seed",
    "new_generator", "on_meta", "to_model_device",
]

TASKS: dict[str, str] = {
    "stdlib_lm": "dist_opt.tasks.stdlib_lm:StdlibLMTask",
    "digits": "dist_opt.tasks.digits:DigitsTask",
    "synthetic": "dist_opt.tasks.synthetic:SyntheticTask",
}
"""Task name -> "module:class" of its implementation."""


def build_task(cfg: TaskConfig, seed: int) -> Task:
    """The task named ``cfg.name``, built from ``cfg`` and the run seed."""
    target = TASKS.get(cfg.name)
    if target is None:
        raise ValueError(f"task.name: unknown task {cfg.name!r} (choose from {', '.join(sorted(TASKS))})")
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(cfg, seed)


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed that is a pure function of ``seed`` and ``keys`` (stable across processes/machines)."""
    text = repr((int(seed),) + tuple(keys)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def new_generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(seed, *keys)`` (never the global RNG)."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, *keys))
    return g


M = TypeVar("M", bound=nn.Module)


def on_meta(build: Callable[[], M]) -> M:
    """Construct a module without touching the global RNG: build on the meta device, then allocate
    uninitialised CPU storage. The caller must initialise every parameter and buffer."""
    with torch.device("meta"):
        module = build()
    return module.to_empty(device="cpu")


def to_model_device(batch: Batch, model: nn.Module) -> tuple[torch.Tensor, ...]:
    """Move the tensors of ``batch`` to the device of ``model``'s first parameter (no-op on CPU)."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return tuple(batch)
    return tuple(t.to(device, non_blocking=True) for t in batch)


def check_indices(indices: torch.Tensor, size: int | None, what: str) -> torch.Tensor:
    """``indices`` as a 1-D int64 CPU tensor; IndexError if any lies outside [0, size)."""
    idx = torch.as_tensor(indices).reshape(-1)
    if idx.dtype != torch.int64:
        if idx.is_floating_point() or idx.dtype == torch.bool:
            raise TypeError(f"{what} indices must be integers, got {idx.dtype}")
        idx = idx.to(torch.int64)
    idx = idx.cpu()
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or (size is not None and hi >= size):
            bound = "unbounded" if size is None else str(size)
            raise IndexError(f"{what} index out of range: [{lo}, {hi}] not within [0, {bound})")
    return idx


@torch.no_grad()
def default_init_(model: nn.Module, g: torch.Generator) -> nn.Module:
    """PyTorch's default init drawn from ``g``: Linear weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in));
    norm layers weight 1, bias 0, fresh running statistics. Other modules with own state are an error."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            bound = m.in_features**-0.5
            m.weight.uniform_(-bound, bound, generator=g)
            if m.bias is not None:
                m.bias.uniform_(-bound, bound, generator=g)
        elif isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._NormBase)):
            m.reset_parameters()
        elif any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            raise TypeError(f"default_init_: no init rule for module {name!r} ({type(m).__name__})")
    return model


def cross_entropy_sums(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``loss_sum`` (summed cross-entropy), ``count`` and ``correct`` (argmax hits) over rows of
    ``logits`` (N, C) against integer ``targets`` (N,)."""
    logits = logits.float()
    loss_sum = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(dim=-1) == targets).sum()
    return {"loss_sum": float(loss_sum), "count": float(targets.numel()), "correct": float(correct)}
