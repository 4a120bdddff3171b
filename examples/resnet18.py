"""ResNet-18 (basic blocks), CIFAR-style stem (3x3 conv, no max-pool).

Fashion-MNIST images are zero-padded from 28x28 to 32x32. ``model_cifar`` /
``datasets_cifar`` give the 3x32x32 variant on synthetic data (throughput only).
"""

from zoo import BasicBlock, ResNet, cifar_shaped, fmnist

INPUT_SHAPE = (1, 32, 32)
NUM_CLASSES = 10
LAYERS = [2, 2, 2, 2]


def model():
    return ResNet(BasicBlock, LAYERS, in_channels=1, num_classes=NUM_CLASSES)


def model_half():
    """Half-width variant (every stage's channels halved): the CPU benchmarks' model."""
    return ResNet(BasicBlock, LAYERS, in_channels=1, num_classes=NUM_CLASSES, width=0.5)


def datasets():
    return fmnist(pad_to=32)


def model_cifar():
    return ResNet(BasicBlock, LAYERS, in_channels=3, num_classes=10)


def datasets_cifar():
    return cifar_shaped()
