"""Auxiliary classifier heads (the local losses and early exits).

The family is pluggable: ``HEADS`` maps the plan's ``aux.kind`` to a builder.
``conv`` follows the local-learning literature (greedy layerwise, DGL,
InfoPro): 3x3 conv of width f, BatchNorm, ReLU, adaptive average pooling to
2x2, linear classifier. ``linear`` is global average pooling (for spatial
inputs) and a linear layer, for units whose output is not a feature map.
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

__all__ = ["HEADS", "build_head", "head_widths", "ConvHead", "LinearHead"]


class ConvHead(nn.Sequential):
    def __init__(self, in_channels: int, width: int, num_classes: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(width * 4, num_classes),
        )


class LinearHead(nn.Sequential):
    def __init__(self, in_shape: Sequence[int], num_classes: int) -> None:
        layers: list[nn.Module] = []
        if len(in_shape) == 3:
            layers.append(nn.AdaptiveAvgPool2d(1))
        layers += [nn.Flatten(), nn.Linear(in_shape[0], num_classes)]
        super().__init__(*layers)


HEADS: dict[str, Callable[[Sequence[int], int, int], nn.Module]] = {
    "conv": lambda in_shape, width, classes: ConvHead(in_shape[0], width, classes),
    "linear": lambda in_shape, width, classes: LinearHead(in_shape, classes),
}


def build_head(kind: str, in_shape: Sequence[int], width: int, num_classes: int) -> nn.Module:
    """The aux head for a unit whose per-sample output shape is ``in_shape``."""
    if kind not in HEADS:
        raise ValueError(f"unknown aux head kind {kind!r}; choose one of {sorted(HEADS)}")
    return HEADS[kind](in_shape, width, num_classes)


def head_widths(in_shape: Sequence[int], *, min_width: int = 8, max_options: int = 4) -> list[tuple[str, int]]:
    """Candidate (kind, width) pairs, widest first: C, C/2, C/4, ... >= min_width.

    Feature maps (C, H, W) get conv heads; anything else a linear head.
    """
    if len(in_shape) != 3:
        return [("linear", 0)]
    c = int(in_shape[0])
    widths: list[int] = []
    w = c
    while w >= min_width and len(widths) < max_options:
        widths.append(w)
        w //= 2
    return [("conv", w) for w in (widths or [min(c, min_width)])]
