"""Models, data and tasks as a user would write them (not built-ins), for tests/test_user_model.py.

They live in an importable module so that every rank (harness workers, torchrun ranks) can build
them from ``task.name: user_tasks:...`` (the tests directory is on the ranks' path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from dist_opt import DatasetTask, Task


def make_data(n: int, dim: int = 6, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(1234 + seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, classes, generator=g)
    return TensorDataset(x, (x @ w).argmax(dim=1))


class LNNet(nn.Module):
    """An MLP with LayerNorm and GroupNorm (normalisation that does not depend on the batch split)."""

    def __init__(self, dim: int = 6, hidden: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.ln = nn.LayerNorm(hidden)
        self.gn = nn.GroupNorm(3, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.gn(self.ln(self.inp(x)))))


class BNNet(nn.Module):
    def __init__(self, dim: int = 6, hidden: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.inp, self.bn, self.out = (
            nn.Linear(dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn(self.inp(x))))


class TiedNet(nn.Module):
    """An embedding whose weight is also the output projection, and a frozen layer."""

    def __init__(self, vocab: int = 5, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Linear(dim, vocab, bias=False)
        self.frozen = nn.Linear(dim, dim)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.frozen(x))
        return F.linear(h @ self.emb.weight.t() @ self.emb.weight, self.emb.weight)


class LNTask(Task):
    """A user Task subclass: ``task.name: user_tasks:LNTask``, sized by ``task.options``."""

    def __init__(self, cfg, seed: int) -> None:
        opts = dict(cfg.options)
        self.dim, self.classes = int(opts.get("dim", 6)), int(opts.get("classes", 3))
        self.seed = seed
        self.train, self.eval = (
            make_data(96, self.dim, self.classes, seed),
            make_data(32, self.dim, self.classes, 99),
        )

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            return LNNet(self.dim, 12, self.classes)

    @property
    def train_size(self) -> int:
        return len(self.train)

    @property
    def eval_size(self) -> int:
        return len(self.eval)

    def train_batch(self, indices):
        return self.train[indices.long()]

    def eval_batch(self, indices):
        return self.eval[indices.long()]

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def eval_sums(self, model, batch):
        x, y = batch
        logits = model(x)
        return {
            "loss_sum": float(F.cross_entropy(logits, y, reduction="sum")),
            "count": float(len(y)),
            "correct": float((logits.argmax(1) == y).sum()),
        }


def build_ln_task(cfg, seed: int) -> Task:
    """A factory returning a Task: ``task.name: user_tasks:build_ln_task``."""
    return LNTask(cfg, seed)


def bn_dataset_task() -> DatasetTask:
    return DatasetTask(BNNet, make_data(96), make_data(32, seed=5))


def ln_dataset_task() -> DatasetTask:
    return DatasetTask(LNNet, make_data(96), make_data(32, seed=5))


class NotATask:
    def __init__(self, *args) -> None:
        pass
