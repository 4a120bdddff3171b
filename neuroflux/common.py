"""Helpers shared by the planner, the runtime and the tools (no torch, no
solver), so that the runtime never imports the planner."""

from __future__ import annotations

__all__ = ["format_bytes"]


def format_bytes(n: int | float) -> str:
    """Human form with binary units, e.g. ``1.50 GiB``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
