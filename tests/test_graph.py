"""nf-graph: annotated ONNX, DOT/GraphML round trips, the HTML page in a browser."""

from __future__ import annotations

import json
import os
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
from neuroflux.schemas.summary import BlockResult, RunSummary, Stopping, Throughput, summary_to_dict
from neuroflux.tools.graph_cli import main as nf_graph
from neuroflux.tools.screenshot import (
    color_bands,
    dump_dom,
    find_browser,
    png_distinct_rows,
    screenshot,
    tallest_column,
)


@pytest.fixture(scope="module")
def resnet_plan(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("graph")
    # Half width: the same graph (residual adds, downsampling shortcuts) at a quarter of the weights to export.
    result, path = plan_for(f"{ROOT / 'examples' / 'resnet18.py'}:model_half", tmp, budget=60 * 10**6)
    assert len(result.plan.blocks) >= 2
    return result.plan, path


@pytest.mark.slow
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


@pytest.mark.slow
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
    blocks = [
        BlockResult(
            index=b.index,
            units=list(b.units),
            batch_size=b.batch_size,
            epochs=b.epochs,
            epochs_run=b.epochs,
            measured_peak_bytes=b.predicted_peak_bytes,
            predicted_peak_bytes=b.predicted_peak_bytes,
            peak_source="test",
            exit_accuracies={b.units[0]: 0.5},
            exit_accuracy=0.5,
            time_s=1.5,
            elapsed_s=1.5 * (b.index + 1),
        )
        for b in plan.blocks
    ]
    stopping = Stopping(
        stopped_at_unit="u3",
        stopped_after_block=0,
        full_depth=False,
        reason="test",
        blocks_skipped=[],
        units_skipped=[],
        epochs_planned={},
        epochs_run={},
        saved_predicted_s=0.0,
        saved_estimated_s=0.0,
        patience_units=2,
        epoch_patience=1,
        tolerance=0.005,
    )
    summary = RunSummary(
        method="neuroflux",
        status="ok",
        blocks=blocks,
        command="test",
        final_accuracy=0.9,
        final_exit="u3",
        final_params=10,
        original_params=100,
        param_reduction=10.0,
        wall_time_s=1.0,
        train_time_s=1.0,
        stopping=stopping,
        exit_accuracies={"u0": 0.5},
        throughput=Throughput(final_images_per_s=2.0, original_images_per_s=1.0, speedup=2.0),
        device="cpu",
        budget_bytes=plan.budget_bytes,
        budget_enforced=False,
        torch="test",
    )
    (run / "summary.json").write_text(json.dumps(summary_to_dict(summary)))
    overlaid = tmp_path / "overlaid.html"
    assert nf_graph([str(path), "-o", str(overlaid), "--run", str(run)]) == 0
    page = overlaid.read_text()
    aux = plan.unit("u0").aux
    assert page.count('class="bar meas"') == 2 * len(plan.blocks) and f"u0: {aux.kind} {aux.width} (50.0%)" in page
    assert 'class="bar meas"' not in out.read_text(), "the plan-only page is left as it was"


@pytest.mark.slow
def test_html_report_in_headless_chromium(resnet_plan, tmp_path: Path) -> None:
    """What a person sees in a real browser: the blocks table, one blue bar
    per block in each chart (peak memory, time), and the red budget line.
    Skips only outside CI; .ci/run installs Chromium, and there a missing
    browser fails the test."""
    if find_browser() is None:
        if os.environ.get("NEUROFLUX_CI"):
            pytest.fail("no Chromium in CI: .ci/run installs Debian's chromium; see its log")
        pytest.skip("no Chromium installed (apt-get install chromium)")
    plan, path = resnet_plan
    page = tmp_path / "plan.html"
    assert nf_graph([str(path), "-o", str(page)]) == 0
    png = tmp_path / "plan.png"
    screenshot(page, png, height=3400)  # the whole page: the blocks table (input and output columns) comes first
    assert png_distinct_rows(png) > 50, "the screenshot is (nearly) blank"
    blue, red = (0x3B, 0x6F, 0xD8), (0xC6, 0x28, 0x28)
    bars = color_bands(png, blue, min_pixels=5)
    assert len(bars) == 2 * len(plan.blocks), bars
    assert all(6 <= last - first + 1 <= 16 for first, last in bars), bars  # 12 px bars, not merged, not slivers
    assert tallest_column(png, red) >= 20 * len(plan.blocks) // 2, "no budget line"
    dom = dump_dom(page)
    table = dom[dom.index("<table") : dom.index("</table>")]
    assert table.count("<tr>") == len(plan.blocks) + 1
    assert all(f"<td>{b.batch_size}</td>" in table for b in plan.blocks)


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
