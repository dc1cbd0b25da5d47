"""A small classifier on synthetic data (before.py: plain PyTorch; after.py: the same with dist-opt)."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

import dist_opt


def make_data(n: int = 2048) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 20, generator=g)
    y = (x[:, :5].argmax(dim=1) + (x[:, 5] > 1).long()) % 5
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 5))


def main() -> None:
    train = make_data()
    task = dist_opt.DatasetTask(make_model, train)
    config = {"optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01}, "train": {"epochs": 5}}
    dist_opt.fit(config, task)  # the trained weights: runs/default/final_params.pt


if __name__ == "__main__":
    main()
