"""Progress bars for a run: the factory ``nf-run`` and ``neuroflux.train``
hand to the runner (tqdm's interface), or ``NoBar`` for none."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["BarFactory", "NoBar", "progress_bars"]

#: ``bar(total=..., desc=..., leave=...)`` -> object with update/set_postfix/close (tqdm's interface).
BarFactory = Callable[..., Any]


class NoBar:
    def __init__(self, *a: Any, **k: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *a: Any, **k: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bars(*, enabled: bool) -> BarFactory:
    """tqdm bars on stderr (hidden when stderr is no terminal), or ``NoBar``
    when not ``enabled``."""
    if not enabled:
        return NoBar
    from tqdm import tqdm

    return lambda **kw: tqdm(file=sys.stderr, dynamic_ncols=True, disable=None, **kw)
