"""A small classifier on synthetic data (before.py: plain PyTorch; after.py: the same with dist-opt)."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_data(n: int = 2048) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 20, generator=g)
    y = (x[:, :5].argmax(dim=1) + (x[:, 5] > 1).long()) % 5
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 5))


def main() -> None:
    torch.manual_seed(0)
    train = make_data()
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    loader = DataLoader(train, batch_size=64, shuffle=True, drop_last=True)
    for _epoch in range(5):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.save(model.state_dict(), "model.pt")


if __name__ == "__main__":
    main()
