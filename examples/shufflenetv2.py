"""ShuffleNetV2 (0.5x), CIFAR style. Its forward does shape arithmetic that
torch.fx's symbolic tracing refuses (``int(x.size(1) * self.ratio)`` to split
the channels); NeuroFlux traces it with the input shape known instead. The
units still carry the module names below. Fashion-MNIST padded to 32x32.
"""

import torch
import torch.nn.functional as F
from torch import nn
from zoo import fmnist

INPUT_SHAPE = (1, 32, 32)
NUM_CLASSES = 10


def channel_shuffle(x, groups: int):
    n, c, h, w = x.size()
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class SplitBlock(nn.Module):
    """Stride-1 block: half the channels pass through, half are transformed."""

    def __init__(self, channels: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.ratio = ratio
        c = channels - int(channels * ratio)
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        keep = int(x.size(1) * self.ratio)  # shape arithmetic: symbolic tracing cannot int() a proxy
        x1, x2 = x[:, :keep], x[:, keep:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, widths=(48, 96, 192), blocks=(3, 7, 3),
                 last: int = 1024) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        stages, cin = [], 24
        for w, n in zip(widths, blocks):
            stages.append(nn.Sequential(DownBlock(cin, w), *[SplitBlock(w) for _ in range(n)]))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.head = nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU())
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x):
        x = self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(x.size(0), -1))


def model():
    return ShuffleNetV2(in_channels=1, num_classes=NUM_CLASSES)


def datasets():
    return fmnist(pad_to=32)
