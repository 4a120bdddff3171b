"""The aux heads a plan chooses from: each unit's candidate (kind, width)
options, widest first. The heads themselves are the runtime's
(``runtime/heads.py``: the planner profiles what the runtime trains)."""

from __future__ import annotations

from collections.abc import Sequence

from neuroflux.planner.config import HeadsConfig
from neuroflux.planner.units import UnitSpan
from neuroflux.runtime.heads import HEAD_KINDS

__all__ = ["head_widths", "unit_head_options"]


def head_widths(
    in_shape: Sequence[int], *, kind: str = "pooled", min_width: int = 8, max_options: int = 4
) -> list[tuple[str, int]]:
    """Candidate (kind, width) pairs, widest first: C, C/2, C/4, ... >= min_width.

    Feature maps (C, H, W) get heads of ``kind``; anything else a linear head.
    """
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {kind!r}; choose one of {list(HEAD_KINDS)}")
    if len(in_shape) != 3:
        return [("linear", 0)]
    c = int(in_shape[0])
    widths: list[int] = []
    w = c
    while w >= min_width and len(widths) < max_options:
        widths.append(w)
        w //= 2
    return [(kind, w) for w in (widths or [min(c, min_width)])]


def unit_head_options(span: UnitSpan, heads: HeadsConfig, *, last: bool) -> list[tuple[str, int]]:
    """A unit's aux options, widest first; the last unit exits through the model's head."""
    return (
        [("model", 0)]
        if last
        else head_widths(span.output_shape, kind=heads.head_kind, max_options=heads.max_aux_options)
    )
