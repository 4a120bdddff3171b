"""nf-bench smoke configuration: the harness runs and reports every method."""

from __future__ import annotations

import json
from pathlib import Path

from neuroflux.tools.bench import main as nf_bench, time_to_target


def test_smoke_benchmark_reports_every_method(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("NEUROFLUX_DATA", raising=False)
    monkeypatch.delenv("NEUROFLUX_LIMIT", raising=False)
    assert nf_bench(["--smoke", "--budgets", "40MB", "--out", str(tmp_path)]) == 0
    assert "NEUROFLUX_LIMIT" not in __import__("os").environ, "nf-bench must restore the environment"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["device"].startswith("cpu") and results["torch"]
    (cell,) = results["cells"]
    assert set(cell["runs"]) == {"neuroflux", "neuroflux-greedy", "bp", "bp-checkpoint"}
    for method, run in cell["runs"].items():
        assert "error" not in run, (method, run)
        assert 0 <= run["final_accuracy"] <= 1 and run["wall_time_s"] > 0
        assert run["measured_peak_bytes"] <= cell["budget_bytes"]
    assert "speedup_vs_bp_wall" in cell["runs"]["neuroflux"]
    assert "| small_cnn | 40MB | neuroflux |" in (tmp_path / "results.md").read_text()


def test_time_to_target_reads_blocks_and_epochs() -> None:
    metrics = [
        {"event": "epoch", "elapsed_s": 1.0},
        {"event": "block", "elapsed_s": 2.0, "exit_accuracies": {"u0": 0.5, "u1": 0.7}},
        {"event": "block", "elapsed_s": 5.0, "exit_accuracies": {"u2": 0.9}},
    ]
    assert time_to_target(metrics, 0.7) == 2.0
    assert time_to_target(metrics, 0.8) == 5.0
    assert time_to_target(metrics, 0.95) is None
    assert time_to_target([{"event": "epoch", "elapsed_s": 3.0, "val_acc": 0.6}], 0.6) == 3.0
