"""NeuroFlux: memory-budgeted CNN training with adaptive local learning.

Subpackages (each maps to a top-level folder of the repository):

- ``neuroflux.planner``: finding units on the model's torch.fx graph,
  profiling them (fake tensors), solving (a dynamic program, CP-SAT or a
  greedy heuristic) and writing plans (``nf-plan``).
- ``neuroflux.runtime``: executing plans block by block (``nf-run``). Its
  torch.fx capture (``runtime/graph.py``) is the one tracer: the planner
  traces with it too, so both cut the same graph.
- ``neuroflux.schemas``: the plan format, its JSON Schema and typed loader.
- ``neuroflux.tools``: graph export (``nf-graph``) and benchmarks (``nf-bench``).

From Python (``neuroflux.api``): ``neuroflux.plan(model, budget=...)``,
``neuroflux.train(plan, model, train_set, val_set)``, ``neuroflux.load_plan``
and ``Plan.save``.
"""

from typing import Any

from neuroflux.errors import NeuroFluxError

__version__ = "0.1.0"
__all__ = ["NeuroFluxError", "__version__", "plan", "train", "load_plan", "export_onnx", "Result"]


def __getattr__(name: str) -> Any:
    # The API loads torch and the planner only when first used.
    if name in ("plan", "train", "load_plan", "export_onnx", "Result"):
        from neuroflux import api

        return getattr(api, name)
    raise AttributeError(f"module 'neuroflux' has no attribute {name!r}")
