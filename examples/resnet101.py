"""ResNet-101 (bottleneck blocks, 33 of them), CIFAR-style stem (3x3 conv, no
max-pool): a deep network for the planner (``model_152`` gives ResNet-152,
50 blocks). Fashion-MNIST images are zero-padded from 28x28 to 32x32.
"""

from zoo import Bottleneck, ResNet, fmnist

INPUT_SHAPE = (1, 32, 32)
NUM_CLASSES = 10


def model():
    return ResNet(Bottleneck, [3, 4, 23, 3], in_channels=1, num_classes=NUM_CLASSES)


def model_152():
    return ResNet(Bottleneck, [3, 8, 36, 3], in_channels=1, num_classes=NUM_CLASSES)


def datasets():
    return fmnist(pad_to=32)
