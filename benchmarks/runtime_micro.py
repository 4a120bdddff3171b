"""Runtime micro-benchmark: each device-efficiency option of the runtime,
before and after, on the same machine in one run.

    python benchmarks/runtime_micro.py [--device cpu|cuda] [--model resnet18:model_half] [--batch 64]

Measures, on the first block of a real plan-shaped split of the model:

- the exit/cache pass under ``torch.no_grad`` against ``torch.inference_mode``;
- one optimizer step per unit with ``foreach=False`` against ``foreach=True``
  (one multi-tensor kernel per parameter group);
- a training step in the default memory format against ``channels_last``.

Prints a table and writes JSON with ``-o``. Medians of ``--reps`` timings
after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from neuroflux.common import seconds_per_call

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="resnet18:model_half")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--units", type=int, default=3, help="first N units form the block")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)

    from torch._subclasses.fake_tensor import FakeTensorMode

    from neuroflux.planner.units import find_units, propagate_shapes
    from neuroflux.runtime.graph import split_units, trace
    from neuroflux.runtime.heads import build_head
    from neuroflux.runtime.model_file import load_model_file

    dev = torch.device(args.device)
    file, _, factory = args.model.partition(":")
    mf = load_model_file(ROOT / "examples" / f"{file}.py", factory=factory or None)
    torch.manual_seed(0)
    gm = trace(mf.build())
    shape = mf.input_shape() or (1, 32, 32)
    propagate_shapes(gm, shape, FakeTensorMode())
    spans = find_units(gm)[: args.units]
    units = [u.to(dev) for u in split_units(gm, [s.nodes for s in find_units(gm)])[: args.units]]
    heads = [build_head("pooled", s.output_shape, s.output_shape[0], 10).to(dev) for s in spans]
    x = torch.randn(args.batch, *shape, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)

    def forward_pass() -> None:
        h = x
        for u, hd in zip(units, heads):
            h = u(h)
            hd(h).argmax(1)

    def eval_no_grad() -> None:
        with torch.no_grad():
            forward_pass()

    def eval_inference() -> None:
        with torch.inference_mode():
            forward_pass()

    def train_step(opts, xb) -> None:
        h = xb
        for u, hd, opt in zip(units, heads, opts):
            out = u(h.detach())
            F.cross_entropy(hd(out), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            h = out

    def opts(foreach: bool):
        return [
            torch.optim.SGD(
                [*u.parameters(), *hd.parameters()], lr=1e-3, momentum=0.9, weight_decay=5e-4, foreach=foreach
            )
            for u, hd in zip(units, heads)
        ]

    for m in (*units, *heads):
        m.eval()
    rows = {
        "eval: no_grad": seconds_per_call(eval_no_grad, device=dev, reps=args.reps, median=True),
        "eval: inference_mode": seconds_per_call(eval_inference, device=dev, reps=args.reps, median=True),
    }
    for m in (*units, *heads):
        m.train()
    o_loop, o_each = opts(False), opts(True)
    rows["train step: SGD foreach=False"] = seconds_per_call(
        lambda: train_step(o_loop, x), device=dev, reps=args.reps, median=True
    )
    rows["train step: SGD foreach=True"] = seconds_per_call(
        lambda: train_step(o_each, x), device=dev, reps=args.reps, median=True
    )
    for m in (*units, *heads):
        m.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    rows["train step: channels_last (foreach=True)"] = seconds_per_call(
        lambda: train_step(o_each, xc), device=dev, reps=args.reps, median=True
    )

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.model}, first {args.units} units, batch {args.batch}, {name}, torch {torch.__version__}")
    for k, v in rows.items():
        print(f"  {k:45s} {v * 1e3:9.2f} ms")
    if args.output:
        Path(args.output).write_text(
            json.dumps(
                {
                    "device": name,
                    "torch": torch.__version__,
                    "model": args.model,
                    "batch": args.batch,
                    "units": args.units,
                    "median_s": rows,
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
