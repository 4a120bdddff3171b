"""Lightweight runtime (``nf-run``): executes a plan block by block.

- ``model_file``: model sources (files, installed modules, model objects);
  ``graph``: fx capture and splitting into units; ``assemble``: the plan's
  units and heads built from a source; ``heads``: aux heads;
- ``data``: datasets to tensors and activation caches;
- ``train``: block-wise local learning; ``policy``: adaptive depth and
  per-block epochs; ``modules``: chains of units (the final model, BP with
  checkpointing);
- ``runner``: the run loop (stages, epochs, steps) for NeuroFlux and the BP
  baselines; ``config``: what a run is asked to do (``RunConfig``) and the
  exit policy it applies; ``stages``: the stages built from the plan, the
  steps and predicted time of an epoch; ``run_state``: the run's progress
  (typed, and its JSON form);
- ``run_dir``: the run directory (lock, resume checks, metrics, links
  refused); ``checkpoint``: ``checkpoint.pt`` (plan key, save, safe load,
  restore); ``memory``: the budget on the device (checks, allocator cap,
  measured peaks); ``passes``: work without training (exit evaluation,
  cache writing, recomputed prefixes); ``caches``: the block caches (files,
  digests, freeing, reopening after a resume); ``finish``: exit choice,
  export and ``summary.json``;
- ``export``: ONNX and throughput; ``progress``: progress bars; ``cli``:
  the command.
"""

__all__: list[str] = []
