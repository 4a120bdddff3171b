"""Run records: summary.schema.json is generated from the typed records, and
every summary.json the suite writes is checked against it (conftest's
autouse fixture); here, the loader on a real run and on bad files."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from conftest import ROOT
from helpers import tiny_plan

from neuroflux.errors import NeuroFluxError
from neuroflux.runtime.runner import RunConfig, run_plan
from neuroflux.schemas import RunSummary, load_summary
from neuroflux.schemas.generate import generate_summary_schema

# Plans and trains real models end to end: the full suite's, not the fast loop's (-m "not slow").
pytestmark = pytest.mark.slow


def test_committed_summary_schema_matches_the_records() -> None:
    committed = json.loads((ROOT / "schemas" / "summary.schema.json").read_text())
    assert committed == generate_summary_schema(), "run: python -m neuroflux.schemas.generate"


def test_a_real_run_loads_typed_and_a_finished_run_needs_every_field(tmp_path: Path, tmp_path_factory) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=1)
    returned = run_plan(plan, path, RunConfig(out_dir=tmp_path / "run", device="cpu", export_onnx=False))
    s = load_summary(tmp_path / "run")
    assert isinstance(s, RunSummary) and s.status == "ok" and s.method == "neuroflux"
    assert s.final_accuracy == returned["final_accuracy"] and len(s.blocks) == len(returned["blocks"])
    assert s.blocks[0].batch_size == plan.blocks[0].batch_size and s.stopping is not None

    data = json.loads((tmp_path / "run" / "summary.json").read_text())
    schema = json.loads((ROOT / "schemas" / "summary.schema.json").read_text())
    del data["final_accuracy"]
    with pytest.raises(jsonschema.ValidationError, match="final_accuracy"):
        jsonschema.validate(data, schema)
    bad = tmp_path_factory.mktemp("bad")  # outside tmp_path: the suite-wide schema check skips these on purpose
    (bad / "summary.json").write_text(json.dumps(data))
    with pytest.raises(NeuroFluxError, match="final_accuracy"):
        load_summary(bad)
    (bad / "summary.json").write_text(json.dumps({**data, "final_accuracy": 0.5, "accuracy": 1}))
    with pytest.raises(NeuroFluxError, match="unknown field"):
        load_summary(bad)
    (bad / "summary.json").write_text("{")
    with pytest.raises(NeuroFluxError, match="not valid UTF-8 JSON"):
        load_summary(bad)
    with pytest.raises(NeuroFluxError, match="no summary.json"):
        load_summary(tmp_path / "nowhere")
