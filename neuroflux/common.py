"""Helpers shared by the planner, the runtime and the tools (no torch, no
solver), so that the runtime never imports the planner."""

from __future__ import annotations

__all__ = ["format_bytes", "speed_verdict"]


def format_bytes(n: int | float) -> str:
    """Human form with binary units, e.g. ``1.50 GiB``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def speed_verdict(speedup: float, *, bold: tuple[str, str] = ("", "")) -> str:
    """``1.38x faster``, or ``1.62x slower`` for a speed-up below one (never
    "0.62x faster"); ``bold`` wraps the number, e.g. ``("<b>", "</b>")``."""
    a, b = bold
    return f"{a}{speedup:.2f}x{b} faster" if speedup >= 1 else f"{a}{1 / speedup:.2f}x{b} slower"
