"""``nf-plan --sweep``: one model planned at several budgets, profiled once.

A user sees where NeuroFlux pays against BP and BP with checkpointing, and
which budget is worth buying: one row per budget (``sweep.json``), a table
on the terminal and a chart (``sweep.html``, an inline SVG, no script).
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass
from pathlib import Path

from neuroflux.charts import line_chart
from neuroflux.common import format_bytes
from neuroflux.errors import NeuroFluxError
from neuroflux.planner.budget import parse_bytes

__all__ = ["SweepRow", "parse_sweep", "sweep_row", "write_sweep"]


@dataclass(frozen=True, kw_only=True)
class SweepRow:
    budget_text: str
    budget_bytes: int
    plan_file: str | None
    """None where no plan fits this budget (``error`` says why)."""
    error: str | None = None
    neuroflux_time_s: float | None = None
    """Predicted time of the written plan (widest heads within the head-time tolerance, then smaller
    batches within the batch-time tolerance)."""
    neuroflux_least_time_s: float | None = None
    """The least predicted time any plan has at this budget (the solver's proven optimum)."""
    blocks: int | None = None
    batch_sizes: list[int] | None = None
    head_params: int | None = None
    """Parameters of all aux heads: what the early exits add to the model."""
    model_params: int | None = None
    bp_batch: int | None = None
    bp_time_s: float | None = None
    bp_checkpoint_batch: int | None = None
    bp_checkpoint_time_s: float | None = None


def parse_sweep(spec: str) -> list[tuple[int, str]]:
    """``100MB,200MB,1GB`` (a list) or ``100MB:1GB:5`` (5 budgets spaced
    evenly on a log scale, both ends included); ascending, distinct."""
    spec = spec.strip()
    if ":" in spec:
        parts = spec.split(":")
        if len(parts) != 3 or not parts[2].strip().isdigit() or int(parts[2]) < 2:
            raise NeuroFluxError(f"--sweep {spec!r}: a range is LOW:HIGH:COUNT with COUNT >= 2, e.g. 100MB:1GB:5")
        lo, hi, n = (
            parse_bytes(parts[0], what="sweep budget"),
            parse_bytes(parts[1], what="sweep budget"),
            int(parts[2]),
        )
        if hi <= lo:
            raise NeuroFluxError(f"--sweep {spec!r}: HIGH must be larger than LOW")
        values = [round(lo * (hi / lo) ** (i / (n - 1))) for i in range(n)]
        budgets = [(v, format_bytes(v).replace(" ", "")) for v in values]
    else:
        texts = [t.strip() for t in spec.split(",") if t.strip()]
        if not texts:
            raise NeuroFluxError("--sweep needs budgets, e.g. 100MB,200MB,1GB or 100MB:1GB:5")
        budgets = sorted((parse_bytes(t, what="sweep budget"), t) for t in texts)
    if len({b for b, _ in budgets}) != len(budgets):
        raise NeuroFluxError(f"--sweep {spec!r} lists a budget twice")
    return budgets


def sweep_row(result, text: str, nbytes: int, plan_file: str | None) -> SweepRow:
    """A row from a PlanResult (or the error where the budget had none)."""
    if isinstance(result, Exception):
        return SweepRow(budget_text=text, budget_bytes=nbytes, plan_file=None, error=str(result))
    plan = result.plan
    least = plan.solver.lower_bound_s if plan.solver.status == "optimal" else None
    bp, ck = plan.baseline.bp, plan.baseline.bp_checkpoint
    return SweepRow(
        budget_text=text,
        budget_bytes=nbytes,
        plan_file=plan_file,
        neuroflux_time_s=plan.predicted.time_s,
        neuroflux_least_time_s=least,
        blocks=len(plan.blocks),
        batch_sizes=[b.batch_size for b in plan.blocks],
        head_params=sum(u.aux.params for u in plan.units if u.aux is not None),
        model_params=plan.model.params,
        bp_batch=bp.batch_size if bp.fits else None,
        bp_time_s=bp.predicted_time_s if bp.fits else None,
        bp_checkpoint_batch=ck.batch_size if ck.fits else None,
        bp_checkpoint_time_s=ck.predicted_time_s if ck.fits else None,
    )


def write_sweep(rows: list[SweepRow], out_dir: Path, *, model: str) -> None:
    """``sweep.json`` and ``sweep.html`` in ``out_dir``."""
    from neuroflux.common import atomic_write_json

    atomic_write_json({"model": model, "rows": [asdict(r) for r in rows]}, out_dir / "sweep.json")
    (out_dir / "sweep.html").write_text(_html(rows, model))


def _html(rows: list[SweepRow], model: str) -> str:
    series = {
        "NeuroFlux": ("neuroflux_time_s", "#1b7837"),
        "BP": ("bp_time_s", "#b2182b"),
        "BP + checkpointing": ("bp_checkpoint_time_s", "#2166ac"),
    }
    columns = [(name, colour, [getattr(r, field) for r in rows]) for name, (field, colour) in series.items()]
    if not any(t for _, _, ts in columns for t in ts):
        chart = "<p>No budget had a plan.</p>"
    else:
        chart = line_chart(
            ticks=[(r.budget_text, r.budget_bytes) for r in rows],
            series=columns,
            x_title="budget (log scale)",
            y_title="predicted time (s)",
        )
    head = (
        "<tr><th>budget</th><th>NeuroFlux s</th><th>least s</th><th>blocks</th><th>batches</th>"
        "<th>head params</th><th>BP batch</th><th>BP s</th><th>BP+ckpt batch</th><th>BP+ckpt s</th></tr>"
    )

    def cell(v: object, fmt: str = "{}") -> str:
        return "-" if v is None else html.escape(fmt.format(v))

    body = "\n".join(
        f"<tr><td>{html.escape(r.budget_text)}</td>"
        + (
            f'<td colspan="9">{html.escape(r.error or "")}</td></tr>'
            if r.error
            else f"<td>{cell(r.neuroflux_time_s, '{:.1f}')}</td><td>{cell(r.neuroflux_least_time_s, '{:.1f}')}</td>"
            f"<td>{cell(r.blocks)}</td><td>{cell(','.join(map(str, r.batch_sizes or [])))}</td>"
            f"<td>{cell(r.head_params, '{:,}')}</td><td>{cell(r.bp_batch)}</td><td>{cell(r.bp_time_s, '{:.1f}')}</td>"
            f"<td>{cell(r.bp_checkpoint_batch)}</td><td>{cell(r.bp_checkpoint_time_s, '{:.1f}')}</td></tr>"
        )
        for r in rows
    )
    return (
        f"<!doctype html><meta charset='utf-8'><title>NeuroFlux budget sweep: {html.escape(model)}</title>"
        f"<h1>Budget sweep: {html.escape(model)}</h1>{chart}<table border='1' cellpadding='4'>{head}{body}</table>"
        "<p>Predicted times; NeuroFlux's assume no early stop (adaptive depth only shortens them). "
        "The final model's size is decided in training, where adaptive depth stops.</p>"
    )
