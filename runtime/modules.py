"""Modules built from units: the final early-exit model (``Chain``) and BP
with activation checkpointing (``CheckpointedChain``, which the runtime
trains and the planner profiles).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["Chain", "CheckpointedChain"]


class Chain(nn.Module):
    """Units in order, then an optional exit head: the model cut at an exit."""

    def __init__(self, units: Sequence[nn.Module], head: nn.Module | None = None) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.head = head if head is not None else nn.Identity()

    def forward(self, x):
        for u in self.units:
            x = u(x)
        return self.head(x)


class CheckpointedChain(Chain):
    """BP with activation checkpointing at every unit boundary: only unit
    inputs are saved; each unit's activations are recomputed in backward."""

    def forward(self, x):
        for u in self.units:
            x = checkpoint(u, x, use_reentrant=False) if self.training else u(x)
        return self.head(x)
