"""Atomic run state: a checkpoint is written to a temp file, then renamed.

Everything here writes into a user-given run directory (``--out``), which
may hold links someone planted there (a shared scratch space, a copied run
directory): nothing is written through a symbolic link, and paths a plan
names inside the run directory are confined to it (``confined_path``)."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

import torch

from neuroflux.common import atomic_write
from neuroflux.schemas.summary import check_run_state

__all__ = ["atomic_torch_save", "atomic_write_json", "append_jsonl", "confined_path", "load_checkpoint", "RunLock"]

_CKPT_KEYS = {"method": str, "plan_sha": str, "model": dict, "heads": list, "state": dict}


def confined_path(run_dir: Path, rel: str) -> Path:
    """``run_dir / rel`` for a path a plan names inside the run directory
    (e.g. ``cache/block0.npy``), refused with a NeuroFluxError unless it stays
    inside ``run_dir``: ``rel`` must be relative, non-empty, not ``.``, not
    end in a separator, have no ``..`` component, and no part of it that
    exists under ``run_dir`` (each directory on the way, and the file itself)
    may be a symbolic link, which could point anywhere. ``run_dir`` itself is
    the user's choice and is not checked.

    A plan the planner wrote never names such a path, so one means the plan
    was edited or someone planted a link in the run directory. This checks
    the directory as it is now; the writers below also refuse to follow a
    link at the final name when they open it."""
    from neuroflux.errors import NeuroFluxError

    run_dir = Path(run_dir)

    def refuse(why: str) -> NeuroFluxError:
        return NeuroFluxError(f"refusing the path {rel!r} inside the run directory {run_dir}: {why}; the plan was "
                              "edited or the run directory contains a link: re-plan or use a new --out")

    if not isinstance(rel, str):
        raise refuse(f"it is a {type(rel).__name__}, not a relative path string")
    if rel in ("", "."):
        raise refuse("it names no file")
    if "\0" in rel:
        raise refuse("it contains a NUL character")
    seps = os.sep + (os.altsep or "")
    if rel.endswith(tuple(seps)):
        raise refuse("it ends in a path separator, so it names no file")
    if os.path.isabs(rel) or rel.startswith(tuple(seps)):
        raise refuse("it is an absolute path")
    parts = rel.replace(os.altsep, os.sep).split(os.sep) if os.altsep else rel.split(os.sep)
    if ".." in parts:
        raise refuse("it has a '..' component, which leaves the run directory")
    parts = [part for part in parts if part not in ("", ".")]
    if not parts:
        raise refuse("it names no file")
    current = run_dir
    for part in parts:
        current = current / part
        try:
            st = os.lstat(current)
        except (FileNotFoundError, NotADirectoryError):
            break  # nothing further exists yet: no link on the way
        if stat.S_ISLNK(st.st_mode):
            raise refuse(f"{current} is a symbolic link")
    return run_dir.joinpath(*parts)


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

        def refuse(what: str) -> NeuroFluxError:
            return NeuroFluxError(f"the run directory {self.path.parent} holds {what}; nf-run will not write through "
                                  "it: use another --out (or remove .lock if you made it yourself)")

        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a planted .lock -> /some/file must not get that file
        # truncated and overwritten with our pid. O_NONBLOCK: a planted FIFO
        # or device must not hang the open (refused just below).
        fd, _ = _open_regular(self.path, os.O_RDWR | os.O_CREAT, refuse, link="a link named .lock (a symbolic link)",
                              other="a .lock that is not a regular file",
                              hard="a link named .lock (a hard link: a file with other names)")
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


def _open_regular(path: Path, flags: int, refuse: Any, *, link: str, other: str, hard: str) -> tuple[int, os.stat_result]:
    """``os.open`` that never follows a link (``O_NOFOLLOW``) nor hangs on a
    FIFO or device (``O_NONBLOCK``), and keeps the descriptor only for a
    regular file with no other names (a hard link would let a write reach
    another file); otherwise ``refuse(why)`` is raised, naming which."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise refuse(link) from None
        if e.errno in (errno.EISDIR, errno.ENXIO, errno.ENODEV):
            raise refuse(other) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        raise refuse(other if not stat.S_ISREG(st.st_mode) else hard)
    return fd, st


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (created if missing).

    Never through a link: a symbolic link at ``path`` is refused
    (``O_NOFOLLOW``), so a planted ``metrics.jsonl -> /some/file`` cannot get
    records appended to that file; so is anything but a regular file, and a
    file with other hard links. The line goes out in one ``write``. If the
    file ends in a torn line (a run killed mid-write), a newline is written
    first, so the new record starts its own line instead of being glued onto
    the torn one (readers skip the one bad line, and lose no good record)."""
    from neuroflux.errors import NeuroFluxError

    name = Path(path).name

    def refuse(what: str) -> NeuroFluxError:
        return NeuroFluxError(f"{name} in the run directory is {what}; refusing to write through it ({path}): "
                              "use another --out (or remove it if you made it yourself)")

    # O_RDWR, not O_WRONLY: the torn-line check reads the last byte.
    fd, st = _open_regular(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, refuse, link="a symbolic link",
                           other="not a regular file", hard="a hard link (a file with other names)")
    try:
        data = (json.dumps(record) + "\n").encode()
        if st.st_size > 0 and os.pread(fd, 1, st.st_size - 1) != b"\n":
            data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
