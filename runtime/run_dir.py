"""The run directory (``--out``): checked and locked before anything is
trained, resumed only by the same run, and written by rank 0 alone: the
metrics log, ``summary.json`` (the checkpoint's contents are
``checkpoint.py``'s, the block caches' files ``caches.py``'s).

A run directory is user-given and may hold links someone planted there (a
shared scratch space, a copied run directory): nothing is written through a
symbolic link, and paths a plan names inside the run directory are confined
to it (``confined_path``)."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

from neuroflux.common import atomic_write_json, write_probe
from neuroflux.errors import NeuroFluxError
from neuroflux.runtime import checkpoint
from neuroflux.runtime.assemble import Assembled
from neuroflux.runtime.distributed import Dist
from neuroflux.runtime.run_state import RunState, block_result_json
from neuroflux.runtime.train import UnitTrainer
from neuroflux.schemas.summary import BlockResult

__all__ = ["SEARCH_FILE", "RunDir", "RunLock", "append_jsonl", "confined_path"]


SEARCH_FILE = "compile_search.json"
"""bp-compile's search record in a run directory: a resume trains its choice without searching again."""


class RunDir:
    """One run's directory as this process sees it (under torchrun, rank 0
    checks, locks and writes it; the other ranks only read)."""

    def __init__(self, path: Path, *, dist: Dist, method: str, plan_key: str) -> None:
        self.path, self.dist, self.method, self.plan_key = path, dist, method, plan_key
        self.checkpoint_path = path / "checkpoint.pt"
        self.metrics_path = path / "metrics.jsonl"

    def lock(self, *, resume: bool) -> RunLock:
        """The directory made (or found), probed for writing and locked, before
        any work is spent; ``release()`` the lock when the run ends."""
        if self.path.exists() and not self.path.is_dir():
            raise NeuroFluxError(f"--out {self.path} is a file; give a directory for the run")
        if resume and not self.checkpoint_path.is_file():  # before anything is created
            raise NeuroFluxError(f"nothing to resume in {self.path} (no checkpoint.pt); start without --resume")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_probe(self.path)
        except OSError as e:
            raise NeuroFluxError(
                f"cannot write to the run directory {self.path} ({e.strerror}); choose a writable --out"
            ) from None
        lock = RunLock(self.path)
        lock.acquire()
        return lock

    def prepare(self, *, resume: bool) -> dict[str, Any] | None:
        """The checkpoint to resume (checked to be this run's: method, plan
        key, number of processes, not failed), or None for a new run in an
        empty directory. The caller holds the lock."""
        if resume:
            if not self.checkpoint_path.is_file():
                raise NeuroFluxError(f"nothing to resume in {self.path} (no checkpoint.pt); start without --resume")
            ckpt = checkpoint.load_checkpoint(self.checkpoint_path)
            if ckpt["method"] != self.method or ckpt["plan_sha"] != self.plan_key:
                raise NeuroFluxError(
                    f"{self.path} holds a {ckpt['method']} run of another plan (or other epochs, learning rate, "
                    f"heads, caches or exit policy); resume with the same plan, --baseline and overrides, or use "
                    f"a new --out"
                )
            if ckpt.get("world_size", 1) != self.dist.world:
                n = ckpt.get("world_size", 1)
                raise NeuroFluxError(
                    f"the run in {self.path} was trained on {n} process{'es' if n > 1 else ''} and this is "
                    f"{self.dist.world}: each rank's data shard and cache depend on it. Resume with the same number "
                    f"({'torchrun --nproc-per-node ' + str(n) + ' ...' if n > 1 else 'plain nf-run'} --resume)"
                )
            failed = ckpt["state"].get("failed")  # the raw state: it is typed once the model is built
            if failed:
                raise NeuroFluxError(
                    f"the run in {self.path} failed ({failed}); it cannot be resumed: "
                    "re-plan (e.g. with a lower --lr) and start a new --out"
                )
            return ckpt
        # The caller has made the directory and holds its lock.
        # bp-compile's search record, from a run killed before its first checkpoint: a new run searches again.
        if any(p.name not in (".lock", SEARCH_FILE) for p in self.path.iterdir()):
            raise NeuroFluxError(
                f"run directory {self.path} is not empty; pass --resume to continue it, or a new --out"
            )
        return None

    def save(self, asm: Assembled, state: RunState, *, trainers: list[UnitTrainer] | None) -> None:
        """``checkpoint.pt`` (rank 0): the run as it stands, mid-stage with the stage's ``trainers``."""
        if self.dist.main:
            checkpoint.save_checkpoint(
                self.checkpoint_path,
                method=self.method,
                plan_key=self.plan_key,
                world_size=self.dist.world,
                asm=asm,
                state=state,
                trainers=trainers,
            )

    def log(self, record: dict[str, Any]) -> None:
        """One record appended to ``metrics.jsonl`` (rank 0)."""
        if self.dist.main:
            append_jsonl(self.metrics_path, record)

    def log_missing_blocks(self, done: list[BlockResult]) -> None:
        """Block records of finished blocks that a kill kept out of metrics.jsonl."""
        if not self.dist.main or not self.metrics_path.is_file():
            return
        logged = set()
        for line in self.metrics_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line from the kill
            if isinstance(rec, dict) and rec.get("event") == "block":
                logged.add(rec.get("index"))
        for b in done:
            if b.index not in logged:
                self.log({"event": "block", "method": self.method, **block_result_json(b)})

    def write_summary(self, summary: dict[str, Any]) -> None:
        """``summary.json`` (rank 0), atomically."""
        if self.dist.main:
            atomic_write_json(summary, self.path / "summary.json")


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
        return NeuroFluxError(
            f"refusing the path {rel!r} inside the run directory {run_dir}: {why}; the plan was "
            "edited or the run directory contains a link: re-plan or use a new --out"
        )

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
            return NeuroFluxError(
                f"the run directory {self.path.parent} holds {what}; nf-run will not write through "
                "it: use another --out (or remove .lock if you made it yourself)"
            )

        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a planted .lock -> /some/file must not get that file
        # truncated and overwritten with our pid. O_NONBLOCK: a planted FIFO
        # or device must not hang the open (refused just below).
        fd, _ = _open_regular(
            self.path,
            os.O_RDWR | os.O_CREAT,
            refuse,
            link="a link named .lock (a symbolic link)",
            other="a .lock that is not a regular file",
            hard="a link named .lock (a hard link: a file with other names)",
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise NeuroFluxError(
                f"run directory {self.path.parent} is in use by another nf-run (pid {holder}); "
                "wait for it to finish, or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _open_regular(
    path: Path, flags: int, refuse: Any, *, link: str, other: str, hard: str
) -> tuple[int, os.stat_result]:
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
        return NeuroFluxError(
            f"{name} in the run directory is {what}; refusing to write through it ({path}): "
            "use another --out (or remove it if you made it yourself)"
        )

    # O_RDWR, not O_WRONLY: the torn-line check reads the last byte.
    fd, st = _open_regular(
        path,
        os.O_RDWR | os.O_APPEND | os.O_CREAT,
        refuse,
        link="a symbolic link",
        other="not a regular file",
        hard="a hard link (a file with other names)",
    )
    try:
        data = (json.dumps(record) + "\n").encode()
        if st.st_size > 0 and os.pread(fd, 1, st.st_size - 1) != b"\n":
            data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
