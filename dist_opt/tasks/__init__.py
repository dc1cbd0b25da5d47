"""Tasks: the built-in ones, your own by import path (``task.name: module:attribute``, see
:mod:`dist_opt.tasks.registry`) and :class:`~dist_opt.tasks.dataset.DatasetTask` for a
``torch.utils.data.Dataset``.

Tasks are imported lazily, so scikit-learn (the ``tasks`` extra) is only needed for ``digits``.
The small helpers here (seed derivation, RNG-free model construction, moving a batch to the
model's device, an eval-mode forward pass) are shared by the tasks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from dist_opt.tasks.base import Batch, Task
from dist_opt.tasks.registry import (
    TASKS,
    TaskNameError,
    build_task,
    check_task,
    configure_loader,
    resolve_task,
)

__all__ = [
    "TASKS",
    "Batch",
    "Task",
    "TaskNameError",
    "build_task",
    "check_indices",
    "check_task",
    "configure_loader",
    "cross_entropy_sums",
    "default_init_",
    "derive_seed",
    "eval_forward",
    "new_generator",
    "on_meta",
    "resolve_task",
    "to_model_device",
]


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
    """Construct a module on the CPU without changing the global RNG (its state is saved and restored
    around ``build``). The caller must initialise every parameter and buffer: the values ``build``
    leaves are not part of the contract.

    (Building under ``torch.device("meta")`` would skip the default initialisation, but meta-device
    ``nn.init`` calls import ``torch._dynamo``: more than a second of CPU in every process. The
    built-in tasks' models are small, so initialising them twice costs less.)"""
    with torch.random.fork_rng(devices=[]):
        return build()


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if type(obj) in (list, tuple):
        return type(obj)(_to(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def to_model_device(batch: Batch, model: nn.Module) -> tuple[Any, ...]:
    """Move the tensors of ``batch`` (also inside lists, tuples and dicts) to the device of ``model``'s
    first parameter (no-op on CPU); returns a tuple of the batch's elements."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return tuple(batch)
    return tuple(_to(t, device) for t in batch)


@torch.no_grad()
def eval_forward(model: nn.Module, batch: Batch) -> tuple[Any, Any]:
    """(model output, target) for ``batch`` = (inputs..., target): ``model(*inputs)`` on the model's
    device with the model in eval mode; its train/eval mode is restored afterwards."""
    *inputs, target = to_model_device(batch, model)
    was_training = model.training
    model.eval()
    try:
        return model(*inputs), target
    finally:
        model.train(was_training)


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


def __getattr__(name: str) -> Any:
    """``dist_opt.tasks.DatasetTask``, imported on first use (it imports this module's helpers)."""
    if name == "DatasetTask":
        from dist_opt.tasks.dataset import DatasetTask

        return DatasetTask
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
