"""``nf-graph plan.json -o plan.onnx|plan.dot|plan.graphml|plan.html``: views of a plan.

    nf-graph plan.json -o plan.html [--run runs/DIR]   # blocks, memory against the budget, a run's measurements
    nf-graph plan.json -o plan.onnx                     # the model, every node tagged with its unit and block
    nf-graph plan.json -o plan.dot                      # the traced graph, one cluster per block and unit
    nf-graph plan.json -o plan.graphml                  # the same graph for networkx, yEd or Gephi
    nf-graph plan.json -o view.txt --format dot         # the format from the flag, not the file's extension

DOT, GraphML and HTML are drawn from the plan alone (the model file is
checked by its hash, never run); the ONNX view imports the model file and
exports it, so it runs that file's code, like nf-run. A model file changed
since planning is refused (the plan may be stale); ``--force`` goes ahead.

Exit status: 0 when the view is written, 2 on a usage error (a bad plan, a
changed model file, an output that cannot be written). The views themselves
are drawn by ``graph.py``; this module parses the flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neuroflux.errors import NeuroFluxError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nf-graph", description="Show a NeuroFlux plan as ONNX, DOT, GraphML or HTML.")
    ap.add_argument("plan", help="plan file written by nf-plan")
    ap.add_argument("-o", "--output", required=True, help="output file; the format comes from its extension")
    ap.add_argument("--format", choices=["onnx", "dot", "graphml", "html"], default=None)
    ap.add_argument(
        "--run", default=None, help="run directory of nf-run: overlay measured peak, time and exit accuracy (html)"
    )
    ap.add_argument("--force", action="store_true", help="export even if the model file changed since planning")
    args = ap.parse_args(argv)
    try:
        from neuroflux.runtime.assemble import check_model_file
        from neuroflux.schemas import load_plan
        from neuroflux.tools import graph

        out = Path(args.output)
        fmt = graph.format_for(out, args.format)
        if out.is_dir():
            raise NeuroFluxError(f"-o {out} is a directory; give a file name such as {out / ('plan.' + fmt)}")
        if out.parent and not out.parent.is_dir():
            if out.parent.exists():
                raise NeuroFluxError(f"-o {out}: {out.parent} is not a directory")
            out.parent.mkdir(parents=True)  # a new folder for the views, as nf-plan -o does
        plan = load_plan(args.plan)
        if plan.model.source == "object":  # no file to check: the views but ONNX need only the plan
            if fmt == "onnx":
                raise NeuroFluxError(
                    f"this plan was made in Python from a {plan.model.file} object; its ONNX view needs the object: "
                    "neuroflux.export_onnx(plan, model, 'plan.onnx') (DOT, GraphML and HTML need only the plan)"
                )
        else:
            # Every view describes the model file; a changed one means a stale plan. Checked by hash: only
            # the ONNX view runs the file (write_onnx opens it).
            check_model_file(plan, Path(args.plan), force=args.force)
        if fmt == "onnx":
            graph.write_onnx(plan, Path(args.plan), out, force=True)
        elif fmt == "dot":
            graph.write_dot(plan, out)
        elif fmt == "graphml":
            graph.write_graphml(plan, out)
        else:
            graph.write_html(plan, out, run_dir=Path(args.run) if args.run else None)
    except NeuroFluxError as e:
        print(f"nf-graph: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # -o onto a directory, an unwritable place, a full disk
        print(
            f"nf-graph: error: cannot write {args.output} ({e.strerror or e}); choose a writable -o file",
            file=sys.stderr,
        )
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
