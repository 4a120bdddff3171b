"""The polish of one exit of a finished NeuroFlux run, measured without
training the run again: its checkpoint's locally trained units and heads,
polished by the runtime's own ``polish_exit`` as a plan made with
``--polish`` specifies (batch, steps, rate). Same seed, same plan blocks:
the same weights a run of the ``--polish`` plan would polish.

    python benchmarks/polish_exit.py --run RUN_DIR --plan PLAN_OF_THE_RUN \\
        --polish-plan PLAN_WITH_POLISH --exit u4 -o result.json

``NEUROFLUX_DATA`` / ``NEUROFLUX_LIMIT`` as for the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from neuroflux.runtime.assemble import assemble, open_model_file
from neuroflux.runtime.checkpoint import load_checkpoint
from neuroflux.runtime.data import dataset_sources
from neuroflux.runtime.distributed import from_env
from neuroflux.runtime.polish import polish_exit
from neuroflux.runtime.precision import Precision
from neuroflux.schemas.plan import load_plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory of a finished NeuroFlux run (its checkpoint.pt)")
    ap.add_argument("--plan", required=True, help="the plan that run trained")
    ap.add_argument("--polish-plan", required=True, help="a plan of the same blocks made with --polish")
    ap.add_argument("--exit", required=True, help="the exit to polish, e.g. u4")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    plan, polish_plan = load_plan(args.plan), load_plan(args.polish_plan)
    if [b.units for b in plan.blocks] != [b.units for b in polish_plan.blocks]:
        raise SystemExit("the two plans' blocks differ: the polish plan must be made with the run's flags")
    mf = open_model_file(plan, Path(args.plan), force=False)
    asm = assemble(plan, mf)
    ckpt = load_checkpoint(Path(args.run) / "checkpoint.pt")
    asm.model.load_state_dict(ckpt["model"])
    for h, hs in zip(asm.heads, ckpt["heads"]):
        if h is not None and hs is not None:
            h.load_state_dict(hs)
    dist = from_env("cpu")
    data = dataset_sources(*mf.datasets(), polish_plan, dist=dist, workers=0, check_sizes=True)
    t0 = time.perf_counter()
    result = polish_exit(
        polish_plan,
        asm,
        args.exit,
        data=data,
        augment=mf.augment(),
        device=torch.device("cpu"),
        dist=dist,
        precision=Precision(plan.recipe.precision, "cpu"),
    )
    assert result is not None, f"the polish plan has no polish of {args.exit}"
    record = {
        "run": args.run,
        "plan": args.plan,
        "polish_plan": args.polish_plan,
        "exit": args.exit,
        "exit_params": plan.exit_params(args.exit),
        "model_params": plan.model.params,
        "wall_s": time.perf_counter() - t0,
        "polish": dataclasses.asdict(result),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["polish"], indent=1))


if __name__ == "__main__":
    main()
