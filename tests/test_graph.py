"""nf-graph: annotated ONNX, DOT/GraphML round trips, the HTML page in a browser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
import pydot
import pytest
import torch

from helpers import ROOT, plan_for
from neuroflux.runtime.assemble import assemble, open_model_file
from neuroflux.runtime.modules import Chain
from neuroflux.tools.graph_cli import main as nf_graph
from neuroflux.tools.screenshot import find_browser, png_distinct_rows, screenshot


@pytest.fixture(scope="module")
def resnet_plan(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("graph")
    result, path = plan_for(ROOT / "examples" / "resnet18.py", tmp, budget=120 * 10**6)
    assert len(result.plan.blocks) >= 2
    return result.plan, path


def test_onnx_checks_matches_torch_and_names_units(resnet_plan, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    plan, path = resnet_plan
    out = tmp_path / "plan.onnx"
    assert nf_graph([str(path), "-o", str(out)]) == 0
    model = onnx.load(out)
    onnx.checker.check_model(model)
    units = {u.name for u in plan.units}
    block_of = {u: str(b.index) for b in plan.blocks for u in b.units}
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        assert props["neuroflux.unit"] in units, node.name
        assert props["neuroflux.block"] == block_of[props["neuroflux.unit"]]
        assert "neuroflux unit" in node.doc_string
    meta = {p.key: p.value for p in model.metadata_props}
    assert int(meta["neuroflux.budget_bytes"]) == plan.budget_bytes
    # Every unit appears, so the ONNX graph covers the whole plan.
    assert {p.value for n in model.graph.node for p in n.metadata_props if p.key == "neuroflux.unit"} == units

    asm = assemble(plan, open_model_file(plan, path))  # same seed: same initial weights
    x = torch.randn(4, *plan.model.input_shape)
    expected = Chain(asm.units).eval()(x).detach().numpy()
    got = ort.InferenceSession(str(out)).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def plan_edges(plan) -> set[tuple[str, str]]:
    return {(e.src, e.dst) for e in plan.graph_edges}


def test_graphml_and_dot_round_trip(resnet_plan, tmp_path: Path) -> None:
    plan, path = resnet_plan
    assert nf_graph([str(path), "-o", str(tmp_path / "g.graphml")]) == 0
    g = nx.read_graphml(tmp_path / "g.graphml")
    assert set(g.nodes) == {n.name for n in plan.graph_nodes}
    assert set(g.edges) == plan_edges(plan)
    residual_adds = [n for n in g.nodes if n.startswith("add")]
    assert residual_adds and all(g.in_degree(n) == 2 for n in residual_adds), "residual edges are kept"
    b0 = plan.blocks[0]
    first = next(n.name for n in plan.graph_nodes if n.unit == b0.units[0])
    assert g.nodes[first]["batch_size"] == b0.batch_size and g.nodes[first]["block"] == 0
    assert g.nodes[first]["predicted_peak_bytes"] == b0.predicted_peak_bytes

    assert nf_graph([str(path), "-o", str(tmp_path / "g.dot")]) == 0
    dot_text = (tmp_path / "g.dot").read_text()
    d = nx.nx_pydot.from_pydot(pydot.graph_from_dot_data(dot_text)[0])
    assert {n.strip('"') for n in d.nodes} == {n.name for n in plan.graph_nodes}
    assert {(a.strip('"'), b.strip('"')) for a, b, _ in d.edges} == plan_edges(plan)  # a MultiDiGraph
    assert f'batch_size="{b0.batch_size}"' in dot_text and "aux_width=" in dot_text


def test_html_has_one_bar_per_block_and_overlays_a_run(resnet_plan, tmp_path: Path) -> None:
    plan, path = resnet_plan
    out = tmp_path / "plan.html"
    assert nf_graph([str(path), "-o", str(out)]) == 0
    page = out.read_text()
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    svg = re.search(r"<svg.*?</svg>", page, re.S).group(0)
    assert len(re.findall(r'class="bar pred"', svg)) == len(plan.blocks)
    run = tmp_path / "run"
    run.mkdir()
    summary = {"method": "neuroflux", "device": "cpu", "final_exit": "u3", "final_accuracy": 0.9, "final_params": 10,
               "original_params": 100, "wall_time_s": 1.0, "exit_accuracies": {"u0": 0.5},
               "blocks": [{"index": b.index, "measured_peak_bytes": b.predicted_peak_bytes, "time_s": 1.5} for b in plan.blocks]}
    (run / "summary.json").write_text(json.dumps(summary))
    assert nf_graph([str(path), "-o", str(out), "--run", str(run)]) == 0
    page = out.read_text()
    aux = plan.unit("u0").aux
    assert page.count('class="bar meas"') == 2 * len(plan.blocks) and f"u0: {aux.kind} {aux.width} (50.0%)" in page


@pytest.mark.skipif(find_browser() is None, reason="no Chromium installed")
def test_html_screenshot_in_headless_chromium(resnet_plan, tmp_path: Path) -> None:
    plan, path = resnet_plan
    assert nf_graph([str(path), "-o", str(tmp_path / "plan.html")]) == 0
    png = tmp_path / "plan.png"
    screenshot(tmp_path / "plan.html", png)
    assert png_distinct_rows(png) > 50, "the screenshot is (nearly) blank"


def test_graph_errors(resnet_plan, tmp_path: Path, capsys) -> None:
    plan, path = resnet_plan
    assert nf_graph([str(path), "-o", str(tmp_path / "x.svgz")]) == 2
    assert "unknown format" in capsys.readouterr().err
    assert nf_graph([str(tmp_path / "missing.json"), "-o", str(tmp_path / "a.dot")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert nf_graph([str(bad), "-o", str(tmp_path / "a.dot")]) == 2
    assert "schema_version" in capsys.readouterr().err
    assert nf_graph([str(path), "-o", str(tmp_path / "a.html"), "--run", str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err
