"""Ahead-of-time planner (``nf-plan``).

Modules, in the order a plan is made:

- ``budget``: parsing budgets (``1GB``, ``512MiB``) and NVML's free memory;
- ``units``: cut points and units on the traced graph (tracing itself is
  the runtime's ``runtime/graph.py``: both sides must cut the same graph);
- ``profile``: per-unit memory (fake tensors, PyTorch's MemTracker
  accounting), FLOPs and op counts in one dispatch mode (``StepMeter``), or
  measured time; ``parallel``: profiling over this machine's cores;
- ``device_profile``: a device's speed and memory terms (``nf-profile``);
- ``problem``: the plain, torch-free planning problem and its cost model;
- ``solve_dp`` / ``solve_cpsat`` / ``solve_greedy``: strategies returning one
  ``Solution`` type;
- ``build``: assembling and writing the plan; ``sweep``: plans over a range
  of budgets; ``cli``: the command.
"""

__all__: list[str] = []
