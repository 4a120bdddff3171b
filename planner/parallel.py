"""Profiling jobs over this machine's cores.

Unit profiling runs fake-tensor training steps: pure Python dispatch, one
core each. ``map_forked`` runs independent jobs on forked worker processes,
which inherit the traced model and its fake parameters (nothing is pickled
but job indices and results). Results come back in job order, so a plan is
the same whatever the number of workers or the machine's load. Where fork
is not available (macOS's and Windows' default start methods cannot share
fake tensors), inside a daemon process, or with one worker, jobs run here in
order.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import traceback
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

__all__ = ["map_forked", "usable_cpus"]

_JOB: Callable[[int], object] | None = None


def usable_cpus() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _init_worker() -> None:
    import signal

    import torch

    torch.set_num_threads(1)  # each worker is one core; no intra-op thread pool inherited across fork
    # Handlers inherited from the parent (nf-run's stop-and-checkpoint on
    # SIGTERM) would keep a worker alive when the pool ends it; Ctrl-C is
    # the parent's to handle.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(i: int) -> tuple[int, object]:
    assert _JOB is not None
    try:
        return i, _JOB(i)
    except Exception as e:
        try:
            pickle.dumps(e)
        except Exception:  # it could not reach the parent: send what it says instead
            raise RuntimeError(f"job {i} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}") from None
        raise


def map_forked(
    job: Callable[[int], T], order: Sequence[int], *, workers: int, on_done: Callable[[int], None] = lambda i: None
) -> dict[int, T]:
    """``{i: job(i)}`` for every ``i`` in ``order`` (started in that order:
    put the longest first), on up to ``workers`` forked processes. An error
    in a job is raised here, as in a serial run."""
    global _JOB
    forkable = "fork" in mp.get_all_start_methods() and not mp.current_process().daemon
    workers = min(workers, len(order))
    if workers <= 1 or not forkable:
        out = {}
        for i in order:
            out[i] = job(i)
            on_done(i)
        return out
    _JOB = job
    try:
        out = {}
        with mp.get_context("fork").Pool(workers, initializer=_init_worker) as pool:
            for i, result in pool.imap_unordered(_run, order, chunksize=1):
                out[i] = result  # type: ignore[assignment]
                on_done(i)
            pool.close()  # workers leave when the queue is drained; the context's exit would kill them
            pool.join()
        return out
    finally:
        _JOB = None
