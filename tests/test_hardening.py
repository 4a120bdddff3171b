"""nf-run against hostile but realistic input: crafted or truncated
checkpoints, divergence, bad data, a changed plan on resume, two runs in one
directory. Each drives the CLI and checks exit code, message and state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_plan

from neuroflux.runtime.cli import main as nf_run
from neuroflux.runtime.run_dir import RunLock

# Plans and trains real models end to end: the full suite's, not the fast loop's (-m "not slow").
pytestmark = pytest.mark.slow


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = nf_run([*argv, "--device", "cpu", "--no-onnx", "-q"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


class _Payload:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_crafted_pickle_checkpoint_does_not_run_its_payload(tmp_path: Path, capsys) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"method": "neuroflux", "payload": _Payload(str(marker))}, run_dir / "checkpoint.pt")
    rc, err = run_cli(capsys, str(path), "--out", str(run_dir), "--resume")
    assert rc == 2 and not marker.exists()
    assert "not a NeuroFlux checkpoint" in err


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path, capsys) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=1)
    run_dir = tmp_path / "run"
    assert run_cli(capsys, str(path), "--out", str(run_dir))[0] == 0
    data = (run_dir / "checkpoint.pt").read_bytes()
    (run_dir / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    rc, err = run_cli(capsys, str(path), "--out", str(run_dir), "--resume")
    assert rc == 2 and "truncated" in err


def test_divergence_is_a_failed_run_not_a_result(tmp_path: Path, capsys) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=1, lr=1e6)
    rc, err = run_cli(capsys, str(path), "--out", str(tmp_path / "run"))
    assert rc == 3
    assert "diverged in block 0" in err and "lower --lr" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert not (tmp_path / "run" / "final_model.pt").exists()
    rc, err = run_cli(capsys, str(path), "--out", str(tmp_path / "run"), "--resume")
    assert rc == 2 and "failed" in err


@pytest.mark.parametrize(
    "corruption,message",
    [
        ("x[7, 0, 0, 0] = float('nan')", "train sample 7 has NaN"),
        ("y = y.float()", "labels must be integer class indices"),
        ("y[3] = 9", "train sample 3 has label 9, outside [0, 4)"),
    ],
)
def test_bad_data_is_refused_with_the_first_bad_index(tmp_path: Path, capsys, corruption: str, message: str) -> None:
    plan, path, model = tiny_plan(tmp_path, epochs=1)
    src = model.read_text().replace(
        "    return TensorDataset(x[:TRAIN], y[:TRAIN])",
        f"    {corruption}\n    return TensorDataset(x[:TRAIN], y[:TRAIN])",
    )
    assert src != model.read_text()
    model.write_text(src)
    rc, err = run_cli(capsys, str(path), "--out", str(tmp_path / "run"), "--force")
    assert rc == 2 and message in err, err


def test_resume_refuses_a_plan_with_other_epochs(tmp_path: Path, capsys) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=2)
    run_dir = tmp_path / "run"
    assert run_cli(capsys, str(path), "--out", str(run_dir))[0] == 0
    other = tmp_path / "other"
    other.mkdir()
    _, path1, _ = tiny_plan(other, epochs=1)
    rc, err = run_cli(capsys, str(path1), "--out", str(run_dir), "--resume")
    assert rc == 2 and "another plan" in err


def test_second_run_in_a_locked_directory_names_the_holder(tmp_path: Path, capsys) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=1)
    run_dir = tmp_path / "run"
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        q = ctx.Queue()

        def other() -> None:  # a second process: flock is per open file, per process
            try:
                RunLock(run_dir).acquire()
                q.put("acquired")
            except Exception as e:
                q.put(str(e))

        p = ctx.Process(target=other)
        p.start()
        p.join(30)
        msg = q.get(timeout=5)
        assert "in use by another nf-run (pid" in msg and str(__import__("os").getpid()) in msg
    finally:
        lock.release()
    # A lock file left by a dead process blocks nothing.
    (run_dir / ".lock").write_text("999999\n")
    assert run_cli(capsys, str(path), "--out", str(run_dir))[0] == 0


def test_out_naming_a_file_is_refused_before_training(tmp_path: Path, capsys) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=1)
    f = tmp_path / "afile"
    f.write_text("x")
    rc, err = run_cli(capsys, str(path), "--out", str(f))
    assert rc == 2 and "is a file" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--budget", "99999999999999999999GB"], "more than any device has"),
        (["--budget", "1GB", "--lr=-1"], "--lr must be a positive finite number"),
        (["--budget", "1GB", "--lr", "nan"], "--lr must be a positive finite number"),
        (["--budget", "1GB", "--lr", "inf"], "--lr must be a positive finite number"),
    ],
)
def test_nf_plan_ordinary_mistakes_are_exit_2(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    from helpers import ROOT

    from neuroflux.planner.cli import main as nf_plan

    rc = nf_plan([str(ROOT / "examples" / "small_cnn.py"), *args, "-o", str(tmp_path / "p.json"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "p.json").exists()


def test_nf_plan_refuses_a_read_only_output_before_planning(tmp_path: Path, capsys, monkeypatch) -> None:
    """A read-only file system, injected at the write (the tests run as root,
    for whom permissions stop nothing)."""
    import errno
    import tempfile

    from helpers import ROOT

    from neuroflux.planner import build
    from neuroflux.planner.cli import main as nf_plan

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    planned = []
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(build, "make_plan", lambda *a, **k: planned.append(1))
    rc = nf_plan([str(ROOT / "examples" / "small_cnn.py"), "--budget", "1GB", "-o", str(tmp_path / "p.json"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "Read-only file system" in err and "writable -o" in err
    assert not planned, "refused before planning"


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d["blocks"][0].__setitem__("batch_size", 0), "blocks/0/batch_size"),
        (lambda d: d["model"].__setitem__("num_classes", 0), "model/num_classes"),
        (lambda d: d["units"].reverse(), "out of order"),
        (lambda d: d["units"][0]["aux"].__setitem__("width", 0), "width 0"),
    ],
)
def test_hand_edited_plans_are_refused(tmp_path: Path, capsys, edit, message: str) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=1)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    rc, err = run_cli(capsys, str(path), "--out", str(tmp_path / "run"))
    assert rc == 2 and message in err, err


def test_full_disk_is_exit_2_with_the_space_needed_and_resumable(tmp_path: Path, capsys, monkeypatch) -> None:
    """The disk is full (injected at the free-space check): exit 2 naming the
    size and the place, the checkpoint intact, and --resume finishes once
    space is back."""
    import shutil
    from collections import namedtuple

    plan, path, _ = tiny_plan(tmp_path, epochs=1, cache_location="disk")
    real = shutil.disk_usage
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 1024))
    rc, err = run_cli(capsys, str(path), "--out", str(tmp_path / "run"))
    assert rc == 2 and "needs" in err and "GiB free" in err and "--resume" in err
    from neuroflux.runtime.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["state"]["epoch"] == 1, "the finished epoch is kept"
    monkeypatch.setattr(shutil, "disk_usage", real)
    rc, _ = run_cli(capsys, str(path), "--out", str(tmp_path / "run"), "--resume")
    assert rc == 0 and json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "ok"


def test_batch_edited_past_the_budget_warns_on_cpu(tmp_path: Path, capsys, caplog) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=1)
    data = json.loads(path.read_text())
    data["blocks"][0]["batch_size"] = 10**6
    path.write_text(json.dumps(data))
    with caplog.at_level("WARNING"):
        rc, _ = run_cli(capsys, str(path), "--out", str(tmp_path / "run"))
    assert rc == 0
    assert any("edited by hand" in r.message for r in caplog.records)


def test_out_in_a_read_only_place_is_refused_before_training(tmp_path: Path, capsys, monkeypatch) -> None:
    """A read-only --out (injected at the probe write: the tests run as root)."""
    import errno

    plan, path, _ = tiny_plan(tmp_path, epochs=1)

    def read_only(directory) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("neuroflux.runtime.run_dir.write_probe", read_only)
    rc, err = run_cli(capsys, str(path), "--out", str(tmp_path / "run"))
    assert rc == 2 and "Read-only file system" in err and "writable --out" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "nothing trained"


def test_nf_graph_writes_into_a_new_folder(tmp_path: Path, capsys) -> None:
    from neuroflux.tools.graph_cli import main as nf_graph

    plan, path, _ = tiny_plan(tmp_path, epochs=1)
    out = tmp_path / "views" / "deeper" / "plan.dot"
    assert nf_graph([str(path), "-o", str(out)]) == 0 and out.is_file()
    (tmp_path / "afile").write_text("x")
    assert nf_graph([str(path), "-o", str(tmp_path / "afile" / "plan.dot")]) == 2
    assert "not a directory" in capsys.readouterr().err
