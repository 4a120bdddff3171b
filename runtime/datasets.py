"""Data sets the examples use: real Fashion-MNIST and synthetic shapes.

``fashion_mnist`` reads the file named by the ``NEUROFLUX_DATA`` environment
variable (tests and benchmarks point it at ``../shared/data/fashion_mnist.npz``)
or, by default, the small subset shipped in ``examples/data``. Arrays follow
the shared file's layout: ``x_train``/``x_test`` uint8 (N, 28, 28),
``y_train``/``y_test`` uint8 (N,).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from neuroflux.errors import NeuroFluxError

__all__ = ["fashion_mnist", "synthetic", "parse_limit", "DATA_ENV", "LIMIT_ENV"]

DATA_ENV = "NEUROFLUX_DATA"
#: ``NEUROFLUX_LIMIT=TRAIN[,VAL]`` keeps the first samples only (benchmarks on a budget of time).
LIMIT_ENV = "NEUROFLUX_LIMIT"


def parse_limit(text: str, *, what: str = LIMIT_ENV) -> tuple[int, int | None]:
    """``TRAIN[,VAL]`` as positive sample counts; anything else is an error
    naming the form (a negative count would silently mean "all but")."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 2 or any(v < 1 for v in values):
        raise NeuroFluxError(
            f"{what} {text!r} must be TRAIN[,VAL]: one or two positive sample counts, e.g. 20000,10000"
        )
    return values[0], values[1] if len(values) > 1 else None


# Mean and std of Fashion-MNIST pixels in [0, 1].
_MEAN, _STD = 0.2860, 0.3530


def fashion_mnist(
    default_path: str | Path,
    *,
    pad_to: int = 28,
    channels: int = 1,
    train_limit: int | None = None,
    val_limit: int | None = None,
) -> tuple[TensorDataset, TensorDataset]:
    """(train, val) as normalised float tensors (N, channels, pad_to, pad_to).

    ``pad_to`` > 28 zero-pads symmetrically (CIFAR-shaped models use 32);
    ``channels`` > 1 repeats the grey channel.
    """
    path = Path(os.environ.get(DATA_ENV) or default_path)
    if os.environ.get(LIMIT_ENV) and train_limit is None and val_limit is None:
        train_limit, val_limit = parse_limit(os.environ[LIMIT_ENV])
    if not path.is_file():
        raise NeuroFluxError(f"Fashion-MNIST file {path} not found; set {DATA_ENV} to the path of fashion_mnist.npz")
    with np.load(path) as f:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
        if missing:
            raise NeuroFluxError(f"{path} lacks arrays {sorted(missing)}; expected x_train, y_train, x_test, y_test")
        parts = [(f["x_train"], f["y_train"], train_limit), (f["x_test"], f["y_test"], val_limit)]
        out = []
        for x, y, limit in parts:
            if limit is not None:
                x, y = x[:limit], y[:limit]
            t = (torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0) - _MEAN) / _STD
            t = t.unsqueeze(1)
            if pad_to > t.shape[-1]:
                lo = (pad_to - t.shape[-1]) // 2
                hi = pad_to - t.shape[-1] - lo
                t = torch.nn.functional.pad(t, (lo, hi, lo, hi), value=-_MEAN / _STD)
            if channels > 1:
                t = t.expand(-1, channels, -1, -1).contiguous()
            out.append(TensorDataset(t, torch.from_numpy(y.astype(np.int64))))
    return out[0], out[1]


def synthetic(
    shape: tuple[int, ...], *, num_classes: int, train_size: int, val_size: int, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """Random inputs and labels of a given shape: for throughput only, never
    accuracy. ``NEUROFLUX_LIMIT`` caps the sizes, as for real data."""
    if os.environ.get(LIMIT_ENV):
        t, v = parse_limit(os.environ[LIMIT_ENV])
        train_size = min(train_size, t)
        val_size = min(val_size, v) if v is not None else val_size
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> TensorDataset:
        return TensorDataset(torch.randn((n, *shape), generator=g), torch.randint(0, num_classes, (n,), generator=g))

    return make(train_size), make(val_size)
