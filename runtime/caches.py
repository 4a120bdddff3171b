"""A run's block caches: the outputs of finished blocks that later blocks
read (in RAM, or in files in the run directory, one per rank under
torchrun), with a digest of each file; freed once no later block reads
them, and opened again, or recomputed, after a resume."""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import Any

import torch

from neuroflux.runtime.assemble import Assembled
from neuroflux.runtime.data import TensorCache, labels_file, numpy_dtype
from neuroflux.runtime.distributed import Dist
from neuroflux.runtime.modules import Chain
from neuroflux.runtime.passes import cache_through, write_cache
from neuroflux.runtime.precision import Precision
from neuroflux.runtime.run_dir import confined_path
from neuroflux.runtime.run_state import RunState
from neuroflux.runtime.stages import Stage
from neuroflux.schemas.plan import Plan

__all__ = ["BlockCaches", "KEEP_CACHES_ENV"]

log = logging.getLogger(__name__)

KEEP_CACHES_ENV = "NEUROFLUX_KEEP_CACHES"
"""Set to 1 to keep disk caches after the last block that reads them (for
inspection); by default they are deleted then, as the plan's disk budget assumes."""


class BlockCaches:
    """This rank's caches: ``sources[j]`` is block ``j``'s output as (train,
    val) sources; ``sources[None]`` the dataset."""

    def __init__(
        self, plan: Plan, *, run_dir: Path, dist: Dist, device: torch.device, dataset: tuple[Any, Any]
    ) -> None:
        self.plan, self.run_dir, self.dist, self.device = plan, run_dir, dist, device
        self.sources: dict[int | None, tuple[Any, Any]] = {None: dataset}

    def file(self, index: int, spec: Any) -> Path:
        """Block ``index``'s disk cache (``spec``: the plan's CacheSpec): the
        plan's file, one per rank when data-parallel, confined to the run
        directory (no ``..``, no absolute path, no symbolic link on the way)."""
        rel = Path(spec.file or f"cache/block{index}.npy")
        if self.dist.enabled:
            rel = rel.with_name(f"{rel.stem}.rank{self.dist.rank}{rel.suffix}")
        return confined_path(self.run_dir, str(rel))

    def write(self, stage: Stage, train: Any, val: Any, *, state: RunState) -> None:
        """The trained ``stage``'s outputs: the cache later blocks read (its digest recorded in ``state``)."""
        path = self.file(stage.index, stage.cache) if stage.cache.location == "disk" else None
        self.sources[stage.index] = write_cache(
            stage, train, val, plan=self.plan, path=path, device=self.device, dist=self.dist
        )
        self._record_digest(state, stage.index, stage.cache)

    def drop(self, stages: list[Stage], *, after: Stage) -> None:
        """Free the caches no later block reads (RAM, and disk files once the
        checkpoint no longer needs them): the plan's host budgets count a
        block's source and output caches only."""
        needed = _needed(stages, stages.index(after))
        for j in [j for j in self.sources if j is not None and j not in needed]:
            del self.sources[j]
            spec = self.plan.blocks[j].cache
            # Each rank deletes its own files.
            if spec is not None and spec.location == "disk" and os.environ.get(KEEP_CACHES_ENV) != "1":
                path = self.file(j, spec)
                path.unlink(missing_ok=True)
                labels_file(path).unlink(missing_ok=True)
        gc.collect()

    @torch.inference_mode()
    def restore(self, stages: list[Stage], *, start: int, asm: Assembled, state: RunState) -> None:
        """The caches of finished blocks that the remaining stages read, after
        a resume: a disk cache whose file is intact is opened; any other is
        recomputed from the dataset through the finished blocks (inference
        only, no training). A block not trained yet writes its cache when it
        has trained, as in an uninterrupted run."""
        raw = self.sources[None]
        n_train, n_val = len(raw[0]), len(raw[1])
        finished = {s.index for s in stages[:start]}
        for j in sorted(_needed(stages, start - 1) & finished):
            spec, blk = self.plan.blocks[j].cache, self.plan.blocks[j]
            assert spec is not None  # a stage reads from block j's cache
            shape = tuple(self.plan.unit(blk.units[-1]).output_shape)
            if spec.location == "disk":
                opened = self._open_disk(
                    j, spec, shape, n_train + n_val, digest=state.cache_digests.get(self._digest_key(j))
                )
                if opened is not None:
                    x, y = opened
                    out = Precision.of(self.plan.recipe, self.device.type).dtype
                    self.sources[j] = (
                        TensorCache(x[:n_train], y[:n_train], out_dtype=out),
                        TensorCache(x[n_train:], y[n_train:], out_dtype=out),
                    )
                    continue
            log.info("recomputing the output cache of block %d from the finished blocks", j)
            last = self.plan.unit(blk.units[-1]).index
            chain = Chain(asm.units[: last + 1]).to(self.device).eval()
            path = self.file(j, spec) if spec.location == "disk" else None
            self.sources[j] = cache_through(
                chain,
                raw[0],
                raw[1],
                plan=self.plan,
                index=j,
                spec=spec,
                path=path,
                batch=blk.batch_size,
                device=self.device,
                precision=Precision.of(self.plan.recipe, self.device.type),
            )
            self._record_digest(state, j, spec)
            chain.to("cpu")

    def _record_digest(self, state: RunState, index: int, spec: Any) -> None:
        if spec is not None and spec.location == "disk":
            state.cache_digests[self._digest_key(index)] = _file_digest(self.file(index, spec))

    def _digest_key(self, index: int) -> str:
        """Rank 0 saves the state: other ranks' files have no digest there (and are size-checked only)."""
        return str(index) if self.dist.main else f"{index}.rank{self.dist.rank}"

    def _open_disk(self, index: int, spec: Any, shape: tuple[int, ...], n: int, *, digest: str | None) -> Any:
        """Block ``index``'s cache file as a memmap and its labels, or None
        (with a warning) when either is missing, not a regular file,
        truncated or of another shape or dtype: then the cache is rebuilt,
        never read as garbage."""
        import numpy as np

        path = self.file(index, spec)
        labels = labels_file(path)
        want = (n, *shape)
        try:
            for f in (path, labels):
                if f.is_symlink() or not f.is_file():
                    raise ValueError(f"{f.name} is missing or not a regular file")
            x = np.load(path, mmap_mode="r")
            if tuple(x.shape) != want or x.dtype != numpy_dtype(spec.dtype):
                raise ValueError(f"holds {x.dtype} {tuple(x.shape)}, expected {spec.dtype} {want}")
            if digest is not None and _file_digest(path) != digest:
                raise ValueError("its bytes changed since it was written (sampled digest)")
            y = np.load(labels, allow_pickle=False)
            if y.shape != (n,) or y.dtype != np.int64:
                raise ValueError(f"its labels hold {y.dtype} {y.shape}, expected int64 ({n},)")
            return x, torch.from_numpy(y)
        except (ValueError, OSError, EOFError) as e:
            log.warning("the disk cache %s cannot be used (%s); rebuilding it", path, str(e).splitlines()[0][:120])
            return None


def _needed(stages: list[Stage], after: int) -> set[int]:
    """Caches that stages after position ``after`` read."""
    return {
        s.source.source_block for s in stages[after + 1 :] if s.source is not None and s.source.source_block is not None
    }


def _file_digest(path: Path, *, samples: int = 64, chunk: int = 1 << 16) -> str:
    """sha256 of a file's size and ``samples`` evenly spaced chunks: reads
    4 MiB of a file of any size, and catches a file zeroed, truncated or
    overwritten since (not every flipped byte: a cheap guard, not a proof)."""
    import hashlib

    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(samples):
            f.seek(max(0, (size - chunk) * i // max(1, samples - 1)))
            h.update(f.read(chunk))
    return h.hexdigest()
