"""NeuroFlux: memory-budgeted CNN training with adaptive local learning.

Subpackages (each maps to a top-level folder of the repository):

- ``neuroflux.planner``: tracing (torch.fx), profiling (fake tensors), solving
  (CP-SAT) and writing plans (``nf-plan``).
- ``neuroflux.runtime``: executing plans block by block (``nf-run``).
- ``neuroflux.schemas``: the plan format, its JSON Schema and typed loader.
- ``neuroflux.tools``: graph export (``nf-graph``) and benchmarks (``nf-bench``).

From Python (``neuroflux.api``): ``neuroflux.plan(model, budget=...)``,
``neuroflux.train(plan, model, train_set, val_set)``, ``neuroflux.load_plan``
and ``Plan.save``.
"""

from neuroflux.errors import NeuroFluxError

__version__ = "0.1.0"
__all__ = ["NeuroFluxError", "__version__", "plan", "train", "load_plan", "export_onnx", "Result"]


def __getattr__(name: str):  # noqa: ANN202 - the API loads torch and the planner only when first used
    if name in ("plan", "train", "load_plan", "export_onnx", "Result"):
        from neuroflux import api

        return getattr(api, name)
    raise AttributeError(f"module 'neuroflux' has no attribute {name!r}")
