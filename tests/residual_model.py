"""A small residual CNN (BatchNorm, identity and projection shortcuts) on
synthetic 1x16x16 data: ResNet's unit shapes at a size whose profiling on
fake tensors (mixed precision cannot use meta ones) takes seconds."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

INPUT_SHAPE = (1, 16, 16)
NUM_CLASSES = 4
TRAIN, VAL = 512, 128


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = Block(16, 16, 1)
        self.layer2 = Block(16, 32, 2)
        self.layer3 = Block(32, 32, 1)
        self.fc = nn.Linear(32, NUM_CLASSES)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def model():
    return Residual()


def datasets():
    g = torch.Generator().manual_seed(7)
    y = torch.randint(0, NUM_CLASSES, (TRAIN + VAL,), generator=g)
    x = torch.randn(TRAIN + VAL, *INPUT_SHAPE, generator=g) * 0.5
    x[:, 0, :4, :4] += y.view(-1, 1, 1).float()
    return TensorDataset(x[:TRAIN], y[:TRAIN]), TensorDataset(x[TRAIN:], y[TRAIN:])
