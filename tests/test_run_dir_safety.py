"""The run directory (--out) is user-given and may hold planted links: paths a
plan names stay inside it, and nothing is written through a link."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from neuroflux.errors import NeuroFluxError
from neuroflux.runtime.run_dir import RunLock, append_jsonl

VICTIM_TEXT = "precious contents\n"


def victim(tmp_path: Path) -> Path:
    """A file outside the run directory that a planted link points at."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    path = outside / "victim.txt"
    path.write_text(VICTIM_TEXT)
    return path


def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir(exist_ok=True)
    return path


# -- confined_path ------------------------------------------------------------


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "a/../../b", "a/..", "..", "", ".", "cache/", "./"])
def test_confined_path_refuses_paths_that_leave_the_run_dir(tmp_path: Path, rel: str) -> None:
    from neuroflux.runtime.run_dir import confined_path

    with pytest.raises(NeuroFluxError, match="re-plan or use a new --out") as e:
        confined_path(run_dir(tmp_path), rel)
    assert repr(rel) in str(e.value)


def test_confined_path_refuses_a_symlinked_directory_inside_the_run_dir(tmp_path: Path) -> None:
    from neuroflux.runtime.run_dir import confined_path

    run = run_dir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "cache").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(NeuroFluxError, match="contains a link") as e:
        confined_path(run, "cache/block0.npy")
    assert "cache/block0.npy" in str(e.value) and "re-plan or use a new --out" in str(e.value)
    # a link deeper down is refused as well
    (run / "cache").unlink()
    (run / "cache").mkdir()
    (run / "cache" / "sub").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(NeuroFluxError):
        confined_path(run, "cache/sub/block0.npy")


def test_confined_path_refuses_a_symlink_at_the_file_itself(tmp_path: Path) -> None:
    from neuroflux.runtime.run_dir import confined_path

    run = run_dir(tmp_path)
    (run / "cache").mkdir()
    (run / "cache" / "block0.npy").symlink_to(victim(tmp_path))
    with pytest.raises(NeuroFluxError, match="re-plan or use a new --out"):
        confined_path(run, "cache/block0.npy")
    # a dangling link too: writing it would create its target
    (run / "cache" / "block1.npy").symlink_to(tmp_path / "outside" / "new.npy")
    with pytest.raises(NeuroFluxError):
        confined_path(run, "cache/block1.npy")


def test_confined_path_accepts_a_path_inside_a_normal_run_dir(tmp_path: Path) -> None:
    from neuroflux.runtime.run_dir import confined_path

    run = run_dir(tmp_path)
    assert confined_path(run, "cache/block0.npy") == run / "cache" / "block0.npy"  # nothing exists yet
    (run / "cache").mkdir()
    assert confined_path(run, "cache/block0.npy") == run / "cache" / "block0.npy"
    (run / "cache" / "block0.npy").write_bytes(b"")
    assert confined_path(run, "cache/block0.npy") == run / "cache" / "block0.npy"
    # the run directory itself may be a link: --out is the user's own choice
    alias = tmp_path / "alias"
    alias.symlink_to(run, target_is_directory=True)
    assert confined_path(alias, "cache/block0.npy") == alias / "cache" / "block0.npy"


# -- RunLock ------------------------------------------------------------------


def test_run_lock_refuses_a_planted_symlink_and_leaves_its_target_alone(tmp_path: Path) -> None:
    run, target = run_dir(tmp_path), victim(tmp_path)
    (run / ".lock").symlink_to(target)
    lock = RunLock(run)
    with pytest.raises(NeuroFluxError, match=r"link named \.lock.*another --out"):
        lock.acquire()
    lock.release()  # nothing held: a no-op
    assert target.read_text() == VICTIM_TEXT


def test_run_lock_refuses_a_dangling_symlink_without_creating_its_target(tmp_path: Path) -> None:
    run = run_dir(tmp_path)
    target = tmp_path / "outside" / "created.txt"
    target.parent.mkdir()
    (run / ".lock").symlink_to(target)
    with pytest.raises(NeuroFluxError, match="another --out"):
        RunLock(run).acquire()
    assert not target.exists()


def test_run_lock_refuses_a_hard_link_and_leaves_the_other_file_alone(tmp_path: Path) -> None:
    run, target = run_dir(tmp_path), victim(tmp_path)
    os.link(target, run / ".lock")
    with pytest.raises(NeuroFluxError, match=r"link named \.lock.*another --out"):
        RunLock(run).acquire()
    assert target.read_text() == VICTIM_TEXT


def test_run_lock_refuses_a_directory_named_lock(tmp_path: Path) -> None:
    run = run_dir(tmp_path)
    (run / ".lock").mkdir()
    with pytest.raises(NeuroFluxError, match=r"\.lock.*another --out"):
        RunLock(run).acquire()


# -- append_jsonl -------------------------------------------------------------


def test_append_jsonl_refuses_a_symlinked_metrics_file(tmp_path: Path) -> None:
    run, target = run_dir(tmp_path), victim(tmp_path)
    (run / "metrics.jsonl").symlink_to(target)
    with pytest.raises(
        NeuroFluxError, match="metrics.jsonl in the run directory is a symbolic link; refusing to write"
    ):
        append_jsonl(run / "metrics.jsonl", {"step": 1})
    assert target.read_text() == VICTIM_TEXT


def test_append_jsonl_refuses_a_hard_linked_metrics_file(tmp_path: Path) -> None:
    run, target = run_dir(tmp_path), victim(tmp_path)
    os.link(target, run / "metrics.jsonl")
    with pytest.raises(NeuroFluxError, match="refusing to write"):
        append_jsonl(run / "metrics.jsonl", {"step": 1})
    assert target.read_text() == VICTIM_TEXT


def test_append_jsonl_puts_the_next_record_after_a_torn_line_on_its_own_line(tmp_path: Path) -> None:
    path = run_dir(tmp_path) / "metrics.jsonl"
    path.write_text('{"a": 1}\n{"b": 2')  # a run killed mid-write
    append_jsonl(path, {"c": 3})
    append_jsonl(path, {"d": 4})
    assert path.read_text().splitlines() == ['{"a": 1}', '{"b": 2', '{"c": 3}', '{"d": 4}']
    assert path.read_text().endswith("\n")
    # a new file gets exactly one line per record, no blank ones
    fresh = tmp_path / "run" / "fresh.jsonl"
    for i in range(3):
        append_jsonl(fresh, {"step": i})
    assert fresh.read_text() == "".join(json.dumps({"step": i}) + "\n" for i in range(3))


# -- write_probe --------------------------------------------------------------


def test_write_probe_leaves_nothing_and_ignores_a_planted_write_test_link(tmp_path: Path) -> None:
    from neuroflux.common import write_probe

    run, target = run_dir(tmp_path), victim(tmp_path)
    (run / ".write-test").symlink_to(target)
    before = sorted(p.name for p in run.iterdir())
    write_probe(run)
    assert sorted(p.name for p in run.iterdir()) == before, "no probe file left behind"
    assert (run / ".write-test").is_symlink() and target.read_text() == VICTIM_TEXT

    empty = tmp_path / "empty"
    empty.mkdir()
    write_probe(empty)
    assert list(empty.iterdir()) == []


def test_write_probe_reports_an_unwritable_place_as_an_os_error(tmp_path: Path) -> None:
    from neuroflux.common import write_probe

    with pytest.raises(OSError):
        write_probe(tmp_path / "missing")
