"""Several processes (and GPUs, and machines) with torchrun: data-parallel
blocks on PyTorch's own ``torch.distributed``.

``torchrun --standalone --nproc-per-node N $(which nf-run) plan.json`` sets
``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` and the rendezvous; ``from_env``
joins the process group (NCCL on CUDA, gloo on the CPU) with a timeout on
every collective, so that when one process dies the others stop with a
message instead of hanging.

What each rank does (``runtime/runner.py``):
- trains every block at the plan's batch on its shard of the data (the
  global batch is N x batch; the per-device budget holds because the
  per-rank batch is the plan's), all-reducing (averaging) its units'
  gradients before each optimizer step: the same update as one process
  taking the mean of the N ranks' losses (BatchNorm normalises each rank's
  batch on its own, as with DistributedDataParallel, and rank 0's running
  statistics are broadcast before every evaluation and cache write);
- holds only its shard of every block's input and output cache (host RAM or
  disk per rank falls by N);
- evaluates exits on its shard of the validation set and all-reduces the
  correct and total counts, so accuracies are those of one process;
- rank 0 alone writes checkpoints, metrics, ``summary.json`` and the final
  model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch

from neuroflux.errors import NeuroFluxError

__all__ = ["Dist", "from_env", "TIMEOUT_ENV", "shard_indices"]

#: Seconds a collective may wait for the other ranks (default 300).
TIMEOUT_ENV = "NEUROFLUX_DIST_TIMEOUT"


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def average_grads(self, params: Sequence[torch.Tensor]) -> None:
        """All-reduce the gradients of ``params`` (those that have one) and
        divide by the world size, in one flat buffer per call."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.enabled or not grads:
            return
        import torch.distributed as dist

        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_buffers(self, modules: Sequence[torch.nn.Module]) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank, as
        DistributedDataParallel's ``broadcast_buffers`` keeps them: each rank
        normalises its own batch while training, and every rank evaluates
        and writes caches with the same model."""
        if not self.enabled:
            return
        import torch.distributed as dist

        for m in modules:
            for b in m.buffers():
                dist.broadcast(b, src=0)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over ranks (in place; ``t`` itself on one process)."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    @staticmethod
    def is_collective_failure(e: BaseException) -> bool:
        """Whether ``e`` is a collective that failed because another rank is
        gone: torch.distributed's own errors, and gloo's, which arrive as a
        plain RuntimeError ("Connection closed by peer", "Timed out")."""
        import torch.distributed as dist

        text = str(e).lower()
        return isinstance(e, dist.DistError) or any(k in text for k in ("gloo", "nccl", "connection", "timed out"))

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def from_env(device_type: str) -> Dist:
    """Join torchrun's process group if this process was started by it
    (``WORLD_SIZE`` > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        timeout = float(os.environ.get(TIMEOUT_ENV, "300"))
        try:
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
        except Exception as e:  # a rendezvous that never completes, a port in use
            raise NeuroFluxError(
                f"could not join the torchrun process group ({type(e).__name__}: {e}); check "
                "torchrun's --nproc-per-node / --nnodes and rendezvous flags"
            ) from e
    return Dist(rank=dist.get_rank(), world=dist.get_world_size())


def shard_indices(n: int, dist: Dist, *, equal: bool) -> torch.Tensor:
    """Rank ``r``'s samples: ``r, r + N, r + 2N, ...``. ``equal``: every rank
    gets ``n // N`` (training: each rank must take the same number of steps,
    so the last ``n % N`` samples are left out); else all ``n`` are covered
    (evaluation: counts are summed over ranks)."""
    idx = torch.arange(dist.rank, n, dist.world)
    return idx[: n // dist.world] if equal else idx
