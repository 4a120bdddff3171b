"""Host memory on CPU: freed large blocks are kept for the next step
(``runtime.host_memory``), so a step does not fault its activations in fresh."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Allocate, fill and free a 96 MiB tensor ten times, as a training step does its activations every step, and
# print the minor page faults per pass. Measured in the steady state: with the thresholds raised, the first
# passes still grow the heap (each aligned allocation asks a little more than the block the last one freed,
# until freed neighbours coalesce: 2 to 7 passes on the 2-core EPYC), as a run's first steps do.
_PROBE = """
import json, resource, sys, torch
from neuroflux.runtime.host_memory import host_memory_setting, keep_freed_host_memory
applied = keep_freed_host_memory()
n = 96 * (1 << 20) // 4
for _ in range(16):
    x = torch.ones(n)
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = torch.ones(n)
    del x
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"applied": applied, "setting": host_memory_setting(), "faults": faults}))
"""


def _probe(setting: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NEUROFLUX_HOST_MEMORY"}
    if setting is not None:
        env["NEUROFLUX_HOST_MEMORY"] = setting
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's (mallopt)")
def test_kept_memory_is_reused_without_page_faults() -> None:
    kept, default = _probe(None), _probe("default")
    assert kept["applied"] and kept["setting"] == "kept"
    assert not default["applied"] and default["setting"] == "default"
    pages = 96 * (1 << 20) / 4096
    # glibc's default maps a 96 MiB block fresh at every allocation: a fault per page.
    assert default["faults"] > 0.5 * pages
    assert kept["faults"] < 0.1 * pages, kept
