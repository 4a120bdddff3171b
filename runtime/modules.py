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
    """BP with activation checkpointing: a checkpointed unit saves only its
    input and recomputes its activations in backward. ``checkpointed``: which
    units (one flag each); None checkpoints every unit boundary."""

    def __init__(
        self, units: Sequence[nn.Module], head: nn.Module | None = None, *, checkpointed: Sequence[bool] | None = None
    ) -> None:
        super().__init__(units, head)
        self.checkpointed = [True] * len(self.units) if checkpointed is None else [bool(c) for c in checkpointed]
        if len(self.checkpointed) != len(self.units):
            raise ValueError(f"{len(self.checkpointed)} checkpoint flags for {len(self.units)} units")

    def forward(self, x):
        for u, ck in zip(self.units, self.checkpointed):
            x = checkpoint(u, x, use_reentrant=False) if self.training and ck else u(x)
        return self.head(x)
