"""A small CNN for 28x28 Fashion-MNIST: the default demo.

Four conv layers (BN, ReLU, max-pool after the 2nd and 4th) and a linear
classifier on global-average-pooled features. Uses functional ops
(``F.relu``, ``torch.flatten``) on purpose: the planner must handle them.
"""

import torch
import torch.nn.functional as F
from torch import nn

from zoo import fmnist

INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.conv4 = nn.Conv2d(128, 128, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(128)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.max_pool2d(F.relu(self.bn4(self.conv4(x))), 2)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def model() -> nn.Module:
    return SmallCNN()


def datasets():
    return fmnist()
