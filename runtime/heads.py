"""Auxiliary classifier heads (the local losses and early exits).

The family is pluggable: ``HEADS`` maps the plan's ``aux.kind`` to a builder.

``pooled`` (the default) pools first, as DGL's spatially-reduced MLP heads do
(Belilovsky et al., ICML 2020): adaptive average pooling of the unit's
feature map to at most 4x4, then two 1x1 convolutions of width f with
BatchNorm and ReLU, then a linear classifier on the flattened 4x4 grid. All of
its work happens on the pooled 16 positions, so a head as wide as the unit
itself costs a small fraction of the unit's own time and memory, and the
planner can afford wide heads, which are the accurate ones.

``conv`` follows the greedy-layerwise / InfoPro recipe: a 3x3 conv of width
f at full resolution, BatchNorm, ReLU, adaptive average pooling to 2x2,
linear. It is expensive where feature maps are large (that is why the
planner used to narrow it) and is kept for comparison (``--head-kind conv``).

``dgl`` is DGL's spatially-reduced MLP head as published (Belilovsky et
al., ICML 2020, "mlp-sr"): average pooling to at most 8x8, two 1x1
convolutions of width f with BatchNorm and ReLU there, average pooling to
2x2, then a 3-layer MLP of width f.

``stage`` is shaped like a following stage of the network, as AugLocal
(ICLR 2024) builds its heads from later layers: two 3x3 convolutions of
width f (the first with stride 2 while the map is at least 8x8) with
BatchNorm and ReLU, global average pooling, linear. It sees more context
than the pooled heads and costs more; the planner prices it like any head.

``linear`` is global average pooling (for spatial inputs) and a linear layer,
for units whose output is not a feature map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

__all__ = ["HEADS", "HEAD_KINDS", "build_head", "ConvHead", "PooledHead", "DGLHead", "StageHead", "LinearHead"]

#: Head families a plan may ask for on feature maps (``--head-kind``).
HEAD_KINDS = ("pooled", "conv", "dgl", "stage")


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


def _pointwise_pair(c: int, width: int) -> list[nn.Module]:
    """Two 1x1 convolutions of ``width`` with BatchNorm and ReLU: the MLP the
    pooled and DGL heads run on the pooled grid."""
    return [
        nn.Conv2d(c, width, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
    ]


class PooledHead(nn.Sequential):
    """Pool to at most ``grid`` x ``grid``, then a 2-layer 1x1-conv MLP, then linear."""

    def __init__(self, in_shape: Sequence[int], width: int, num_classes: int, *, grid: int = 4) -> None:
        c, h, w = (int(s) for s in in_shape)
        gh, gw = min(grid, h), min(grid, w)
        super().__init__(
            nn.AdaptiveAvgPool2d((gh, gw)),
            *_pointwise_pair(c, width),
            nn.Flatten(),
            nn.Linear(width * gh * gw, num_classes),
        )


class DGLHead(nn.Sequential):
    """Pool to at most 8x8, two 1x1 convs there, pool to 2x2, a 3-layer MLP (DGL's mlp-sr)."""

    def __init__(self, in_shape: Sequence[int], width: int, num_classes: int) -> None:
        c, h, w = (int(s) for s in in_shape)
        gh, gw = min(8, h), min(8, w)
        oh, ow = min(2, gh), min(2, gw)
        super().__init__(
            nn.AdaptiveAvgPool2d((gh, gw)),
            *_pointwise_pair(c, width),
            nn.AdaptiveAvgPool2d((oh, ow)),
            nn.Flatten(),
            nn.Linear(width * oh * ow, width),
            nn.ReLU(inplace=True),
            nn.Linear(width, width),
            nn.ReLU(inplace=True),
            nn.Linear(width, num_classes),
        )


class StageHead(nn.Sequential):
    """Two 3x3 conv blocks of width f (the first strided while the map is >= 8x8), global pool, linear."""

    def __init__(self, in_shape: Sequence[int], width: int, num_classes: int) -> None:
        c, h, w = (int(s) for s in in_shape)
        stride = 2 if min(h, w) >= 8 else 1
        super().__init__(
            nn.Conv2d(c, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, num_classes),
        )


class LinearHead(nn.Sequential):
    def __init__(self, in_shape: Sequence[int], num_classes: int) -> None:
        layers: list[nn.Module] = []
        if len(in_shape) == 3:
            layers.append(nn.AdaptiveAvgPool2d(1))
        layers += [nn.Flatten(), nn.Linear(in_shape[0], num_classes)]
        super().__init__(*layers)


HEADS: dict[str, Callable[[Sequence[int], int, int], nn.Module]] = {
    "pooled": lambda in_shape, width, classes: PooledHead(in_shape, width, classes),
    "conv": lambda in_shape, width, classes: ConvHead(in_shape[0], width, classes),
    "dgl": lambda in_shape, width, classes: DGLHead(in_shape, width, classes),
    "stage": lambda in_shape, width, classes: StageHead(in_shape, width, classes),
    "linear": lambda in_shape, width, classes: LinearHead(in_shape, classes),
}


def build_head(kind: str, in_shape: Sequence[int], width: int, num_classes: int) -> nn.Module:
    """The aux head for a unit whose per-sample output shape is ``in_shape``."""
    if kind not in HEADS:
        raise ValueError(f"unknown aux head kind {kind!r}; choose one of {sorted(HEADS)}")
    return HEADS[kind](in_shape, width, num_classes)
