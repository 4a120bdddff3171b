"""NeuroFlux: memory-budgeted CNN training with adaptive local learning.

Subpackages (each maps to a top-level folder of the repository):

- ``neuroflux.planner``: tracing (torch.fx), profiling (fake tensors), solving
  (CP-SAT) and writing plans (``nf-plan``).
- ``neuroflux.runtime``: executing plans block by block (``nf-run``).
- ``neuroflux.schemas``: the plan format, its JSON Schema and typed loader.
- ``neuroflux.tools``: graph export (``nf-graph``) and benchmarks (``nf-bench``).
"""

from neuroflux.errors import NeuroFluxError

__version__ = "0.1.0"
__all__ = ["NeuroFluxError", "__version__"]
