"""A ResNet-style CNN with BatchNorm on scikit-learn's 8x8 digits, trained with dist-opt.

Your own model and a plain ``torch.utils.data.Dataset`` through ``DatasetTask`` + ``fit``:
LARS with warmup, SWA over the last epochs (BatchNorm statistics refreshed for the average).

    python examples/cnn_digits.py                          # as many local ranks as distributed.nproc
    torchrun --nproc-per-node 2 examples/cnn_digits.py     # under a launcher
    python examples/cnn_digits.py train.epochs=3 distributed.nproc=1   # dotted overrides
"""

from __future__ import annotations

import sys

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import dist_opt


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch)
        self.conv2, self.bn2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class DigitsResNet(nn.Module):
    def __init__(self, ch: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU())
        self.blocks = nn.Sequential(ResBlock(ch), nn.MaxPool2d(2), ResBlock(ch))
        self.head = nn.Linear(ch, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def digits_datasets(test_size: int = 297) -> tuple[TensorDataset, TensorDataset]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = perm[:test_size], perm[test_size:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


CONFIG = {  # as one process: 98.0% held-out accuracy for the SWA average, 97.3% live, after 30 epochs
    "run": {"out_dir": "runs/cnn_digits"},
    "data": {"global_batch": 128, "micro_batch": 64},
    "train": {"epochs": 30, "eval_every": 50},
    "optimizer": {"name": "lars", "lr": 1.5, "weight_decay": 5e-4, "momentum": 0.9},
    "schedule": {"name": "cosine", "warmup_steps": 20},
    "swa": {"enabled": True, "start_epoch": 22, "lr": 0.5},
    "distributed": {"nproc": 2, "zero_stage": 1},
    "checkpoint": {"every_steps": 100},
}

if __name__ == "__main__":
    train_data, eval_data = digits_datasets()
    task = dist_opt.DatasetTask(DigitsResNet, train_data, eval_data)
    summary = dist_opt.fit(CONFIG, task, overrides=sys.argv[1:])
