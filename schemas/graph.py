"""The traced graph as a plan records it, for graph views (``nf-graph``)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GraphEdge", "GraphNode"]


@dataclass(frozen=True, kw_only=True)
class GraphNode:
    """One fx node of the traced model, for graph views."""

    name: str
    op: str
    target: str
    unit: str | None
    """Unit that executes it (None for placeholder/output)."""
    shape: list[int] | None


@dataclass(frozen=True, kw_only=True)
class GraphEdge:
    src: str
    dst: str
