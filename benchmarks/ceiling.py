"""The ceiling check of an early exit: the same prefix and head, trained end to end.

    python benchmarks/ceiling.py --plan PLAN --exit u3 --seeds 0 1 --limit 20000,10000 -o OUT.json

NeuroFlux keeps the network up to its best exit with that exit's head. Trained
end to end with backpropagation, at the BP baseline's batch size, learning rate
and epochs (the plan's recipe), that same small model shows how far local
learning could get at that size: if even it lands below BP, the exit needs a
stronger head or a deeper prefix, not better local learning (issue 19).

Writes each seed's validation accuracy after every epoch and the wall time.
The data is the plan's model file's ``datasets()`` (``$NEUROFLUX_DATA`` for the
full Fashion-MNIST file), limited by ``--limit`` as nf-bench limits it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from neuroflux.runtime.assemble import assemble, open_model_file
from neuroflux.runtime.datasets import LIMIT_ENV
from neuroflux.runtime.heads import build_head
from neuroflux.runtime.modules import Chain
from neuroflux.runtime.train import UnitTrainer
from neuroflux.schemas.plan import load_plan


@torch.no_grad()
def accuracy(model: torch.nn.Module, val, *, batch: int = 512) -> float:
    model.eval()
    correct = seen = 0
    for x, y in torch.utils.data.DataLoader(val, batch_size=batch):
        correct += int((model(x).argmax(1) == y).sum())
        seen += len(y)
    model.train()
    return correct / seen


def train_prefix(plan_path: Path, exit_name: str, seed: int, *, head: str | None = None) -> dict:
    plan = load_plan(plan_path)
    mf = open_model_file(plan, plan_path)
    asm = assemble(plan, mf, seed=seed)
    k = plan.unit(exit_name).index
    exit_head = asm.heads[k]
    if head is not None:  # another head on the same prefix: KIND:WIDTH
        kind, width = head.split(":")
        torch.manual_seed(seed + 1)
        exit_head = build_head(kind, plan.units[k].output_shape, int(width), plan.model.num_classes)
    model = Chain(asm.units[: k + 1], exit_head)
    base, r = plan.baseline.bp, plan.recipe
    train, val = mf.datasets()
    steps_per_epoch = -(-len(train) // base.batch_size)
    trainer = UnitTrainer(
        model,
        None,
        lr=base.lr,
        momentum=r.momentum,
        weight_decay=r.weight_decay,
        total_steps=base.epochs * steps_per_epoch,
        schedule=r.schedule,
    )
    trainer.train(True)
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train, batch_size=base.batch_size, shuffle=True, generator=gen)
    t0, epochs = time.perf_counter(), []
    for epoch in range(base.epochs):
        for x, y in loader:
            trainer.step(x, y)
        epochs.append({"epoch": epoch, "val_acc": accuracy(model, val), "elapsed_s": time.perf_counter() - t0})
        print(json.dumps({"seed": seed, **epochs[-1]}), flush=True)
    return {
        "seed": seed,
        "exit": exit_name,
        "head": head or "the plan's",
        "params": sum(p.numel() for p in model.parameters()),
        "batch_size": base.batch_size,
        "lr": base.lr,
        "epochs": epochs,
        "final_val_acc": epochs[-1]["val_acc"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", required=True, type=Path)
    ap.add_argument("--exit", required=True, help="the unit whose exit to train end to end, e.g. u3")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--head", default=None, help="KIND:WIDTH, another exit head (default: the plan's for that unit)")
    ap.add_argument("--limit", default=None, help="TRAIN[,VAL]: first samples only (as nf-bench's cells)")
    ap.add_argument("-o", "--out", required=True, type=Path)
    args = ap.parse_args()
    if args.limit:
        os.environ[LIMIT_ENV] = args.limit
    runs = [train_prefix(args.plan, args.exit, s, head=args.head) for s in args.seeds]
    out = {
        "command": " ".join(["python", "benchmarks/ceiling.py", *sys.argv[1:]]),
        "device": f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "runs": runs,
        "mean_final_val_acc": sum(r["final_val_acc"] for r in runs) / len(runs),
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
