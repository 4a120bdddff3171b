"""DenseNet-121 (growth rate 32, dense blocks of 6/12/24/16 layers), CIFAR
style: a 3x3 stem without max-pool. Every dense layer concatenates its
input with 32 new channels. Fashion-MNIST images are zero-padded to 32x32.
"""

from zoo import DenseNet, fmnist

INPUT_SHAPE = (1, 32, 32)
NUM_CLASSES = 10


def model():
    return DenseNet([6, 12, 24, 16], growth=32, in_channels=1, num_classes=NUM_CLASSES)


def datasets():
    return fmnist(pad_to=32)
