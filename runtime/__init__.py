"""Lightweight runtime (``nf-run``): executes a plan block by block.

- ``model_file``: model sources (files, installed modules, model objects);
  ``graph``: fx capture and splitting into units; ``assemble``: the plan's
  units and heads built from a source; ``heads``: aux heads;
- ``data``: datasets to tensors and activation caches;
- ``train``: block-wise local learning; ``policy``: adaptive depth and
  per-block epochs; ``modules``: chains of units (the final model, BP with
  checkpointing);
- ``runner``: the block loop, exits, checkpoints and the BP baselines;
  ``checkpoint``: atomic, resumable run state;
- ``export``: ONNX and throughput; ``cli``: the command.
"""

__all__: list[str] = []
