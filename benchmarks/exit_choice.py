"""Another exit of a finished NeuroFlux run, from its checkpoint: parameters,
val accuracy (as recorded by the run) and inference throughput of the
network cut there, against the original. No retraining: the same weights.

    python benchmarks/exit_choice.py PLAN RUN_DIR --exit u4 [--device cpu]

Used in BENCHMARKS.md to compare the exit rules (best vs shallowest within
the tolerance) on one run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan")
    ap.add_argument("run_dir")
    ap.add_argument("--exit", required=True, help="unit name, e.g. u4")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    from neuroflux.runtime.assemble import assemble, open_model_file
    from neuroflux.runtime.checkpoint import load_checkpoint
    from neuroflux.runtime.export import throughput
    from neuroflux.runtime.modules import Chain
    from neuroflux.schemas import load_plan

    plan = load_plan(args.plan)
    asm = assemble(plan, open_model_file(plan, Path(args.plan)))
    ckpt = load_checkpoint(Path(args.run_dir) / "checkpoint.pt")
    asm.model.load_state_dict(ckpt["model"])
    for h, hs in zip(asm.heads, ckpt["heads"]):
        if h is not None and hs is not None:
            h.load_state_dict(hs)
    k = plan.unit(args.exit).index
    final = Chain(asm.units[: k + 1], asm.heads[k])
    summary = json.loads((Path(args.run_dir) / "summary.json").read_text())
    dev = torch.device(args.device)
    shape = plan.model.input_shape
    params = sum(p.numel() for p in final.parameters())
    original = sum(p.numel() for p in asm.model.parameters())
    tp_final, tp_orig = throughput(final, shape, device=dev), throughput(asm.model, shape, device=dev)
    out = {
        "exit": args.exit,
        "val_accuracy": summary["exit_accuracies"].get(args.exit),
        "params": params,
        "original_params": original,
        "param_reduction": original / params,
        "inference_gain": tp_final / tp_orig,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
