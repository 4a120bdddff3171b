"""Atomic run state: a checkpoint is written to a temp file, then renamed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from neuroflux.common import atomic_write
from neuroflux.schemas.summary import check_run_state

__all__ = ["atomic_torch_save", "atomic_write_json", "append_jsonl", "load_checkpoint", "RunLock"]

_CKPT_KEYS = {"method": str, "plan_sha": str, "model": dict, "heads": list, "state": dict}


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_json(obj: Any, path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")

    atomic_write(path, write)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A run's checkpoint, loaded with ``weights_only=True`` (tensors and
    plain containers only: a crafted pickle cannot run code), then checked
    for the structure the runner writes. Anything else is a NeuroFluxError."""
    from neuroflux.errors import NeuroFluxError

    hint = "it is not a NeuroFlux checkpoint or it is truncated; start a new run with another --out"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, OSError ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise NeuroFluxError(f"cannot load {path} ({type(e).__name__}: {first[:160]}); {hint}") from None
    if not isinstance(ckpt, dict):
        raise NeuroFluxError(f"{path} holds a {type(ckpt).__name__}, not a run checkpoint; {hint}")
    for key, tp in _CKPT_KEYS.items():
        if not isinstance(ckpt.get(key), tp):
            raise NeuroFluxError(f"{path} lacks '{key}' ({tp.__name__}); {hint}")
    try:
        check_run_state(ckpt["state"], str(path))
    except NeuroFluxError as e:
        raise NeuroFluxError(f"{e}; {hint}") from None
    return ckpt


class RunLock:
    """An exclusive ``flock`` on ``<run dir>/.lock`` holding the owner's pid.

    The kernel drops the lock when its process dies, so a lock left by a
    killed run never blocks ``--resume``; a live holder makes a second run
    refuse with its pid."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        from neuroflux.errors import NeuroFluxError

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise NeuroFluxError(f"run directory {self.path.parent} is in use by another nf-run (pid {holder}); "
                                 "wait for it to finish, or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
