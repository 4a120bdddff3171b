"""Views of a plan: annotated ONNX, DOT, GraphML and a self-contained HTML page.

Reads only the plan and the model file it names (no GPU, no training).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, cast

import networkx as nx

from neuroflux.charts import bar_chart
from neuroflux.common import format_mib, speed_verdict
from neuroflux.errors import NeuroFluxError
from neuroflux.schemas.plan import AuxHead, Plan
from neuroflux.schemas.summary import load_summary

__all__ = ["FORMATS", "unit_graph", "write_dot", "write_graphml", "write_onnx", "write_html", "format_for"]

FORMATS = ("onnx", "dot", "graphml", "html")


def format_for(path: Path, explicit: str | None) -> str:
    fmt = explicit or path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise NeuroFluxError(
            f"unknown format {fmt!r} for {path}; use one of {', '.join(FORMATS)} "
            "(from the file's extension or --format)"
        )
    return fmt


def _unit_attrs(plan: Plan) -> dict[str, dict[str, Any]]:
    block_of = {u: b for b in plan.blocks for u in b.units}
    out = {}
    for u in plan.units:
        b = block_of[u.name]
        out[u.name] = {
            "unit": u.name,
            "block": b.index,
            "batch_size": b.batch_size,
            "aux_width": -1 if u.aux is None else u.aux.width,
            "aux_kind": "model head" if u.aux is None else u.aux.kind,
            "predicted_peak_bytes": b.predicted_peak_bytes,
            "predicted_time_s": b.predicted_time_s,
        }
    return out


def unit_graph(plan: Plan) -> nx.DiGraph:
    """The traced graph with its real branches, every node annotated with its
    unit and block (placeholder and output have none)."""
    attrs = _unit_attrs(plan)
    g = nx.DiGraph(name=Path(plan.model.file).stem, budget_bytes=plan.budget_bytes)
    for n in plan.graph_nodes:
        a = {"op": n.op, "target": n.target, "shape": "x".join(map(str, n.shape or []))}
        if n.unit is not None:
            a.update(attrs[n.unit])
        g.add_node(n.name, **a)
    g.add_edges_from((e.src, e.dst) for e in plan.graph_edges)
    return g


def write_graphml(plan: Plan, path: Path) -> None:
    nx.write_graphml(unit_graph(plan), path)


def _dot_quote(value: str) -> str:
    """A DOT quoted string: a plan's names and targets (hand-editable) can
    never close the quote and inject attributes or nodes."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def write_dot(plan: Plan, path: Path) -> None:
    """DOT with one cluster per block and, inside, one per unit."""
    import pydot

    g = unit_graph(plan)
    dot = pydot.Dot(g.graph["name"], graph_type="digraph", rankdir="TB", fontname="Helvetica")
    dot.set_node_defaults(shape="box", style="rounded,filled", fillcolor="white", fontname="Helvetica", fontsize="10")
    clusters: dict[str, pydot.Cluster] = {}
    for b in plan.blocks:
        bc = pydot.Cluster(
            f"block{b.index}",
            label=f"block {b.index}: batch {b.batch_size}, "
            f"peak {format_mib(b.predicted_peak_bytes)}, {b.predicted_time_s:.1f} s; "
            f"input {b.input_text()}, output {b.output_text()}",
            style="filled",
            fillcolor="#eef3fb" if b.index % 2 == 0 else "#fbf3ea",
        )
        dot.add_subgraph(bc)  # type: ignore[arg-type]  # pydot annotates Subgraph; it takes a Cluster too
        for name in b.units:
            u = plan.unit(name)
            width = "model head" if u.aux is None else f"aux {u.aux.kind} {u.aux.width}"
            uc = pydot.Cluster(f"unit_{name}", label=f"{name} ({width})", style="dashed")
            bc.add_subgraph(uc)  # type: ignore[arg-type]  # pydot annotates Subgraph; it takes a Cluster too
            clusters[name] = uc
    for node, a in g.nodes(data=True):
        attrs = {k: str(v) for k, v in a.items()}
        label = f"{node}\\n{a['target']}" + (f"\\n{a['shape']}" if a["shape"] else "")
        quoted: dict[str, Any] = {k: _dot_quote(v) for k, v in attrs.items()}
        pn = pydot.Node(node, label=label, **quoted)
        (clusters[a["unit"]] if "unit" in a else dot).add_node(pn)
    for s, d in g.edges:
        dot.add_edge(pydot.Edge(s, d))
    path.write_text(dot.to_string())


def write_onnx(plan: Plan, plan_path: Path | None, path: Path, *, force: bool = False, source=None) -> None:
    """The planned model (initial weights) as ONNX; every node carries its
    unit and block in ``doc_string`` and ``metadata_props``.

    Each unit is exported on its own and the pieces are chained with
    ``onnx.compose``, so a node's unit is known by construction (a whole-model
    export flattens the units and loses functional ops' scopes)."""
    import onnx
    from onnx import compose

    from neuroflux.runtime.assemble import assemble, open_model_file
    from neuroflux.runtime.export import export_onnx

    # Without a source the model file is opened beside the plan: nf-graph passes its path.
    asm = assemble(plan, source if source is not None else open_model_file(plan, cast(Path, plan_path), force=force))
    block_of = {u: b.index for b in plan.blocks for u in b.units}
    merged = None
    last = len(plan.units) - 1
    for i, (u, module) in enumerate(zip(plan.units, asm.units)):
        part = onnx.load_from_string(export_onnx(module, u.input_shape))
        part = compose.add_prefix(part, f"{u.name}/", rename_inputs=i > 0, rename_outputs=i < last)
        for node in part.graph.node:
            node.doc_string = f"neuroflux unit {u.name}, block {block_of[u.name]}"
            for key, value in (("neuroflux.unit", u.name), ("neuroflux.block", str(block_of[u.name]))):
                node.metadata_props.add(key=key, value=value)
        if merged is None:
            merged = part
        else:
            merged = compose.merge_models(
                merged, part, io_map=[(merged.graph.output[0].name, part.graph.input[0].name)]
            )
    assert merged is not None
    merged.graph.name = Path(plan.model.file).stem
    summary = {
        "neuroflux.budget_bytes": str(plan.budget_bytes),
        "neuroflux.budget": plan.device.budget_text,
        "neuroflux.blocks": json.dumps(
            [
                {"units": b.units, "batch_size": b.batch_size, "predicted_peak_bytes": b.predicted_peak_bytes}
                for b in plan.blocks
            ]
        ),
        "neuroflux.predicted_time_s": f"{plan.predicted.time_s:.3f}",
        "neuroflux.predicted_speedup_vs_bp": str(plan.predicted.speedup_vs_bp),
    }
    del merged.metadata_props[:]
    for k, v in summary.items():
        merged.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(merged)
    onnx.save(merged, path)


# ---------------------------------------------------------------- HTML


def _load_run(run_dir: Path | None):
    if run_dir is None:
        return None
    if not (Path(run_dir) / "summary.json").is_file():
        raise NeuroFluxError(f"--run {run_dir}: no summary.json there (is the run finished?)")
    return load_summary(run_dir)


def _head_label(aux: AuxHead | None) -> str:
    return "model head" if aux is None else f"{aux.kind} {aux.width}"


def _block_rows(plan: Plan, measured: dict, exit_acc: dict[str, float]) -> list[str]:
    """The blocks table's rows: heads (with exit accuracies after a run), batch, epochs, peak and time."""
    rows = []
    for b in plan.blocks:
        heads = ", ".join(
            f"{u}: {_head_label(plan.unit(u).aux)}" + (f" ({exit_acc[u]:.1%})" if u in exit_acc else "")
            for u in b.units
        )
        m = measured.get(b.index)
        rows.append(
            f"<tr><td>{b.index}</td><td>{html.escape(b.input_text())}</td><td>{html.escape(heads)}</td>"
            f"<td>{html.escape(b.output_text())}</td><td>{b.batch_size}</td><td>{b.epochs}</td>"
            f"<td>{format_mib(m.predicted_peak_bytes if m else b.predicted_peak_bytes)}"  # the units it trained
            + (f" / {format_mib(m.measured_peak_bytes)}" if m else "")
            + "</td>"
            f"<td>{b.predicted_time_s:.1f} s" + (f" / {m.time_s:.1f} s" if m else "") + "</td></tr>"
        )
    return rows


def _speed(b, s) -> str:
    if not (b.fits and s):
        return "does not fit the budget at any batch size"
    verdict = speed_verdict(s, bold=("<b>", "</b>"))
    return f"batch {b.batch_size}, {b.predicted_time_s:.1f} s: NeuroFlux {verdict} (predicted)"


def _run_html(run) -> str:
    if not run:
        return ""
    return (
        f"<h2>Run: {html.escape(run.method)} on {html.escape(run.device or '?')}</h2><p>final exit "
        f"<b>{html.escape(run.final_exit or '-')}</b>, val accuracy <b>{run.final_accuracy or 0:.2%}</b>, "
        f"{run.final_params or 0:,} params vs {run.original_params or 0:,} original, wall time "
        f"{run.wall_time_s or 0:.1f} s</p>"
    )


def _charts(plan: Plan, measured: dict) -> tuple[str, str]:
    """The page's two bar charts: peak memory and training time per block, predicted and measured."""
    peak_rows = [
        (
            f"block {b.index}",
            float(measured[b.index].predicted_peak_bytes if b.index in measured else b.predicted_peak_bytes),
            float(measured[b.index].measured_peak_bytes) if b.index in measured else None,
        )
        for b in plan.blocks
    ]
    time_rows = [
        (f"block {b.index}", b.predicted_time_s, measured[b.index].time_s if b.index in measured else None)
        for b in plan.blocks
    ]
    peak_svg = bar_chart(
        "Peak memory per block against the budget", peak_rows, limit=float(plan.budget_bytes), fmt=format_mib
    )
    time_svg = bar_chart("Training time per block", time_rows, limit=None, fmt=lambda v: f"{v:.1f} s")
    return peak_svg, time_svg


def write_html(plan: Plan, path: Path, *, run_dir: Path | None = None) -> None:
    run = _load_run(run_dir)
    measured = {b.index: b for b in run.blocks} if run and run.method == "neuroflux" else {}
    peak_svg, time_svg = _charts(plan, measured)
    exit_acc = run.exit_accuracies if run else {}
    rows = _block_rows(plan, measured, exit_acc)
    bl, pr = plan.baseline, plan.predicted
    run_html = _run_html(run)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>NeuroFlux plan: {html.escape(Path(plan.model.file).name)}</title>
<style>
body {{ font: 14px/1.45 system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 980px; color: #1d2433; }}
h1 {{ font-size: 22px; margin-bottom: 4px; }} h2 {{ font-size: 17px; margin-top: 28px; }}
.sub {{ color: #5a6478; }} table {{ border-collapse: collapse; width: 100%; }}
td, th {{ border-bottom: 1px solid #e3e7ef; padding: 6px 8px; text-align: left; }} th {{ background: #f4f6fa; }}
.cards {{ display: flex; gap: 14px; flex-wrap: wrap; }} .card {{ background: #f4f6fa; border-radius: 8px; padding: 10px 14px; }}
.card b {{ font-size: 18px; display: block; }}
svg .t {{ font-weight: 600; font-size: 14px; }} svg .l, svg .v {{ font-size: 12px; fill: #1d2433; }} svg .m {{ fill: #a5521b; }}
svg .pred {{ fill: #3b6fd8; }} svg .meas {{ fill: #e0873d; }} svg .limit {{ stroke: #c62828; stroke-width: 2; stroke-dasharray: 5 3; }}
svg .lim {{ fill: #c62828; }}
</style></head><body>
<h1>NeuroFlux plan: {html.escape(Path(plan.model.file).name)}</h1>
<p class="sub">budget {html.escape(plan.device.budget_text)} ({plan.budget_bytes:,} bytes, {plan.device.margin_fraction:.0%} margin),
{plan.device.kind} target, {plan.solver.strategy} strategy ({plan.solver.status}), {len(plan.units)} units in {len(plan.blocks)} blocks,
{plan.recipe.epochs_per_block} epochs per block on {plan.recipe.train_size:,} samples</p>
<div class="cards">
<div class="card">predicted time<b>{pr.time_s:.1f} s</b></div>
<div class="card">vs BP<b>{f"{pr.speedup_vs_bp:.2f}x" if pr.speedup_vs_bp else "BP does not fit"}</b></div>
<div class="card">vs BP + checkpointing<b>{f"{pr.speedup_vs_bp_checkpoint:.2f}x" if pr.speedup_vs_bp_checkpoint else "does not fit"}</b></div>
<div class="card">largest block peak<b>{format_mib(pr.peak_bytes)}</b></div>
</div>
{run_html}
<h2>Blocks</h2>
<table><tr><th>block</th><th>input</th><th>units: aux width{" (exit accuracy)" if exit_acc else ""}</th><th>output</th><th>batch</th><th>epochs</th>
<th>peak predicted{" / measured" if measured else ""}</th><th>time predicted{" / measured" if measured else ""}</th></tr>
{"".join(rows)}
</table>
<h2>Memory</h2>
{peak_svg}
<h2>Time</h2>
{time_svg}
<h2>Baselines at the same budget</h2>
<ul><li>BP: {_speed(bl.bp, pr.speedup_vs_bp)}</li><li>BP with checkpointing: {_speed(bl.bp_checkpoint, pr.speedup_vs_bp_checkpoint)}</li></ul>
<p class="sub">Blue: predicted by the planner. Orange: measured by nf-run. Red line: the budget.</p>
</body></html>
"""
    path.write_text(page)
