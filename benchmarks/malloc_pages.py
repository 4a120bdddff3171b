"""The CPU cost of tensors over glibc's mmap threshold: a training step whose
feature maps outgrow 32 MiB, timed with glibc's default allocator settings
with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, and with freed memory kept
(``runtime.host_memory``, what nf-run and the planner's profiling do on a
CPU), each in a fresh process.

    python benchmarks/malloc_pages.py [--batches 32 48 64 96] [--steps 12] [-o out.json]

glibc serves every allocation above its mmap threshold (at most 32 MiB on
64-bit Linux) with a fresh ``mmap``, so each such tensor pays a page fault
per 4 KiB page when first written, at every step. The step here is a
MobileNetV2-style inverted residual at 32x32 (24 -> 144 -> 24 channels,
BatchNorm, ReLU6, a 3x3 depthwise convolution) with a pooled linear head,
SGD with momentum: one 144-channel map is 576 KiB per sample, so 32 MiB at
batch 57. Figures: microseconds per sample, the best of three passes of
``--steps`` steps after a warm-up, per setting, interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

#: name -> (GLIBC_TUNABLES, NEUROFLUX_HOST_MEMORY)
SETTINGS = {
    "glibc default": (None, "default"),
    "glibc.malloc.hugetlb=1": ("glibc.malloc.hugetlb=1", "default"),
    "freed memory kept (nf-run)": (None, "kept"),
}


def _child(batches: list[int], steps: int) -> dict[int, float]:
    import torch
    from torch import nn

    from neuroflux.runtime.host_memory import HOST_MEMORY_ENV, keep_freed_host_memory

    if os.environ.get(HOST_MEMORY_ENV) == "kept":
        assert keep_freed_host_memory(), "this C library has no mallopt"
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(24, 144, 1, bias=False),
        nn.BatchNorm2d(144),
        nn.ReLU6(),
        nn.Conv2d(144, 144, 3, padding=1, groups=144, bias=False),
        nn.BatchNorm2d(144),
        nn.ReLU6(),
        nn.Conv2d(144, 24, 1, bias=False),
        nn.BatchNorm2d(24),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(24 * 16, 10),
    )
    opt = torch.optim.SGD(body.parameters(), lr=0.01, momentum=0.9)
    out: dict[int, float] = {}
    for b in batches:
        x, y = torch.randn(b, 24, 32, 32), torch.randint(0, 10, (b,))

        def step(x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            nn.functional.cross_entropy(body(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            best = min(best, (time.perf_counter() - t0) / (steps * b))
        out[b] = round(1e6 * best, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 48, 64, 96])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2, help="each setting runs this many times, interleaved")
    ap.add_argument("-o", "--out", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.batches, args.steps)))
        return 0
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, (tunable, host_memory) in SETTINGS.items():
            env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
            env["NEUROFLUX_HOST_MEMORY"] = host_memory
            if tunable:
                env["GLIBC_TUNABLES"] = tunable
            cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps), "--batches"]
            res = subprocess.run([*cmd, *map(str, args.batches)], env=env, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(res.stdout))
            print(f"{name}: {runs[name][-1]} us/sample", flush=True)
    best = {name: {b: min(r[str(b)] for r in rs) for b in args.batches} for name, rs in runs.items()}
    record = {
        "machine": platform.processor() or platform.machine(),
        "libc": " ".join(platform.libc_ver()),
        "us_per_sample_best": best,
        "runs": runs,
        "batches": args.batches,
        "steps": args.steps,
    }
    print(json.dumps(best, indent=1))
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
