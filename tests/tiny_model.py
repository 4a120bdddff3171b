"""A tiny 3-unit CNN on synthetic 1x16x16 data, for runtime tests.

Per-sample activation memory halves from unit to unit, so the greedy
strategy gives three blocks."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

INPUT_SHAPE = (1, 16, 16)
NUM_CLASSES = 4
TRAIN, VAL = 512, 128


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, NUM_CLASSES)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def model():
    return Tiny()


def datasets():
    g = torch.Generator().manual_seed(123)
    y = torch.randint(0, NUM_CLASSES, (TRAIN + VAL,), generator=g)
    x = torch.randn(TRAIN + VAL, *INPUT_SHAPE, generator=g) * 0.5
    x[:, 0, :4, :4] += y.view(-1, 1, 1).float()  # a learnable signal
    return TensorDataset(x[:TRAIN], y[:TRAIN]), TensorDataset(x[TRAIN:], y[TRAIN:])
