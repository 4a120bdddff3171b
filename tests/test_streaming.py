"""Data at any scale: streamed inputs and the three kinds of block boundary
(RAM cache, disk cache, recompute), trained, resumed and checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, plan_for, tiny_plan

from neuroflux.errors import NeuroFluxError
from neuroflux.runtime.data import StreamSource
from neuroflux.runtime.runner import RunConfig, Runner, run_plan
from neuroflux.schemas import load_plan

# Plans and trains real models end to end: the full suite's, not the fast loop's (-m "not slow").
pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


def _run(plan, path: Path, out: Path, **kw):
    return run_plan(plan, path, RunConfig(out_dir=out, device="cpu", export_onnx=False, loader_workers=0, **kw))


def _final_weights_close(a_dir: Path, b_dir: Path, **tol) -> None:
    a, b = torch.load(a_dir / "final_model.pt"), torch.load(b_dir / "final_model.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol)


# ------------------------------------------------------------------ recompute against a cache
def test_recompute_boundary_matches_an_fp32_ram_cache(tmp_path: Path) -> None:
    """Recomputing a block's input through the frozen prefix gives what an
    fp32 RAM cache of the same outputs gives: same exits, same weights."""
    (tmp_path / "c").mkdir()
    (tmp_path / "r").mkdir()
    cached, cpath, _ = tiny_plan(
        tmp_path / "c", epochs=1, cache_location="ram", cache_dtype="float32", max_block_units=1
    )
    recomputed, rpath, _ = tiny_plan(tmp_path / "r", epochs=1, cache_location="recompute", max_block_units=1)
    assert [b.source().kind for b in cached.blocks] == ["data", "cache", "cache"]
    assert [b.source().kind for b in recomputed.blocks] == ["data", "recompute", "recompute"]
    assert recomputed.blocks[2].source().recompute_units == ["u0", "u1"]
    assert [b.batch_size for b in cached.blocks] == [b.batch_size for b in recomputed.blocks]
    a = _run(cached, cpath, tmp_path / "c" / "run")
    b = _run(recomputed, rpath, tmp_path / "r" / "run")
    assert b["exit_accuracies"] == pytest.approx(a["exit_accuracies"], abs=1.5 / 128)  # at most one val sample
    _final_weights_close(tmp_path / "c" / "run", tmp_path / "r" / "run", atol=1e-4, rtol=1e-4)
    # The recomputing plan pays the prefix per step and holds its weights, in its prediction.
    assert recomputed.blocks[2].source().recompute_s > 0 and recomputed.blocks[2].predicted_peak_recompute_bytes > 0
    assert all(b.cache is None for b in recomputed.blocks)
    for blk in b["blocks"]:  # the runtime's own measurement (MemTracker, first steps) stays inside the plan's
        assert blk["measured_peak_bytes"] <= blk["predicted_peak_bytes"], blk


def test_a_recomputed_input_is_not_held_by_its_source() -> None:
    """The recomputed prefix's output is the block's input: once the block
    drops it (after its first unit) nothing may keep it alive, or every later
    unit's step carries it beyond the plan (ResNet-18 half, 400MB: +25 MB,
    14% over, before this was fixed). The suspended source holds no reference."""
    import weakref

    from neuroflux.runtime.data import TensorCache
    from neuroflux.runtime.passes import PrefixSource

    base = TensorCache(torch.randn(8, 3, 4, 4), torch.zeros(8, dtype=torch.int64))
    src = PrefixSource(base, torch.nn.Conv2d(3, 5, 1).eval())
    it = src.batches(4, shuffle=False, device=torch.device("cpu"))
    h, y = next(it)
    assert h.shape == (4, 5, 4, 4)
    ref = weakref.ref(h)
    del h
    assert ref() is None, "the source's suspended frame keeps the recomputed batch alive"
    assert next(it)[0].shape == (4, 5, 4, 4)


# ------------------------------------------------------------------ every kind, killed and resumed
def _with_boundaries(path: Path, kinds: list[str]) -> Path:
    """The 3-block plan at ``path`` with the given boundary after blocks 0
    and 1 (``ram``, ``disk`` or ``recompute``): caches and inputs rewritten
    consistently (the plan loader checks that they are)."""
    data = json.loads(path.read_text())
    blocks = data["blocks"]
    assert len(blocks) == 3
    src_block, src_start = None, 0
    for i, b in enumerate(blocks):
        first = int(b["units"][0][1:])
        recompute = [f"u{u}" for u in range(src_start, first)]
        b["input"] = {
            "kind": "data" if i == 0 else ("recompute" if recompute else "cache"),
            "source_block": src_block,
            "recompute_units": recompute,
            "recompute_s": 0.0,
        }
        kind = kinds[i] if i < 2 else None
        if kind in ("ram", "disk"):
            b["cache"] = {
                "location": kind,
                "dtype": "float32",
                "bytes": 1,
                "file": f"cache/block{i}.npy" if kind == "disk" else None,
            }
            src_block, src_start = i, int(b["units"][-1][1:]) + 1
        else:
            b["cache"] = None
    out = path.with_name(f"plan-{'-'.join(kinds)}.json")
    out.write_text(json.dumps(data))
    return out


def _interrupt_at(monkeypatch, index: int) -> list[int]:
    original = Runner._run_stage
    ran: list[int] = []

    def stop(self, stage, *a, **k):
        if stage.index == index:
            raise KeyboardInterrupt
        ran.append(stage.index)
        return original(self, stage, *a, **k)

    monkeypatch.setattr(Runner, "_run_stage", stop)
    return ran


@pytest.mark.parametrize("kinds", [["disk", "recompute"], ["recompute", "ram"]])
def test_each_boundary_kind_trains_and_resumes_after_a_kill(tmp_path: Path, monkeypatch, kinds: list[str]) -> None:
    """A plan mixing boundary kinds trains; killed before each later block,
    it resumes (rebuilding what died with the process) and ends as the
    uninterrupted run."""
    _, path, _ = tiny_plan(tmp_path, epochs=1, max_block_units=1)
    path = _with_boundaries(path, kinds)
    plan = load_plan(path)
    ref = _run(plan, path, tmp_path / "ref")
    _check_time_breakdown(plan, ref)
    for stop_at in (1, 2):
        out = tmp_path / f"run{stop_at}"
        ran = _interrupt_at(monkeypatch, stop_at)
        with pytest.raises(KeyboardInterrupt):
            _run(plan, path, out)
        assert ran == list(range(stop_at))
        monkeypatch.undo()
        s = _run(plan, path, out, resume=True)
        assert s["exit_accuracies"] == pytest.approx(ref["exit_accuracies"], abs=1.5 / 128)
        _final_weights_close(tmp_path / "ref", out, atol=1e-4, rtol=1e-4)
        epochs = [
            json.loads(line)["block"]
            for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["event"] == "epoch"
        ]
        assert epochs == [0, 1, 2], "no finished block trains again"
        # Disk caches nobody reads any more are gone: the plan's disk budget holds.
        assert not list((out / "cache").glob("*.npy")) if (out / "cache").exists() else True


def _check_time_breakdown(plan, summary: dict) -> None:
    """Every block says where its time went: training (with the recomputed
    prefix apart), evaluation, its cache write, checkpoints."""
    for b, done in zip(plan.blocks, summary["blocks"]):
        t = done["time_breakdown"]
        assert t["train_s"] > 0 and t["eval_s"] > 0 and t["checkpoint_s"] > 0, t
        assert (t["cache_write_s"] > 0) == (b.cache is not None), (b.index, t)
        assert (t["recompute_s"] > 0) == (b.source().kind == "recompute"), (b.index, t)
        assert t["recompute_s"] <= t["train_s"]
        parts = t["train_s"] + t["eval_s"] + t["cache_write_s"] + t["checkpoint_s"]
        assert parts <= done["time_s"] + 0.01, (parts, done["time_s"])


def test_a_damaged_disk_cache_is_rebuilt_at_resume(tmp_path: Path, monkeypatch, caplog) -> None:
    """Block 2 reads block 0's disk cache. Interrupted before block 2, the
    run is resumed from copies whose cache file was truncated, deleted or
    replaced by another array or by zeros of its shape: each rebuilds it
    (with a warning) and ends as the uninterrupted run; a directory in its
    place is refused by name."""
    import shutil

    _, path, _ = tiny_plan(tmp_path, epochs=1, max_block_units=1)
    path = _with_boundaries(path, ["disk", "recompute"])
    plan = load_plan(path)
    ref = _run(plan, path, tmp_path / "ref")
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _run(plan, path, tmp_path / "interrupted")
    monkeypatch.undo()
    assert (tmp_path / "interrupted" / "cache" / "block0.npy").is_file()
    for damage in ("truncate", "missing", "wrong-shape", "zeroed", "directory"):
        run = tmp_path / damage
        shutil.copytree(tmp_path / "interrupted", run)
        (run / ".lock").unlink(missing_ok=True)
        f = run / "cache" / "block0.npy"
        if damage == "truncate":
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
        elif damage == "missing":
            f.unlink()
        elif damage == "wrong-shape":
            np.save(f, np.zeros((3, 3), dtype=np.float32))
        elif damage == "zeroed":  # the right shape and dtype: caught by the digest taken when it was written
            x = np.load(f)
            np.save(f, np.zeros_like(x))
        else:
            f.unlink()
            f.mkdir()
            with pytest.raises(NeuroFluxError, match="block0.npy"):
                _run(plan, path, run, resume=True)
            continue
        caplog.clear()
        with caplog.at_level("WARNING"):
            s = _run(plan, path, run, resume=True)
        assert any("rebuilding it" in r.message for r in caplog.records), damage
        assert s["exit_accuracies"] == pytest.approx(ref["exit_accuracies"], abs=1.5 / 128), damage


# ------------------------------------------------------------------ the planner's choice
def test_caches_that_fit_nowhere_recompute_and_the_plan_says_so(tmp_path: Path, capsys) -> None:
    from neuroflux.planner.cli import main as nf_plan

    model = tmp_path / "tiny_model.py"
    model.write_text((HERE / "tiny_model.py").read_text())
    out = tmp_path / "plan.json"
    rc = nf_plan(
        [
            str(model),
            "--budget",
            "1GB",
            "--host-budget",
            "0",
            "--disk-budget",
            "0",
            "--max-block-units",
            "1",
            "--device-tflops",
            "0.1",
            "--op-overhead-us",
            "5",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    plan = load_plan(out)
    assert [b.source().kind for b in plan.blocks] == ["data", "recompute", "recompute"]
    assert plan.data.mode == "stream" and plan.data.peak_cache_ram_bytes == 0
    assert plan.blocks[2].input_text() == "recompute u0..u1 from data"
    assert "recompute" in text and "inputs: stream" in text
    # With room for caches, the same model caches (cheaper than recomputing).
    rc = nf_plan(
        [
            str(model),
            "--budget",
            "1GB",
            "--max-block-units",
            "1",
            "--device-tflops",
            "0.1",
            "--op-overhead-us",
            "5",
            "-o",
            str(out),
            "-q",
        ]
    )
    assert rc == 0 and [b.source().kind for b in load_plan(out).blocks] == ["data", "cache", "cache"]
    assert load_plan(out).data.mode == "stack"


def test_the_plan_is_checked_against_the_data(tmp_path: Path, monkeypatch) -> None:
    """A plan made for 512 samples refuses 600 (its schedule and caches
    assume 512), naming both; --force runs it anyway."""
    src = (
        (HERE / "tiny_model.py")
        .read_text()
        .replace("TRAIN, VAL = 512, 128", "import os\nTRAIN, VAL = int(os.environ.get('NF_TINY_TRAIN', 512)), 128")
    )
    model = tmp_path / "tiny_env.py"
    model.write_text(src)
    result, path = plan_for(model, tmp_path, strategy="greedy", epochs=1, min_batch=8, max_batch=32)
    plan = result.plan
    monkeypatch.setenv("NF_TINY_TRAIN", "600")
    with pytest.raises(NeuroFluxError, match="600 samples but the plan was made for 512"):
        _run(plan, path, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "refused before training"
    assert _run(plan, path, tmp_path / "forced", force=True)["status"] == "ok"


# ------------------------------------------------------------------ streaming
def test_stream_source_checks_samples_on_the_fly_naming_the_index(tmp_path: Path) -> None:
    x = torch.randn(40, 1, 4, 4)
    x[29, 0, 1, 1] = float("nan")
    ds = torch.utils.data.TensorDataset(x, torch.zeros(40, dtype=torch.long))
    src = StreamSource(ds, what="train", input_shape=(1, 4, 4), num_classes=2, workers=0)
    with pytest.raises(NeuroFluxError, match="train sample 29 has NaN"):
        list(src.batches(8, shuffle=True, generator=torch.Generator().manual_seed(0), device=torch.device("cpu")))

    class Broken(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int):
            if i == 7:
                raise OSError("cannot decode")
            return torch.zeros(1, 4, 4), 0

    src = StreamSource(Broken(), what="val", input_shape=(1, 4, 4), num_classes=2, workers=1)
    with pytest.raises(NeuroFluxError, match=r"reading val samples .*OSError: cannot decode"):
        list(src.batches(4, shuffle=False, device=torch.device("cpu")))


def test_stream_and_stack_give_the_same_batches() -> None:
    ds = torch.utils.data.TensorDataset(torch.randn(50, 1, 2, 2), torch.randint(0, 3, (50,)))
    from neuroflux.runtime.data import TensorCache

    stream = StreamSource(ds, what="train", input_shape=(1, 2, 2), num_classes=3, workers=0)
    stack = TensorCache(*ds.tensors)
    cpu = torch.device("cpu")
    for a, b in zip(
        stream.batches(16, shuffle=True, generator=torch.Generator().manual_seed(3), device=cpu),
        stack.batches(16, shuffle=True, generator=torch.Generator().manual_seed(3), device=cpu),
    ):
        torch.testing.assert_close(a, b)


_RSS_RUN = """
import resource, subprocess, sys
rc = subprocess.call(sys.argv[1:])
print("MAXRSS_KIB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(rc)
"""


def _peak_rss_bytes(cmd: list[str], env: dict[str, str], cwd: Path) -> int:
    """Peak resident memory of the largest process of ``cmd`` (the trainer;
    its DataLoader workers are separate processes, each smaller)."""
    p = subprocess.run(
        [sys.executable, "-c", _RSS_RUN, *cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("MAXRSS_KIB"))
    return int(line.split()[1]) * 1024


def test_streams_an_image_folder_larger_than_the_host_budget(tmp_path: Path, monkeypatch) -> None:
    """1,200 PNG files decode to 33 MiB of float32; with a host budget of
    8 MiB the plan streams them through a DataLoader worker, and the
    trainer's peak RSS stays within the budget plus the allowance measured
    on a 60-image folder (interpreter, torch, model: the same fixed costs)
    and 8 MiB for the allocator (stated). Stacking would add the 33 MiB."""
    from image_folder_model import write_folder

    model = tmp_path / "image_folder_model.py"
    model.write_text((HERE / "image_folder_model.py").read_text())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    peaks = {}
    budget = 8 * 2**20
    for name, train, val in (("small", 48, 12), ("large", 1000, 200)):
        root = tmp_path / name
        decoded = write_folder(root, train=train, val=val)
        env["NF_IMAGE_ROOT"] = str(root)
        monkeypatch.setenv("NF_IMAGE_ROOT", str(root))
        result, plan = plan_for(
            model,
            tmp_path,
            budget=200 * 10**6,
            cache_budget_bytes=budget,
            epochs=1,
            max_batch=64,
            data_mode="stream" if name == "small" else "auto",
        )
        plan = plan.rename(tmp_path / f"{name}.json")
        p = load_plan(plan)
        assert p.data.mode == "stream"
        if name == "large":
            assert decoded > 3 * budget and "do not fit" in p.data.reason
        peaks[name] = _peak_rss_bytes(
            [
                sys.executable,
                "-m",
                "neuroflux.runtime.cli",
                str(plan),
                "--out",
                str(tmp_path / f"run-{name}"),
                "--device",
                "cpu",
                "--no-onnx",
                "-q",
                "--loader-workers",
                "1",
            ],
            env,
            tmp_path,
        )
        summary = json.loads((tmp_path / f"run-{name}" / "summary.json").read_text())
        assert summary["status"] == "ok"
    allowance = peaks["small"] + 8 * 2**20  # allocator slack on top of the fixed costs, stated
    print("peak RSS", peaks, "decoded", decoded)
    assert peaks["large"] <= allowance + budget, (peaks, decoded)
    assert summary["final_accuracy"] > 0.4, "it learned from the streamed files (4 classes)"


def test_a_mixed_plan_killed_with_sigkill_resumes(tmp_path: Path) -> None:
    """A real kill (no handler runs) after block 1, whose successor
    recomputes from block 0's disk cache: the resume reopens that cache and
    repeats no epoch."""
    import signal

    from helpers import wait_for_metrics

    from neuroflux.runtime.cli import main as nf_run

    _, path, _ = tiny_plan(tmp_path, train=4096, epochs=2, max_block_units=1)
    path = _with_boundaries(path, ["disk", "recompute"])
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "neuroflux.runtime.cli",
            str(path),
            "--out",
            str(out),
            "--device",
            "cpu",
            "-q",
            "--no-onnx",
            "--loader-workers",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    wait_for_metrics(out / "metrics.jsonl", lambda recs: sum(r["event"] == "block" for r in recs) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists(), "the run finished before it was killed; the test proves nothing"
    assert (
        nf_run(
            [str(path), "--resume", "--out", str(out), "--device", "cpu", "-q", "--no-onnx", "--loader-workers", "0"]
        )
        == 0
    )
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [(r["block"], r["epoch"]) for r in recs if r["event"] == "epoch"]
    assert len(epochs) == len(set(epochs)), f"an epoch ran twice: {epochs}"
    assert set(epochs) == {(b, e) for b in range(3) for e in (1, 2)}
