"""Adaptive depth and per-block epochs: the rules, as pure functions.

Both read validation accuracies of exits and keep their state in plain dicts
(``BlockState``, ``DepthState``: they live in the run's checkpoint). The
runner calls them; the tests script them.

Per-block epochs (after every epoch of a block, on val): the block's best
exit either improved by more than ``tolerance`` (stall resets) or not (stall
grows). Before the planned last epoch, ``epoch_patience`` stalls in a row end
the block (``converged``) and bank the predicted time of the epochs it did
not run. At its last epoch, a block that is still improving takes one more
epoch (``extended``) when the bank pays for it, at most ``max_extra`` times.
(The bank starts with the units the exit size limit skips:
``stages.size_limit_bank_s``.)

Adaptive depth (after every block, counted in units): walk the block's exits
in depth order; each exit that does not beat the best exit so far by more
than ``tolerance`` adds one to the stall, one that does resets it and becomes
the best (as in Keras' EarlyStopping: gains within the tolerance never move
the reference, so a slow creep still counts as a plateau). Training
stops once the stall reaches ``patience`` units; the stop takes effect at
the block boundary, the only place where skipping the rest saves time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, TypedDict

__all__ = [
    "EpochDecision",
    "BlockState",
    "TIME_PARTS",
    "DepthState",
    "new_block_state",
    "epoch_decision",
    "new_depth_state",
    "observe_exits",
    "depth_should_stop",
]

EpochDecision = Literal["continue", "converged", "extended", "done", "planned"]


class BlockState(TypedDict):
    """Per-block epochs' running state for the block in training."""

    index: int
    limit: int
    """Epochs the block runs: the planned ones, plus those granted."""
    best: float
    stall: int
    extra: int
    """Extra epochs granted so far."""
    times: dict[str, float]
    """Seconds so far per part of ``TimeBreakdown`` (checkpoints before 2.5
    lack it: the runner adds it)."""


class DepthState(TypedDict):
    """Adaptive depth's running state, over the exits trained so far."""

    best: float
    stall: int
    best_exit: str | None


def _observe(state: Any, acc: float, *, tolerance: float) -> bool:
    """The one improvement rule of both: ``acc`` beats ``state["best"]`` by
    more than ``tolerance`` (it becomes the best, the stall resets) or the
    stall grows. Returns whether it improved."""
    if acc > state["best"] + tolerance:
        state["best"], state["stall"] = acc, 0
        return True
    state["stall"] += 1
    return False


TIME_PARTS = ("train_s", "recompute_s", "eval_s", "cache_write_s", "checkpoint_s")
"""The parts of a block's time (``schemas.summary.TimeBreakdown``), kept in ``BlockState.times``."""


def new_block_state(index: int, epochs: int) -> BlockState:
    times = dict.fromkeys(TIME_PARTS, 0.0)
    return {"index": index, "limit": epochs, "best": -1.0, "stall": 0, "extra": 0, "times": times}


def epoch_decision(
    blk: BlockState,
    best_here: float,
    *,
    epochs_done: int,
    tolerance: float,
    epoch_patience: int,
    max_extra: int,
    bank_s: float,
    epoch_s: float,
) -> tuple[EpochDecision, float]:
    """Update ``blk`` after an epoch whose best exit scored ``best_here``;
    returns the decision and the change to the time bank (seconds)."""
    if epoch_patience <= 0:
        return "planned", 0.0
    _observe(blk, best_here, tolerance=tolerance)
    if epochs_done < blk["limit"]:
        if blk["stall"] >= epoch_patience:
            return "converged", (blk["limit"] - epochs_done) * epoch_s
        return "continue", 0.0
    if blk["stall"] == 0 and blk["extra"] < max_extra and bank_s >= epoch_s:
        blk["limit"] += 1
        blk["extra"] += 1
        return "extended", -epoch_s
    return "done", 0.0


def new_depth_state() -> DepthState:
    return {"best": -1.0, "stall": 0, "best_exit": None}


def observe_exits(depth: DepthState, exits: Sequence[tuple[str, float]], *, tolerance: float) -> None:
    """Walk a finished block's exits (name, val accuracy) in depth order."""
    for name, acc in exits:
        if _observe(depth, acc, tolerance=tolerance):
            depth["best_exit"] = name


def depth_should_stop(depth: DepthState, *, patience: int, is_last_block: bool) -> bool:
    return patience > 0 and depth["stall"] >= patience and not is_last_block
