"""Lightweight runtime (``nf-run``): executes a plan block by block.

- ``model_file``: loading the user's model file; ``graph``: fx tracing and
  splitting into units; ``heads``: aux heads;
- ``data``: datasets to tensors and activation caches;
- ``train``: block-wise local learning; ``baselines``: BP and BP with
  checkpointing; ``checkpoint``: atomic, resumable run state;
- ``export``: the final early-exit model (state dict, ONNX); ``cli``: the command.
"""

__all__: list[str] = []
