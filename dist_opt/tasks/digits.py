"""``digits``: an MLP on scikit-learn's bundled 8x8 handwritten digits (no download).

Data: 1797 images, features scaled to [0, 1] (pixel / 16). The train/test split is fixed
(independent of ``run.seed``): a permutation from seed 0, stratified by class, 1437 train / 360
test. ``task.label_noise`` = p replaces ``round(p * 1437)`` training labels, chosen from the run
seed, by a uniformly random *different* class, so exactly that fraction of labels is wrong.

Model: 64 -> hidden -> hidden -> 10, ReLU; with ``task.batchnorm`` a BatchNorm1d follows each
hidden Linear (modules ``fc1``, ``bn1``, ``fc2``, ``bn2``, ``out``).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from dist_opt.config.schema import TaskConfig
from dist_opt.tasks import (
    check_indices,
    cross_entropy_sums,
    default_init_,
    eval_forward,
    new_generator,
    on_meta,
    to_model_device,
)
from dist_opt.tasks.base import Batch, Task

N_TEST = 360
N_CLASSES = 10
N_FEATURES = 64
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def load_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): float32 features in [0, 1], int64 labels; cached per process."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("task.name=digits needs scikit-learn: pip install 'dist-opt[tasks]'") from e
    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    test = stratified_test_indices(y, N_TEST, SPLIT_SEED)
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[test] = True
    train = (~is_test).nonzero().squeeze(1)
    test = test.sort().values
    return x[train].contiguous(), y[train].contiguous(), x[test].contiguous(), y[test].contiguous()


def stratified_test_indices(y: torch.Tensor, n_test: int, seed: int) -> torch.Tensor:
    """``n_test`` indices whose class proportions follow those of ``y`` (to within one sample per class).

    Samples are shuffled with ``seed``; the k-th shuffled sample of a class of size n gets the key
    (k + 0.5) / n, and the ``n_test`` smallest keys form the test set."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    keys = torch.empty(len(y), dtype=torch.float64)
    for c in y.unique().tolist():
        members = perm[y[perm] == c]
        keys[members] = (torch.arange(len(members), dtype=torch.float64) + 0.5) / len(members)
    order = torch.sort(keys[perm], stable=True).indices
    return perm[order[:n_test]]


def noisy_labels(y: torch.Tensor, fraction: float, seed: int, classes: int = N_CLASSES) -> torch.Tensor:
    """A copy of ``y`` with ``round(fraction * len(y))`` labels (chosen from ``seed``) changed to a
    uniformly random other class."""
    n_flip = round(fraction * len(y))
    out = y.clone()
    if n_flip == 0:
        return out
    g = new_generator(seed, "digits.label_noise")
    which = torch.randperm(len(y), generator=g)[:n_flip]
    shift = torch.randint(1, classes, (n_flip,), generator=g)
    out[which] = (y[which] + shift) % classes
    return out


class DigitsMLP(nn.Module):
    """64 -> hidden -> hidden -> 10 with ReLU; optional BatchNorm1d after each hidden Linear."""

    def __init__(self, hidden: int, batchnorm: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(N_FEATURES, hidden)
        self.bn1 = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.fc2 = nn.Linear(hidden, hidden)
        self.bn2 = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.out = nn.Linear(hidden, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.out(x)


class DigitsTask(Task):
    """MLP classification of the 8x8 digits; one sample = (64 features, label)."""

    name = "digits"
    tokens_per_sample = 1
    has_accuracy = True

    def __init__(self, cfg: TaskConfig, seed: int) -> None:
        self.cfg = cfg
        self.seed = int(seed)
        self.x_train, y_train, self.x_test, self.y_test = load_split()
        self.y_train_clean = y_train
        self.y_train = noisy_labels(y_train, cfg.label_noise, self.seed)

    def build_model(self) -> nn.Module:
        model = on_meta(lambda: DigitsMLP(self.cfg.hidden, self.cfg.batchnorm))
        return default_init_(model, new_generator(self.seed, "digits.model"))

    @property
    def train_size(self) -> int:
        return len(self.y_train)

    @property
    def eval_size(self) -> int:
        return len(self.y_test)

    def train_batch(self, indices: torch.Tensor) -> Batch:
        idx = check_indices(indices, self.train_size, "digits train")
        return self.x_train[idx], self.y_train[idx]

    def eval_batch(self, indices: torch.Tensor) -> Batch:
        idx = check_indices(indices, self.eval_size, "digits eval")
        return self.x_test[idx], self.y_test[idx]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = to_model_device(batch, model)
        return F.cross_entropy(model(x).float(), y)

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """Per-sample cross-entropy summed, sample count, correct argmax predictions (model in eval mode)."""
        return cross_entropy_sums(*eval_forward(model, batch))
