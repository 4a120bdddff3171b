"""Where a CUDA training step's memory goes beyond tensors a plan models.

    python benchmarks/gpu_memory_probe.py -o probe.json

Measures, on the current CUDA device, what ``torch.cuda.max_memory_allocated``
counts around one SGD step of ResNet-18 (Fashion-MNIST shape) at batch 16:
the library workspaces (cuBLAS, cuDNN) that the caching allocator hands out
and the planner's fake-tensor trace never sees. Each configuration runs in a
fresh process, since workspaces are per process."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, torch
sys.path.insert(0, os.path.join(os.getcwd(), "examples"))
from resnet18 import model
torch.backends.cudnn.benchmark = os.environ.get("PROBE_BENCH") == "1"
dev = torch.device("cuda")
out = {}
a = torch.randn(64, 64, device=dev); b = torch.randn(64, 64, device=dev)
torch.cuda.synchronize(); base = torch.cuda.memory_allocated()
(a @ b).sum().item(); torch.cuda.synchronize()
out["after_matmul_allocated"] = torch.cuda.memory_allocated() - base
m = model().to(dev)
opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
x = torch.randn(int(os.environ.get("PROBE_BATCH", "16")), 1, 28, 28, device=dev)
y = torch.randint(0, 10, (x.shape[0],), device=dev)
params = sum(p.numel() * p.element_size() for p in m.parameters())
for i in range(3):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); start = torch.cuda.memory_allocated()
    loss = torch.nn.functional.cross_entropy(m(x), y); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    out[f"step{i}"] = {"start": start, "peak": torch.cuda.max_memory_allocated(), "end": torch.cuda.memory_allocated(),
                       "reserved": torch.cuda.max_memory_reserved()}
out["param_bytes"] = params
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", default="gpu-memory-probe.json")
    args = ap.parse_args()
    configs = {
        "default": {},
        "cudnn_benchmark": {"PROBE_BENCH": "1"},
        "cublas_workspace_0": {"CUBLAS_WORKSPACE_CONFIG": ":0:0"},
        "batch128": {"PROBE_BATCH": "128"},
    }
    res = {}
    for name, env in configs.items():
        p = subprocess.run(
            [sys.executable, "-c", CHILD], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
        )
        res[name] = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": p.stderr[-800:]}
        print(name, json.dumps(res[name]), flush=True)
    import torch

    res["device"] = torch.cuda.get_device_name(0)
    res["torch"] = torch.__version__
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
