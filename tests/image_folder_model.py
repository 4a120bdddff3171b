"""A small CNN on a folder of PNG files, read lazily (for the streaming tests).

``NF_IMAGE_ROOT`` names a folder with ``train/<class>/*.png`` and
``val/<class>/*.png``; ``NF_IMAGE_AUGMENT=1`` turns on a random flip in the
dataset's own transform (per sample, drawn anew at every read)."""

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

INPUT_SHAPE = (3, 48, 48)
NUM_CLASSES = 4


class PngFolder(Dataset):
    """``root/<class index>/*.png`` as (float tensor C x H x W in [0, 1], label); nothing is held in memory."""

    def __init__(self, root: Path, *, augment: bool = False) -> None:
        self.files = sorted((int(p.parent.name), p) for p in Path(root).glob("*/*.png"))
        self.augment = augment

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        label, path = self.files[i]
        with Image.open(path) as im:
            x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        if self.augment and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.contiguous(), label


def model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, NUM_CLASSES),
    )


def datasets():
    root = Path(os.environ["NF_IMAGE_ROOT"])
    augment = os.environ.get("NF_IMAGE_AUGMENT") == "1"
    return PngFolder(root / "train", augment=augment), PngFolder(root / "val")


def write_folder(root: Path, *, train: int, val: int, seed: int = 0) -> int:
    """Random PNGs with a learnable signal (the class sets one channel's
    mean); returns the decoded float32 bytes of train plus val."""
    g = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            label = i % NUM_CLASSES
            img = g.integers(0, 160, size=(48, 48, 3), dtype=np.uint8)
            img[..., label % 3] = np.clip(img[..., label % 3].astype(int) + 40 * label, 0, 255).astype(np.uint8)
            d = root / split / str(label)
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:05d}.png", compress_level=1)
    return (train + val) * 3 * 48 * 48 * 4
