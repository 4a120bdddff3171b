"""Hardening, round 2: every refusal is an exit 2 with a message (or a
TypeError/ValueError naming the argument, from Python), and nothing is
written where it should not be. One regression test per reported failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_plan, wait_for_metrics

from neuroflux.errors import NeuroFluxError
from neuroflux.planner.cli import main as nf_plan
from neuroflux.runtime.cli import main as nf_run
from neuroflux.runtime.runner import RunConfig, Runner, run_plan
from neuroflux.schemas import PlanError, load_plan

# Plans and trains real models end to end: the full suite's, not the fast loop's (-m "not slow").
pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


def _edited(path: Path, edit) -> Path:
    data = json.loads(path.read_text())
    edit(data)
    out = path.with_name("edited.json")
    out.write_text(json.dumps(data))
    return out


def _set(*path):
    """An edit setting ``data[k1][k2]... = value``; the last argument is the value."""
    *keys, value = path

    def edit(d):
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return edit


# ------------------------------------------------------------------ hand-edited plan fields (item 10)
@pytest.fixture(scope="module")
def shared_plan(tmp_path_factory) -> Path:
    """One tiny plan for the edit cases (planning it is most of each case's time)."""
    _, path, _ = tiny_plan(tmp_path_factory.mktemp("shared"), epochs=1)
    return path


@pytest.mark.parametrize(
    "edit, match",
    [
        (_set("recipe", "lr", -1), "recipe.lr"),
        (_set("recipe", "momentum", -3), "recipe.momentum"),
        (_set("recipe", "seed", 2**64), "seed"),
        (_set("blocks", 0, "shuffle_seed", 2**64), "shuffle_seed"),
        (_set("blocks", 1, "index", 7), "index 7"),
        (_set("blocks", 0, "cache", None), "does not follow"),
        (_set("units", 0, "aux", None), "lacks an aux head"),
        (_set("units", 2, "aux", {"kind": "pooled", "width": 8, "params": 1}), "has an aux head"),
        (_set("units", 0, "aux", "width", 10**6), "wide"),
        (
            _set("blocks", 0, "cache", {"location": "disk", "dtype": "float32", "bytes": 1, "file": "."}),
            "not a plain path",
        ),
        (
            _set("blocks", 0, "cache", {"location": "disk", "dtype": "float32", "bytes": 1, "file": "../model.py"}),
            "not a plain path",
        ),
        (
            _set("blocks", 0, "cache", {"location": "disk", "dtype": "float32", "bytes": 1, "file": "/etc/x.npy"}),
            "not a plain path",
        ),
        (_set("blocks", 1, "lr", 0.0), "lr"),
    ],
)
def test_plan_fields_that_cannot_run_are_refused_at_load(
    shared_plan: Path, tmp_path: Path, capsys, edit, match: str
) -> None:
    path = tmp_path / "plan.json"
    path.write_text(shared_plan.read_text())
    bad = _edited(path, edit)
    with pytest.raises(PlanError, match=match):
        load_plan(bad)
    assert nf_run([str(bad), "--out", str(tmp_path / "run"), "-q"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_float_batch_is_read_as_the_integer_it_is(tmp_path: Path) -> None:
    _, path, _ = tiny_plan(tmp_path, epochs=1)
    plan = load_plan(_edited(path, _set("blocks", 0, "batch_size", 32.0)))
    assert plan.blocks[0].batch_size == 32 and isinstance(plan.blocks[0].batch_size, int)


def test_a_wrong_output_shape_is_exit_2_naming_it(tmp_path: Path, capsys) -> None:
    _, path, _ = tiny_plan(tmp_path, epochs=1)
    bad = _edited(path, _set("units", 0, "output_shape", [8, 9, 9]))
    assert nf_run([str(bad), "--out", str(tmp_path / "run"), "-q", "--device", "cpu", "--no-onnx"]) == 2
    err = capsys.readouterr().err
    assert "the plan says" in err and "re-plan" in err and "Traceback" not in err


# ------------------------------------------------------------------ checkpoints (item 11)
def test_a_checkpoint_with_other_contents_is_refused(tmp_path: Path) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=2)
    out = tmp_path / "run"
    original = Runner._run_stage

    def stop(self, stage, *a, **k):
        if stage.index == 1:
            raise KeyboardInterrupt
        return original(self, stage, *a, **k)

    Runner._run_stage = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            run_plan(plan, path, RunConfig(out_dir=out, device="cpu", export_onnx=False))
    finally:
        Runner._run_stage = original
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    key = next(iter(ckpt["model"]))
    ckpt["model"][key] = torch.zeros(3, 3)  # the right plan key, a tensor of another shape
    torch.save(ckpt, out / "checkpoint.pt")
    with pytest.raises(NeuroFluxError, match="does not fit this plan's model"):
        run_plan(plan, path, RunConfig(out_dir=out, device="cpu", export_onnx=False, resume=True))


# ------------------------------------------------------------------ nf-run overrides and directories (item 12)
@pytest.mark.parametrize(
    "flags",
    [
        ["--patience", "-1"],
        ["--tolerance", "nan"],
        ["--epoch-patience", "-2"],
        ["--tolerance", "2"],
        ["--loader-workers", "-1"],
    ],
)
def test_out_of_range_overrides_are_refused(tmp_path: Path, capsys, flags: list[str]) -> None:
    _, path, _ = tiny_plan(tmp_path, epochs=1)
    assert nf_run([str(path), "--out", str(tmp_path / "run"), *flags]) == 2
    assert flags[0] in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resume_into_a_new_directory_creates_nothing(tmp_path: Path, capsys) -> None:
    _, path, _ = tiny_plan(tmp_path, epochs=1)
    assert nf_run([str(path), "--resume", "--out", str(tmp_path / "new" / "dir"), "-q"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ model files and datasets (item 9)
@pytest.mark.parametrize(
    "body, match",
    [
        ("def model():\n    import sys\n    sys.exit(0)\n", "sys.exit"),
        (
            "class M(nn.Module):\n    def forward(self, x):\n        return x.flatten(1)[:, :3]\n"
            "def model():\n    return M()\n",
            "without parameters",
        ),
        (
            "INPUT_SHAPE = 28\ndef model():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n",
            "INPUT_SHAPE = 28",
        ),
        ("def model():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 1))\n", "at least 2"),
    ],
)
def test_model_file_mistakes_are_exit_2_and_write_no_plan(tmp_path: Path, capsys, body: str, match: str) -> None:
    model = tmp_path / "m.py"
    model.write_text("from torch import nn\nINPUT_SHAPE = (1, 8, 8)\n" + body)
    out = tmp_path / "plan.json"
    assert nf_plan([str(model), "--budget", "1GB", "--train-size", "64", "--val-size", "16", "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not out.exists()


_DATASETS = {
    "raises": "class D(torch.utils.data.Dataset):\n    def __len__(self): return 64\n"
    "    def __getitem__(self, i):\n        if i == 40: raise OSError('bad file')\n"
    "        return torch.zeros(1, 16, 16), 0\n",
    "ragged": "class D(torch.utils.data.Dataset):\n    def __len__(self): return 64\n"
    "    def __getitem__(self, i): return torch.zeros(1, 16, 16 if i < 10 else 15), 0\n",
    "triples": "class D(torch.utils.data.Dataset):\n    def __len__(self): return 64\n"
    "    def __getitem__(self, i): return torch.zeros(1, 16, 16), 0, 1\n",
    "too long": "class D(torch.utils.data.Dataset):\n    def __len__(self): return 64\n"
    "    def __getitem__(self, i):\n        if i >= 50: raise IndexError(i)\n"
    "        return torch.zeros(1, 16, 16), 0\n",
}


@pytest.mark.parametrize("kind", sorted(_DATASETS))
def test_dataset_mistakes_are_exit_2_naming_the_samples(tmp_path: Path, capsys, kind: str) -> None:
    src = (HERE / "tiny_model.py").read_text().replace("TRAIN, VAL = 512, 128", "TRAIN, VAL = 64, 128")
    src += "\n" + _DATASETS[kind] + "\ndef datasets_bad():\n    return D(), datasets()[1]\n"
    model = tmp_path / "m.py"
    model.write_text(src)
    out = tmp_path / "plan.json"
    assert (
        nf_plan(
            [
                f"{model}",
                "--datasets",
                "datasets_bad",
                "--budget",
                "1GB",
                "-o",
                str(out),
                "-q",
                "--device-tflops",
                "0.1",
                "--op-overhead-us",
                "5",
            ]
        )
        == 0
    )
    assert nf_run([str(out), "--out", str(tmp_path / "run"), "-q", "--device", "cpu", "--loader-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "train" in err and "Traceback" not in err, err


def test_augment_that_raises_is_exit_2(tmp_path: Path, capsys) -> None:
    _, path, model = tiny_plan(tmp_path, epochs=1)
    model.write_text(model.read_text() + "\ndef augment(x):\n    raise RuntimeError('flip failed')\n")
    assert nf_run([str(path), "--out", str(tmp_path / "run"), "-q", "--device", "cpu", "--force"]) == 2
    err = capsys.readouterr().err
    assert "augment() raised RuntimeError: flip failed" in err and "Traceback" not in err


# ------------------------------------------------------------------ I/O errors (item 8)
def test_nf_graph_io_errors_are_exit_2(tmp_path: Path, tmp_path_factory, capsys) -> None:
    from neuroflux.tools.graph_cli import main as nf_graph

    _, path, _ = tiny_plan(tmp_path, epochs=1)
    (tmp_path / "adir.html").mkdir()
    assert nf_graph([str(path), "-o", str(tmp_path / "adir.html")]) == 2
    run = tmp_path_factory.mktemp("broken-run")  # outside tmp_path: the suite checks every summary.json there
    (run / "summary.json").write_bytes(b"\xff\xfe{not utf-8")
    assert nf_graph([str(path), "-o", str(tmp_path / "v.html"), "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "UTF-8" in err and "Traceback" not in err


def test_device_profile_mistakes_are_exit_2(tmp_path: Path, capsys) -> None:
    model = tmp_path / "tiny_model.py"
    model.write_text((HERE / "tiny_model.py").read_text())
    prof = tmp_path / "p.json"
    prof.write_text(
        json.dumps(
            {
                "name": "x",
                "kind": "cpu",
                "flops_per_s": "fast",
                "op_overhead_s": 1e-6,
                "source": "measured",
                "date": "d",
                "torch": "t",
            }
        )
    )
    for where in (prof, tmp_path):  # a wrong-typed field; a directory
        assert (
            nf_plan(
                [str(model), "--budget", "1GB", "--device-profile", str(where), "-o", str(tmp_path / "plan.json"), "-q"]
            )
            == 2
        )
    err = capsys.readouterr().err
    assert "not a number" in err and "cannot read the device profile" in err and "Traceback" not in err


# ------------------------------------------------------------------ nf-graph: DOT quoting, no model code run (item 15)
def test_dot_attributes_cannot_be_injected_and_the_model_file_is_not_run(tmp_path: Path) -> None:
    import pydot

    from neuroflux.tools.graph_cli import main as nf_graph

    _, path, model = tiny_plan(tmp_path, epochs=1)
    data = json.loads(path.read_text())
    data["graph_nodes"][1]["target"] = 'conv"]; injected [label="x'
    path.write_text(json.dumps(data))
    marker = tmp_path / "ran"
    # Appending code changes the hash: --force shows the plan anyway, still without running the file.
    model.write_text(model.read_text() + f"\nopen({str(marker)!r}, 'w').close()\n")
    assert nf_graph([str(path), "-o", str(tmp_path / "p.dot"), "--force"]) == 0
    assert nf_graph([str(path), "-o", str(tmp_path / "p.html"), "--force"]) == 0
    assert not marker.exists(), "DOT and HTML views ran the model file"
    (graph,) = pydot.graph_from_dot_file(str(tmp_path / "p.dot"))
    names = {n.get_name().strip('"') for sg in [graph, *graph.get_subgraph_list()] for n in sg.get_nodes()}
    for sg in graph.get_subgraph_list():
        for inner in sg.get_subgraph_list():
            names |= {n.get_name().strip('"') for n in inner.get_nodes()}
    assert "injected" not in names


# ------------------------------------------------------------------ nf-bench (item 5)
@pytest.mark.parametrize(
    "flags, code",
    [
        (["--limit", "abc"], 2),
        (["--limit", "-5"], 2),
        (["--epochs", "0"], 2),
        (["--budgets", "1KB", "--methods", "neuroflux"], 1),
    ],
)
def test_nf_bench_checks_flags_and_fails_when_a_run_fails(tmp_path: Path, capsys, flags: list[str], code: int) -> None:
    from neuroflux.tools.bench import main as nf_bench

    (tmp_path / "afile").write_text("x")
    assert nf_bench(["--out", str(tmp_path / "afile")]) == 2
    assert nf_bench(["--smoke", "--out", str(tmp_path / "out"), *flags]) == code
    assert "Traceback" not in capsys.readouterr().err


# ------------------------------------------------------------------ API misuse (item 7)
def test_api_arguments_are_checked_before_anything_runs(tmp_path: Path) -> None:
    from torch import nn

    import neuroflux

    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    kw = dict(budget="50MB", input_shape=(1, 8, 8), train_size=64, val_size=16)
    for bad, err in [
        (dict(train_size=0), ValueError),
        (dict(strategy="fast"), ValueError),
        (dict(train_size="10"), TypeError),
        (dict(budget=True), TypeError),
        (dict(input_shape=28), ValueError),
        (dict(no_such=1), TypeError),
    ]:
        with pytest.raises(err):
            neuroflux.plan(m, **{**kw, **bad})
    plan = neuroflux.plan(m, **kw, epochs=1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,)))
    val = torch.utils.data.TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,)))
    for bad, err in [
        (dict(method="sgd"), ValueError),
        (dict(device="tpu"), ValueError),
        (dict(resume="yes"), TypeError),
        (dict(out=3), TypeError),
    ]:
        with pytest.raises(err):
            neuroflux.train(
                plan, m, data, val, out=tmp_path / "run", **{k: v for k, v in bad.items() if k != "out"}
            ) if "out" not in bad else neuroflux.train(plan, m, data, val, **bad)
        assert not (tmp_path / "run").exists(), "nothing written before the arguments were checked"
    with pytest.raises(TypeError):
        neuroflux.train("plan.json", m, data, val, out=tmp_path / "run")
    import copy

    broken = copy.deepcopy(plan)
    object.__setattr__(broken.recipe, "lr", -1.0)  # as a careless edit of a frozen record would
    with pytest.raises(ValueError, match="not valid"):
        neuroflux.train(broken, m, data, val, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ signals (items 4, 13) and metrics (item 14)
def test_two_sigterms_in_a_row_exit_130_without_a_traceback(tmp_path: Path) -> None:
    _, path, _ = tiny_plan(tmp_path, train=4096, epochs=3)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "neuroflux.runtime.cli",
            str(path),
            "--out",
            str(out),
            "-q",
            "--no-onnx",
            "--device",
            "cpu",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    wait_for_metrics(out / "metrics.jsonl", lambda recs: any(r["event"] == "epoch" for r in recs), proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err


def test_a_kill_between_checkpoint_and_log_leaves_one_record_per_block(tmp_path: Path, monkeypatch) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=1)
    out = tmp_path / "run"
    original = Runner._log
    seen = []

    def killed_once(self, record):
        if record.get("event") == "block" and record.get("index") == 0 and not seen:
            seen.append(1)
            raise KeyboardInterrupt  # after block 0's checkpoint, before its record
        return original(self, record)

    monkeypatch.setattr(Runner, "_log", killed_once)
    with pytest.raises(KeyboardInterrupt):
        run_plan(plan, path, RunConfig(out_dir=out, device="cpu", export_onnx=False))
    run_plan(plan, path, RunConfig(out_dir=out, device="cpu", export_onnx=False, resume=True))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in recs if r["event"] == "block") == list(range(len(plan.blocks)))


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_torchrun_and_frees_the_run(tmp_path: Path) -> None:
    _, path, _ = tiny_plan(tmp_path, train=4096, epochs=3)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NEUROFLUX_DIST_TIMEOUT": "60", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "neuroflux.runtime.cli",
            str(path),
            "--nproc",
            "2",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-onnx",
            "-q",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    wait_for_metrics(out / "metrics.jsonl", lambda recs: any(r["event"] == "epoch" for r in recs), proc, timeout=240)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes still running for the run: {left}"
    from neuroflux.runtime.run_dir import RunLock

    lock = RunLock(out)
    lock.acquire()  # free: nobody holds the run any more
    lock.release()
    assert (out / "checkpoint.pt").is_file()


# ------------------------------------------------------------------ links planted in a run directory (item 2),
# read-only mid-run (item 8)
def test_resume_refuses_links_planted_in_the_run_directory(tmp_path: Path, monkeypatch, capsys) -> None:
    """An interrupted run whose directory gained links (a shared temporary
    folder): resuming never writes through them; the victims are unchanged."""
    from test_streaming import _interrupt_at, _with_boundaries

    _, path, _ = tiny_plan(tmp_path, epochs=1, max_block_units=1)
    path = _with_boundaries(path, ["disk", "ram"])
    plan = load_plan(path)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("precious\n")
    for planted in ("cache", "metrics.jsonl", "final_model.pt"):
        out = tmp_path / f"run-{planted.replace('.', '_')}"
        _interrupt_at(monkeypatch, 1)
        with pytest.raises(KeyboardInterrupt):
            run_plan(plan, path, RunConfig(out_dir=out, device="cpu", export_onnx=False))
        monkeypatch.undo()
        target = out / planted
        if target.is_dir():
            import shutil

            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
        target.symlink_to(outside if planted == "cache" else victim)
        rc = nf_run([str(path), "--resume", "--out", str(out), "-q", "--device", "cpu", "--no-onnx"])
        err = capsys.readouterr().err
        if planted == "final_model.pt":  # replaced by rename: the link goes, the victim stays
            assert rc == 0 and not (out / planted).is_symlink()
        else:
            assert rc == 2 and "link" in err and "Traceback" not in err, err
        assert victim.read_text() == "precious\n" and sorted(p.name for p in outside.iterdir()) == ["victim.txt"]


def test_a_run_directory_that_turns_read_only_is_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    import errno

    from neuroflux.runtime import checkpoint

    _, path, _ = tiny_plan(tmp_path, epochs=2)
    calls = []

    def read_only(obj, p):
        calls.append(p)
        if len(calls) > 1:  # the first checkpoint is written, then the disk turns read-only
            raise OSError(errno.EROFS, "Read-only file system", str(p))
        return original(obj, p)

    original = checkpoint.atomic_torch_save
    monkeypatch.setattr(checkpoint, "atomic_torch_save", read_only)
    assert nf_run([str(path), "--out", str(tmp_path / "run"), "-q", "--device", "cpu", "--no-onnx"]) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and "--resume" in err and "Traceback" not in err


def test_nf_bench_refuses_a_corrupt_plans_index(tmp_path: Path, capsys) -> None:
    from neuroflux.tools.bench import main as nf_bench

    plans = tmp_path / "plans" / "small_cnn-40MB"
    plans.mkdir(parents=True)
    (plans / "plans.json").write_text("{not json")
    assert nf_bench(["--smoke", "--plans", str(tmp_path / "plans"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not a plans index" in err and "Traceback" not in err
