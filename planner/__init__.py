"""Ahead-of-time planner (``nf-plan``).

Modules, in the order a plan is made:

- ``config``: ``PlanConfig``, the nested, documented options a plan is made with;
- ``budget``: parsing budgets (``1GB``, ``512MiB``) and NVML's free memory;
- ``units``: cut points and units on the traced graph (tracing itself is
  the runtime's ``runtime/graph.py``: both sides must cut the same graph);
- ``target``: the device a plan is for (speed, workspace, memory calibration);
  ``device_profile``: a device's measured speed and memory terms (``nf-profile``);
- ``profile``: per-unit memory (fake tensors, PyTorch's MemTracker
  accounting), FLOPs and op counts in one dispatch mode (``StepMeter``), or
  measured time; ``heads``: each unit's aux head options; ``jobs``: the
  model's profiling as jobs, run on this machine's cores by ``parallel``;
- ``problem``: the plain, torch-free planning problem and its cost model;
- ``solve``: choosing the engine and its fallbacks; ``solve_dp`` /
  ``solve_cpsat`` / ``solve_greedy``: strategies returning one ``Solution`` type;
- ``baselines``: BP and BP with checkpointing under the same budget;
- ``records``: the ``Plan`` records written from a solution;
- ``build``: the pipeline from a model to a plan; ``sweep``: plans over a
  range of budgets; ``cli``: the command.
"""

__all__: list[str] = []
