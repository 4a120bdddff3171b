"""MobileNetV2 (inverted residuals, ReLU6), CIFAR variant (stride 1 in the stem
and the second stage). Fashion-MNIST images are zero-padded to 32x32.
Uses ``.mean([2, 3])`` for pooling: a functional op the planner must handle.
"""

from zoo import MobileNetV2, cifar_shaped, fmnist, imagenet_shaped

INPUT_SHAPE = (1, 32, 32)
NUM_CLASSES = 10


def model():
    return MobileNetV2(in_channels=1, num_classes=NUM_CLASSES)


def datasets():
    return fmnist(pad_to=32)


def model_cifar():
    return MobileNetV2(in_channels=3, num_classes=10)


def datasets_cifar():
    return cifar_shaped()


def model_imagenet():
    return MobileNetV2(in_channels=3, num_classes=1000)


model_imagenet.INPUT_SHAPE = (3, 224, 224)  # this factory's own shape: the file's INPUT_SHAPE is Fashion-MNIST's


def datasets_imagenet():
    return imagenet_shaped()
