"""Ahead-of-time planner (``nf-plan``).

Modules, in the order a plan is made:

- ``budget``: parsing budgets (``1GB``, ``512MiB``) and NVML's free memory;
- ``units``: torch.fx tracing, cut points and units;
- ``profile``: per-unit memory (fake tensors + MemTracker) and time (FLOPs or
  measured);
- ``problem``: the plain, torch-free planning problem and its cost model;
- ``solve_cpsat`` / ``solve_greedy``: strategies returning one ``Solution`` type;
- ``build``: assembling and writing the plan; ``cli``: the command.
"""

__all__: list[str] = []
