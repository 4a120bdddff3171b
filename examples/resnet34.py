"""ResNet-34 (basic blocks), CIFAR-style stem (3x3 conv, no max-pool).

Fashion-MNIST images are zero-padded from 28x28 to 32x32. ``model_cifar`` /
``datasets_cifar`` give the 3x32x32 variant on synthetic data (throughput only).
"""

from zoo import BasicBlock, ResNet, cifar_shaped, fmnist

INPUT_SHAPE = (1, 32, 32)
NUM_CLASSES = 10
LAYERS = [3, 4, 6, 3]


def model():
    return ResNet(BasicBlock, LAYERS, in_channels=1, num_classes=NUM_CLASSES)


def datasets():
    return fmnist(pad_to=32)


def model_cifar():
    return ResNet(BasicBlock, LAYERS, in_channels=3, num_classes=10)


def datasets_cifar():
    return cifar_shaped()


def model_imagenet():
    """3x224x224 input, 1000 classes (CIFAR-style stem): throughput only."""
    return ResNet(BasicBlock, LAYERS, in_channels=3, num_classes=1000)


model_imagenet.INPUT_SHAPE = (3, 224, 224)  # this factory's own shape: the file's INPUT_SHAPE is Fashion-MNIST's


def datasets_imagenet():
    from zoo import imagenet_shaped

    return imagenet_shaped()
