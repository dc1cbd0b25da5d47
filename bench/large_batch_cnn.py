"""A small ResNet with BatchNorm on the built-in 8x8 digits, as a user task (``task.name=bench.large_batch_cnn:make_task``).

The data, split and evaluation are those of :class:`dist_opt.tasks.digits.DigitsTask`; only the
model differs: the 64 features as a 1x8x8 image, a 3x3 stem convolution to ``width`` channels, two
pre-activation-free basic residual blocks (conv-BN-ReLU-conv-BN + identity, then ReLU; the second
at stride 2 with a 1x1 projection to ``2 * width``), global average pooling and a linear head.
``task.options.width`` sets the width (default 8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_opt.config.schema import TaskConfig
from dist_opt.tasks import new_generator, on_meta
from dist_opt.tasks.digits import N_CLASSES, DigitsTask


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the (projected when the shape changes) input, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.proj: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.proj = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.proj(x))


class DigitsResNet(nn.Module):
    """(N, 64) features -> (N, 10) logits through stem, two residual blocks, average pool, linear head."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block1 = BasicBlock(width, width, 1)
        self.block2 = BasicBlock(width, 2 * width, 2)
        self.head = nn.Linear(2 * width, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x.reshape(-1, 1, 8, 8))))
        x = self.block2(self.block1(x))
        return self.head(x.mean(dim=(2, 3)))


class DigitsResNetTask(DigitsTask):
    """The digits task with :class:`DigitsResNet` as its model."""

    name = "digits_resnet"

    def build_model(self) -> nn.Module:
        width = int(self.cfg.options.get("width", 8))
        return init_resnet_(
            on_meta(lambda: DigitsResNet(width)), new_generator(self.seed, "digits_resnet.model")
        )


@torch.no_grad()
def init_resnet_(model: nn.Module, g: torch.Generator) -> nn.Module:
    """He-normal convolutions (fan_out, ReLU), PyTorch's default Linear and BatchNorm init, all from ``g``."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            m.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=g)
        elif isinstance(m, nn.Linear):
            bound = m.in_features**-0.5
            m.weight.uniform_(-bound, bound, generator=g)
            m.bias.uniform_(-bound, bound, generator=g)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
    return model


def make_task(cfg: TaskConfig, seed: int) -> DigitsResNetTask:
    """Entry point for ``task.name=bench.large_batch_cnn:make_task``."""
    return DigitsResNetTask(cfg, seed)
