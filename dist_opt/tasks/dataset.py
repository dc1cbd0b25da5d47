"""``DatasetTask``: train your own model on your own map-style ``torch.utils.data.Dataset``.

    task = DatasetTask(lambda: MyNet(), train_set, eval_set)

Samples: ``dataset[i]`` is a tuple ``(input, target)`` (or ``(input_1, ..., input_k, target)``);
torch's default collate stacks them into a batch, whose last element is the target and whose other
elements are passed to the model: ``output = model(*inputs)``. Pass ``collate_fn`` (a list of samples
-> such a batch) for anything else, e.g. padding. ``dataset[i]`` must depend on ``i`` only - no
shuffling or random augmentation that is not seeded from ``i`` - because the trainer decides which
indices make up each step's global batch (the same at any world size and accumulation), and a
resumed run continues from that alone.

Model: ``model_fn()`` -> ``nn.Module``, built on the CPU (the trainer moves it). Every rank calls
it, so it must give the same weights everywhere: :meth:`DatasetTask.build_model` runs it with
torch's global CPU RNG seeded from the task seed (``seed``, else the run seed handed over by
:meth:`~DatasetTask.configure_loader`, else 0) and restores the RNG afterwards. Seeding inside
``model_fn`` works as well.

Loss: ``loss_fn(output, target)`` -> the mean loss over the batch (a scalar with grad; any
``torch.nn`` criterion such as ``nn.MSELoss()`` fits). Default: cross-entropy of class scores
against integer class targets, averaged over every predicted position: a (N, C) output against
(N,) targets, a (N, T, C) output against (N, T) (language modelling: N*T rows) or, as torch lays it
out, a (N, C, H, W) output against (N, H, W).
Evaluation sums: ``metrics_fn(output, target)`` -> ``{"loss_sum", "count"[, "correct"]}`` summed
over the batch. Default: summed cross-entropy, number of positions and correct argmax predictions
with the default loss; ``loss_fn(output, target) * N`` and N with a custom loss. ``has_accuracy`` says
whether ``correct`` is meaningful (default: only with the default loss and metrics).

Reading: :meth:`DatasetTask.train_batches` reads through a ``torch.utils.data.DataLoader`` whose
batch sampler is the given index stream, with the ``data.num_workers``, ``data.pin_memory``,
``data.prefetch_factor`` and ``data.persistent_workers`` settings passed to
:meth:`DatasetTask.configure_loader` (defaults: no workers). Workers are seeded from the run seed
(torch, ``random`` and numpy), so a run is reproducible. :meth:`DatasetTask.train_batch` reads in
the calling process. Without ``eval_data``, ``eval_size`` is 0.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, default_collate

from dist_opt.tasks import check_indices, cross_entropy_sums, derive_seed, eval_forward, to_model_device
from dist_opt.tasks.base import Batch, Task
from dist_opt.tasks.samples import SampleReader, check_dataset, check_sample, passthrough, unwrap

LossFn = Callable[[Any, Any], torch.Tensor]
MetricsFn = Callable[[Any, Any], dict[str, float]]


class _IndexFeed:
    """The DataLoader's batch sampler: a pass reads the index stream (lists of ints) set last. The
    stream is a one-shot iterator, so the repeated ``iter()`` calls of a DataLoader pass share it."""

    def __init__(self) -> None:
        self.source: Iterator[list[int]] = iter(())

    def __iter__(self) -> Iterator[list[int]]:
        return self.source


def _seed_worker(worker_id: int) -> None:
    """DataLoader worker init: torch is already seeded (loader generator + worker id); seed
    ``random`` and numpy from it too."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return
    np.random.seed(seed)


def _check_batch(batch: Batch) -> None:
    """TypeError unless ``batch`` is a tuple (inputs..., target)."""
    if not isinstance(batch, tuple | list) or len(batch) < 2:
        raise TypeError(
            f"DatasetTask: a batch must be a tuple (inputs..., target), got a {type(batch).__name__} "
            "(check collate_fn)"
        )


def _rows(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class scores (rows, C) and targets (rows,). An output of more than 2 dims holds its classes in
    the last dim when the target's shape is the output's without it ((N, T, C) vs (N, T)), else in
    dim 1 as torch's cross-entropy expects ((N, C, H, W) vs (N, H, W))."""
    if output.dim() > 2:
        if tuple(target.shape) != tuple(output.shape[:-1]):
            output = output.movedim(1, -1)
        return output.reshape(-1, output.shape[-1]), target.reshape(-1)
    return output, target


class DatasetTask(Task):
    """A :class:`Task` over map-style datasets and a model factory (see the module docstring)."""

    name = "dataset"

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        train_data: Any,
        eval_data: Any = None,
        loss_fn: LossFn | None = None,
        metrics_fn: MetricsFn | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        tokens_per_sample: int = 1,
        *,
        seed: int | None = None,
        has_accuracy: bool | None = None,
    ) -> None:
        if not callable(model_fn) or isinstance(model_fn, nn.Module):
            raise TypeError(
                "DatasetTask: model_fn must be a function returning a new nn.Module (e.g. lambda: MyNet())"
            )
        self.model_fn, self.loss_fn, self.metrics_fn = model_fn, loss_fn, metrics_fn
        self.tokens_per_sample = int(tokens_per_sample)
        self.has_accuracy = (
            (loss_fn is None and metrics_fn is None) if has_accuracy is None else bool(has_accuracy)
        )
        self._seed = seed
        self._run_seed: int | None = None
        self._train_size = check_dataset(train_data, "train")
        self._eval_size = 0 if eval_data is None else check_dataset(eval_data, "eval")
        if collate_fn is None:
            first = train_data[0]
            check_sample(first, 0, "train")
            if eval_data is not None:
                check_sample(eval_data[0], 0, "eval", like=first)
        collate = default_collate if collate_fn is None else collate_fn
        self._train = SampleReader(train_data, collate, "train")
        self._eval = None if eval_data is None else SampleReader(eval_data, collate, "eval")
        self._loader_options: dict[str, Any] = {"num_workers": 0, "pin_memory": False}
        self._feed = _IndexFeed()
        self._loader: DataLoader | None = None

    # -- settings from the run --------------------------------------------------------------------
    @property
    def seed(self) -> int:
        """The seed of the model init and of the loader workers (see the module docstring)."""
        for s in (self._seed, self._run_seed):
            if s is not None:
                return int(s)
        return 0

    def configure_loader(self, data: Any, seed: int | None = None) -> None:
        """Take the DataLoader settings from ``data`` (the ``data`` config section: ``num_workers``,
        ``pin_memory``, ``prefetch_factor``, ``persistent_workers``) and the run seed. Call it before
        :meth:`build_model` and :meth:`train_batches` (the trainer does, through
        ``dist_opt.tasks.configure_loader``)."""
        workers = int(getattr(data, "num_workers", 0))
        options: dict[str, Any] = {
            "num_workers": workers,
            "pin_memory": bool(getattr(data, "pin_memory", False)) and torch.cuda.is_available(),
        }
        if workers > 0:
            prefetch = getattr(data, "prefetch_factor", None)
            if prefetch is not None:
                options["prefetch_factor"] = int(prefetch)
            options["persistent_workers"] = bool(getattr(data, "persistent_workers", False))
        self._loader_options = options
        self._run_seed = None if seed is None else int(seed)
        self._loader = None

    # -- the Task contract ------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed(self.seed, "dataset.model"))
            model = self.model_fn()
        if not isinstance(model, nn.Module):
            raise TypeError(f"DatasetTask: model_fn returned a {type(model).__name__}, not an nn.Module")
        return model

    @property
    def train_size(self) -> int:
        return self._train_size

    @property
    def eval_size(self) -> int:
        return self._eval_size

    def train_batch(self, indices: torch.Tensor) -> Batch:
        """The collated training samples ``indices``, read in this process."""
        return self._train.read(check_indices(indices, self.train_size, "train").tolist())

    def eval_batch(self, indices: torch.Tensor) -> Batch:
        idx = check_indices(indices, self.eval_size, "eval")
        if self._eval is None or not idx.numel():
            raise IndexError("DatasetTask: no eval samples to read (eval_data is None or indices are empty)")
        return self._eval.read(idx.tolist())

    def train_batches(self, index_batches: Iterable[torch.Tensor]) -> Iterator[Batch]:
        """One collated batch per index tensor of ``index_batches``, in order, read by the DataLoader
        (see :meth:`configure_loader`). With workers, batches are read ahead of the consumer; with
        ``persistent_workers`` the workers are reused by the next call, which ends this stream."""
        self._feed.source = (check_indices(idx, self.train_size, "train").tolist() for idx in index_batches)
        return map(unwrap, iter(self._train_loader()))

    def _train_loader(self) -> DataLoader:
        if self._loader is None:
            workers = self._loader_options["num_workers"] > 0
            self._loader = DataLoader(
                self._train,
                batch_sampler=self._feed,
                collate_fn=passthrough,
                generator=torch.Generator().manual_seed(derive_seed(self.seed, "dataset.loader")),
                worker_init_fn=_seed_worker if workers else None,
                **self._loader_options,
            )
        return self._loader

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        _check_batch(batch)
        *inputs, target = to_model_device(batch, model)
        output = model(*inputs)
        if self.loss_fn is not None:
            return self.loss_fn(output, target)
        return F.cross_entropy(*_rows(output.float(), target))

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """Sums over the batch (see the module docstring), the model in eval mode."""
        _check_batch(batch)
        output, target = eval_forward(model, batch)
        if self.metrics_fn is not None:
            return {k: float(v) for k, v in self.metrics_fn(output, target).items()}
        if self.loss_fn is None:
            return cross_entropy_sums(*_rows(output, target))
        n = len(target)
        return {"loss_sum": float(self.loss_fn(output, target)) * n, "count": float(n)}
