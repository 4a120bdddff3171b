"""Executing a plan: block by block, with caches, exits and checkpoints.

The same loop runs the baselines: ``bp`` is one stage whose single "unit" is
the whole model, ``bp-checkpoint`` the whole model as a checkpointed chain of
the plan's units. Every method writes the same files to the run directory:
``summary.json``, ``metrics.jsonl``, ``checkpoint.pt``, ``final_model.pt`` and
``final_model.onnx``.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn
try:  # private API (torch >= 2.5); only the CPU peak report needs it
    from torch.distributed._tools.mem_tracker import MemTracker
except ImportError:  # pragma: no cover - older or trimmed torch builds
    MemTracker = None  # type: ignore[assignment,misc]

from neuroflux.errors import NeuroFluxError
from neuroflux.runtime.assemble import Assembled, assemble, check_model_object, open_model_file
from neuroflux.common import format_mib, resolve_device, tracker_peak_bytes, write_probe
from neuroflux.runtime.distributed import from_env, shard_indices
from neuroflux.runtime.model_file import ModelObject
from neuroflux.schemas.summary import BlockResult, RunState, RunSummary, summary_from_dict, summary_to_dict
from neuroflux.runtime.checkpoint import (
    RunLock,
    append_jsonl,
    atomic_torch_save,
    atomic_write_json,
    confined_path,
    load_checkpoint,
)
from neuroflux.runtime.data import (
    CacheWriter,
    PrefixSource,
    StreamSource,
    TensorCache,
    call_augment,
    dataset_tensors,
    default_loader_workers,
)
from neuroflux.runtime.export import export_onnx, throughput
from neuroflux.runtime.modules import Chain, CheckpointedChain
from neuroflux.runtime.policy import depth_should_stop, epoch_decision, new_block_state, new_depth_state, observe_exits
from neuroflux.runtime.train import StepStats, UnitTrainer, block_step, shuffle_seed
from neuroflux.schemas.plan import Plan

__all__ = ["RunConfig", "run_plan", "Method", "BarFactory", "Diverged", "KEEP_CACHES_ENV"]

log = logging.getLogger(__name__)
CAP_ENV = "NEUROFLUX_CUDA_CAP"
"""Set to 0 to leave the CUDA allocator uncapped (measuring a plan's true
peak against its prediction); the summary then says ``budget_enforced: false``."""

KEEP_CACHES_ENV = "NEUROFLUX_KEEP_CACHES"
"""Set to 1 to keep disk caches after the last block that reads them (for
inspection); by default they are deleted then, as the plan's disk budget assumes."""

Method = Literal["neuroflux", "bp", "bp-checkpoint"]


class Diverged(NeuroFluxError):
    """A non-finite loss: the run failed (exit 3), nothing is exported."""


class NoBar:
    def __init__(self, *a: Any, **k: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *a: Any, **k: Any) -> None:
        pass

    def close(self) -> None:
        pass


#: ``bar(total=..., desc=..., leave=...)`` -> object with update/set_postfix/close (tqdm's interface).
BarFactory = Callable[..., Any]


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    out_dir: Path
    method: Method = "neuroflux"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    resume: bool = False
    force: bool = False
    """Run even if the model file changed since planning."""
    patience: int | None = None
    """Override the plan's exit policy (units without improvement; 0: full depth)."""
    tolerance: float | None = None
    epoch_patience: int | None = None
    """Override the plan's per-block epochs (0: every block runs its planned epochs)."""
    export_onnx: bool = True
    max_steps_per_epoch: int | None = None
    """Dry runs only (nf-bench --dry-run): cut every epoch after this many steps."""
    throughput_batch: int | None = None
    """Batch of the inference-throughput measurement (default: export.throughput's)."""
    loader_workers: int | None = None
    """DataLoader worker processes for datasets read from their source
    (default: ``data.default_loader_workers()``)."""
    command: str = field(default_factory=lambda: shlex.join(["nf-run", *sys.argv[1:]]))


@dataclass
class _Stage:
    index: int
    unit_idx: list[int]
    exits: list[str]
    """Names of the exits trained in this stage (the units)."""
    trainers: list[UnitTrainer]
    batch_size: int
    epochs: int
    predicted_peak_bytes: int
    cache: Any
    shuffle_seed: int
    source: Any = None
    """The plan's BlockInput (None for the baselines: the dataset)."""


def _device(choice: str) -> torch.device:
    choice = resolve_device(choice)
    if choice == "cuda" and not torch.cuda.is_available():
        raise NeuroFluxError("--device cuda but no CUDA device is available; use --device cpu or auto")
    return torch.device(choice)


def run_plan(plan: Plan, plan_path: Path | None, cfg: RunConfig, *, bar: BarFactory = NoBar,
             source: ModelObject | None = None) -> dict[str, Any]:
    """Execute ``plan`` (or a baseline of it); returns the summary dict. The
    model comes from the plan's model file (``plan_path`` locates a relative
    one) or, for a plan made in Python, from ``source``, whose structure
    must be the planned one."""
    return Runner(plan, plan_path, cfg, bar, source).run()


class Runner:
    def __init__(self, plan: Plan, plan_path: Path | None, cfg: RunConfig, bar: BarFactory,
                 source: ModelObject | None = None) -> None:
        self.plan, self.cfg, self.bar = plan, cfg, bar
        self.out = cfg.out_dir
        self.device = _device(cfg.device)
        self.dist = from_env(self.device.type)
        if source is not None:
            check_model_object(plan, source, force=cfg.force)
            self.mf = source
        else:
            self.mf = open_model_file(plan, Path(plan_path or "."), force=cfg.force)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.metrics_path = self.out / "metrics.jsonl"
        self.patience = plan.exit_policy.patience if cfg.patience is None else cfg.patience
        self.tolerance = plan.exit_policy.tolerance if cfg.tolerance is None else cfg.tolerance
        self.epoch_patience = plan.exit_policy.epoch_patience if cfg.epoch_patience is None else cfg.epoch_patience
        self.max_extra_epochs = plan.exit_policy.max_extra_epochs

    # ---------------------------------------------------------------- setup
    def _prepare_dir(self) -> dict[str, Any] | None:
        if self.cfg.resume:
            if not self.ckpt_path.is_file():
                raise NeuroFluxError(f"nothing to resume in {self.out} (no checkpoint.pt); start without --resume")
            ckpt = load_checkpoint(self.ckpt_path)
            if ckpt["method"] != self.cfg.method or ckpt["plan_sha"] != self._plan_key():
                raise NeuroFluxError(
                    f"{self.out} holds a {ckpt['method']} run of another plan (or other epochs, learning rate, "
                    f"heads, caches or exit policy); resume with the same plan, --baseline and overrides, or use "
                    f"a new --out"
                )
            if ckpt.get("world_size", 1) != self.dist.world:
                n = ckpt.get("world_size", 1)
                raise NeuroFluxError(
                    f"the run in {self.out} was trained on {n} process{'es' if n > 1 else ''} and this is "
                    f"{self.dist.world}: each rank's data shard and cache depend on it. Resume with the same number "
                    f"({'torchrun --nproc-per-node ' + str(n) + ' ...' if n > 1 else 'plain nf-run'} --resume)")
            if ckpt["state"].get("failed"):
                raise NeuroFluxError(f"the run in {self.out} failed ({ckpt['state']['failed']}); it cannot be resumed: "
                                     "re-plan (e.g. with a lower --lr) and start a new --out")
            return ckpt
        # run() has made the directory and holds its lock.
        if any(p.name != ".lock" for p in self.out.iterdir()):
            raise NeuroFluxError(f"run directory {self.out} is not empty; pass --resume to continue it, or a new --out")
        return None

    def _plan_key(self) -> str:
        """Digest of every plan decision that changes the result (not the
        solver's timings): a resume must continue the same training."""
        p = self.plan
        key = {"model": p.model.sha256, "recipe": dataclasses.asdict(p.recipe), "exit": dataclasses.asdict(p.exit_policy),
               "heads": [None if u.aux is None else dataclasses.asdict(u.aux) for u in p.units],
               "blocks": [dataclasses.asdict(b) for b in p.blocks], "units": [u.nodes for u in p.units],
               "overrides": [self.patience, self.tolerance, self.epoch_patience]}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def _stages(self, asm: Assembled) -> list[_Stage]:
        plan, r = self.plan, self.plan.recipe

        def trainer(unit: nn.Module, head: nn.Module | None, lr: float, steps: int, batch: int, epochs: int) -> UnitTrainer:
            if self.dist.enabled:  # each rank steps through its shard: the schedule spans the steps it really takes
                steps = epochs * -(-(r.train_size // self.dist.world) // batch)
            return UnitTrainer(unit, head, lr=lr, momentum=r.momentum, weight_decay=r.weight_decay, total_steps=steps,
                               schedule=r.schedule, grad_sync=self.dist.average_grads if self.dist.enabled else None)

        if self.cfg.method == "neuroflux":
            self._check_edited_batches()
            stages = []
            for b in plan.blocks:
                idx = [plan.unit(u).index for u in b.units]
                stages.append(_Stage(index=b.index, unit_idx=idx, exits=list(b.units),
                                     trainers=[trainer(asm.units[i], asm.heads[i], b.lr, b.steps, b.batch_size, b.epochs)
                                               for i in idx],
                                     batch_size=b.batch_size, epochs=b.epochs,
                                     predicted_peak_bytes=b.predicted_peak_bytes, cache=b.cache,
                                     shuffle_seed=shuffle_seed(plan.recipe.seed, b.index) if b.shuffle_seed is None
                                     else b.shuffle_seed, source=b.source()))
            return stages
        base = plan.baseline.bp if self.cfg.method == "bp" else plan.baseline.bp_checkpoint
        if not base.fits:
            raise NeuroFluxError(
                f"the plan found no batch size >= {plan.solver.min_batch_size} at which {self.cfg.method} fits "
                f"{plan.device.budget_text}; that is the comparison: BP cannot train under this budget"
            )
        whole = asm.model if self.cfg.method == "bp" else CheckpointedChain(asm.units)
        steps, lr = base.steps, base.lr  # the plan decides; the runtime executes
        return [_Stage(index=0, unit_idx=list(range(len(plan.units))), exits=[plan.units[-1].name],
                       trainers=[trainer(whole, None, lr, steps, base.batch_size, base.epochs)], batch_size=base.batch_size, epochs=base.epochs,
                       predicted_peak_bytes=base.predicted_peak_bytes, cache=None,
                       shuffle_seed=shuffle_seed(plan.recipe.seed, 0))]

    def _check_device(self) -> None:
        """Warn when this device is not the one the plan was made for: its
        times, and on CUDA its memory terms, were predicted for that one."""
        planned, here = self.plan.device, self.device.type
        name = torch.cuda.get_device_name(self.device) if here == "cuda" else "cpu"
        if planned.kind == "cpu" and here == "cuda":
            log.warning("the plan was made for the CPU and runs on %s: it holds no CUDA library workspace or memory "
                        "calibration, so the allocator cap may be hit; re-plan with nf-plan --device cuda", name)
        elif planned.kind == "cuda" and here == "cpu":
            log.warning("the plan was made for %s and runs on the CPU: predicted times do not apply, and the budget "
                        "is accounted, not enforced", planned.name)
        elif here == "cuda" and planned.name != name and "not present" not in planned.name:
            log.warning("the plan was made for %s and runs on %s: predicted times and the device's memory terms "
                        "(workspace, calibration) were for that one; re-plan here (or with this device's "
                        "--device-profile) for exact ones", planned.name, name)

    def _check_edited_batches(self) -> None:
        """A block whose batch the plan's own unit profiles say exceeds the
        budget was edited by hand: refused on CUDA (it would run out of
        memory or break the cap), a warning on CPU (where it is accounted)."""
        plan = self.plan
        cap = plan.budget_bytes * (1 - plan.device.margin_fraction)
        for b in plan.blocks:
            peak = plan.block_peak_bytes(b)
            if peak <= cap * 1.001:
                continue
            msg = (f"block {b.index} runs at batch {b.batch_size}, whose predicted peak {format_mib(peak)} exceeds "
                   f"the budget {plan.device.budget_text} (less the {plan.device.margin_fraction:.0%} margin); the plan "
                   "was edited by hand: re-plan with nf-plan")
            if self.device.type == "cuda":
                raise NeuroFluxError(msg)
            log.warning("%s (CPU: accounted, not enforced)", msg)

    # ---------------------------------------------------------------- main
    def run(self) -> dict[str, Any]:
        try:
            if not self.dist.main:  # rank 0 checks and locks the directory; the others follow it
                self.dist.barrier()
                self.out.mkdir(parents=True, exist_ok=True)
                return self._run_locked()
            return self._run_main()
        except RuntimeError as e:
            if self.dist.enabled and self.dist.is_collective_failure(e):
                raise NeuroFluxError(
                    f"rank {self.dist.rank}: a collective with the other processes failed ({str(e).splitlines()[0]}); "
                    f"another rank probably died. The last checkpoint in {self.out} is kept: run the same torchrun "
                    "command with --resume") from e
            raise
        finally:
            self.dist.close()

    def _run_main(self) -> dict[str, Any]:
        if self.out.exists() and not self.out.is_dir():
            raise NeuroFluxError(f"--out {self.out} is a file; give a directory for the run")
        if self.cfg.resume and not self.ckpt_path.is_file():  # before anything is created
            raise NeuroFluxError(f"nothing to resume in {self.out} (no checkpoint.pt); start without --resume")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            write_probe(self.out)
        except OSError as e:
            raise NeuroFluxError(f"cannot write to the run directory {self.out} ({e.strerror}); choose a writable --out") from None
        lock = RunLock(self.out)
        lock.acquire()
        try:
            if self.dist.enabled:
                ckpt = self._prepare_dir()  # checked here, before the other ranks start
                self.dist.barrier()
                return self._run_locked(ckpt)
            return self._run_locked()
        finally:
            lock.release()

    def _run_locked(self, ckpt: dict[str, Any] | None | bool = False) -> dict[str, Any]:
        t_start = time.perf_counter()
        if ckpt is False:  # not prepared by rank 0 already
            ckpt = self._prepare_dir() if self.dist.main else (load_checkpoint(self.ckpt_path) if self.cfg.resume else None)
        asm = assemble(self.plan, self.mf)
        stages = self._stages(asm)
        raw = self._raw_sources()
        self._check_device()
        self.capped = self.device.type == "cuda" and os.environ.get(CAP_ENV, "1") != "0"
        if self.capped:
            self._enforce_budget()
        state = _new_state()
        if ckpt is not None:
            state = self._restore(ckpt, asm, stages)
            self._log_missing_blocks(state)
        elapsed_before = state["elapsed_s"]

        caches: dict[int | None, tuple[Any, Any]] = {None: raw}
        start = len(state["done"])
        if start > 0 and state["stopped"] is None and start < len(stages):
            caches.update(self._restore_caches(stages, start, asm, raw, state))

        blocks_bar = self.bar(total=len(stages), desc=self.cfg.method, leave=True, initial=start)
        clock = _Clock(t_start, elapsed_before)
        try:
            for stage in stages[start:]:
                if state["stopped"] is not None:
                    break
                self._run_stage(stage, caches, asm, state, clock, stages=stages)
                blocks_bar.update(1)
                state["elapsed_s"] = clock()
                self._save(asm, state, trainers=None)
                # Logged after the checkpoint: a logged block is always a saved one (a kill between the
                # two leaves it unlogged, and the resume logs it).
                self._log({"event": "block", "method": self.cfg.method, **state["done"][-1]})
                self._drop_caches(caches, stages, after=stage)
        except Diverged as e:
            state["failed"] = str(e)
            self._save(asm, state, trainers=None)
            self._log({"event": "diverged", "reason": str(e)})
            diverged = RunSummary(method=self.cfg.method, status="diverged", error=str(e),
                                  blocks=[BlockResult(**b) for b in state["done"]], command=self.cfg.command)
            if self.dist.main:
                atomic_write_json(summary_to_dict(diverged), self.out / "summary.json")
            raise
        finally:
            blocks_bar.close()
        return self._finish(asm, stages, state, clock())

    def _log_missing_blocks(self, state: RunState) -> None:
        """Block records of finished blocks that a kill kept out of metrics.jsonl."""
        if not self.dist.main or not self.metrics_path.is_file():
            return
        logged = set()
        for line in self.metrics_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line from the kill
            if isinstance(rec, dict) and rec.get("event") == "block":
                logged.add(rec.get("index"))
        for b in state["done"]:
            if b["index"] not in logged:
                self._log({"event": "block", "method": self.cfg.method, **b})

    def _restore(self, ckpt: dict[str, Any], asm: Assembled, stages: list[_Stage]) -> RunState:
        """Weights, heads and the current stage's optimizers from ``ckpt``;
        contents that do not fit this plan's model (other tensors, shapes,
        counts) are refused, never half-loaded."""
        state = ckpt["state"]
        k = len(state["done"])
        try:
            if len(ckpt["heads"]) != len(asm.heads) or k > len(stages):
                raise ValueError(f"{len(ckpt['heads'])} heads and {k} finished stages for {len(asm.heads)} units "
                                 f"and {len(stages)} stages")
            asm.model.load_state_dict(ckpt["model"])
            for h, hs in zip(asm.heads, ckpt["heads"]):
                if h is not None and hs is not None:
                    h.load_state_dict(hs)
            if k < len(stages) and ckpt.get("trainers"):
                if len(ckpt["trainers"]) != len(stages[k].trainers):
                    raise ValueError(f"{len(ckpt['trainers'])} optimizer states for {len(stages[k].trainers)} units")
                for t, ts in zip(stages[k].trainers, ckpt["trainers"]):
                    t.load_state_dict(ts)
                    for p, st in t.opt.state.items():
                        buf = st.get("momentum_buffer")
                        if buf is not None and (not isinstance(buf, torch.Tensor) or buf.shape != p.shape):
                            raise ValueError(f"a momentum buffer of shape {getattr(buf, 'shape', None)} for a "
                                             f"parameter of shape {tuple(p.shape)}")
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise NeuroFluxError(f"the checkpoint in {self.out} does not fit this plan's model ({first}); it was "
                                 "damaged or written by another model: start a new --out") from None
        log.info("resuming at stage %d, epoch %d", k, state["epoch"])
        return state

    def _enforce_budget(self) -> None:
        total = torch.cuda.get_device_properties(self.device).total_memory
        frac = min(1.0, self.plan.budget_bytes / total)
        self._set_cap(frac)
        log.info("CUDA allocator capped at %.4f of %d bytes (= budget %d)", frac, total, self.plan.budget_bytes)
        if torch.backends.cudnn.benchmark:  # its algorithm search peaked at 2.6 GB for ResNet-18 (H200 probe)
            log.warning("turning torch.backends.cudnn.benchmark off: its algorithm search allocates far beyond "
                        "the budget (set NEUROFLUX_CUDA_CAP=0 to run uncapped instead)")
            torch.backends.cudnn.benchmark = False

    def _set_cap(self, fraction: float) -> None:
        # The cap needs an indexed device ("cuda" alone is refused): the current one.
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(fraction, index)

    # ---------------------------------------------------------------- stage
    def _run_stage(self, stage: _Stage, caches: dict[int | None, tuple[Any, Any]], asm: Assembled, state: RunState,
                   clock: "_Clock", *, stages: list[_Stage]) -> None:
        dev = self.device
        train, val, prefix = self._input(stage, caches, asm)
        for t in stage.trainers:
            for m in t.modules():
                m.to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        blk = state.get("block")
        if blk is None or blk["index"] != stage.index:
            blk = state["block"] = new_block_state(stage.index, stage.epochs)
        measured_cpu_peak, accs, first = 0, state.get("last_accs") or {}, state["epoch"]
        while state["epoch"] < blk["limit"]:
            epoch = state["epoch"]
            te = time.perf_counter()
            peak, (loss, acc) = self._train_epoch(stage, train, epoch, blk["limit"], track=epoch == first, prefix=prefix)
            measured_cpu_peak = max(measured_cpu_peak, peak)
            state["train_s"] += time.perf_counter() - te
            accs = self._eval_exits(stage, val)
            state["epoch"] = epoch + 1
            decision = self._epoch_policy(stage, blk, accs, state, steps_per_epoch=-(-len(train) // stage.batch_size))
            state["last_accs"] = accs
            state["elapsed_s"] = clock()
            rec = {"event": "epoch", "method": self.cfg.method, "block": stage.index, "epoch": epoch + 1,
                   "units": stage.exits if self.cfg.method == "neuroflux" else ["model"],
                   "train_loss": loss, "train_acc": acc,
                   "val_exit_acc": accs, "val_acc": max(accs.values()), "decision": decision,
                   "epoch_s": time.perf_counter() - te, "elapsed_s": state["elapsed_s"]}
            # Checkpoint first: a logged epoch is always a saved epoch.
            self._save(asm, state, trainers=stage.trainers)
            self._log(rec)
            if decision == "converged":
                break

        # After training: adaptive depth first, so that a run that stops here
        # never pays for an output cache nobody reads; then the next block's input cache.
        self._apply_depth_policy(stage, stages, state, accs)
        if stage.cache is not None and self.cfg.method == "neuroflux" and state["stopped"] is None:
            caches[stage.index] = self._write_cache(stage, train, val)
            self._record_digest(state, stage.index, stage.cache)
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else measured_cpu_peak
        for m in [m for t in stage.trainers for m in t.modules()] + [prefix]:  # off the device: the next block's budget is its own
            m.to("cpu")
        state["exit_acc"].update(accs)
        result = {"index": stage.index, "units": [self.plan.units[i].name for i in stage.unit_idx],
                  "batch_size": stage.batch_size, "epochs": stage.epochs, "epochs_run": state["epoch"],
                  "measured_peak_bytes": int(peak),
                  "predicted_peak_bytes": stage.predicted_peak_bytes, "peak_source":
                  "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "MemTracker (first steps, CPU)",
                  "exit_accuracies": accs, "exit_accuracy": max(accs.values()), "time_s": time.perf_counter() - t0,
                  "elapsed_s": clock()}
        nv = _nvml_process_bytes() if dev.type == "cuda" else None
        if nv is not None:
            result["nvml_process_bytes"] = nv
        state["done"].append(result)
        state["epoch"], state["block"], state["last_accs"] = 0, None, None

    def _train_epoch(self, stage: _Stage, train: Any, epoch: int, limit: int, *, track: bool,
                     prefix: nn.Module) -> tuple[int, tuple[list[float], list[float]]]:
        """One epoch of ``stage`` on ``train``; returns the MemTracker peak of
        its first steps on CPU when ``track`` (0 otherwise), and each unit's
        mean train loss and accuracy."""
        dev = self.device
        # Augmentation applies to inputs read from the dataset: the first block
        # (or the whole model for BP) here; a block recomputing from the dataset
        # gets it inside its PrefixSource, before the frozen units.
        augment = self.mf.augment() if stage.index == 0 else None
        for t in stage.trainers:
            t.train(True)
        stats = StepStats(len(stage.trainers), dev)
        gen = torch.Generator().manual_seed(stage.shuffle_seed + epoch)
        steps_per_epoch = -(-len(train) // stage.batch_size)
        ebar = self.bar(total=steps_per_epoch, desc=f"block {stage.index} epoch {epoch + 1}/{limit}", leave=False)
        peak = 0
        batches = train.batches(stage.batch_size, shuffle=True, generator=gen, device=dev)
        want = tuple(self.plan.units[stage.unit_idx[0]].input_shape)
        # Not enumerate(): it keeps its last result tuple, and so the batch, alive
        # through the next step, past the point where the step frees its input.
        step = -1
        for xb, yb in batches:
            step += 1
            if step == 0 and tuple(xb.shape[1:]) != want:
                raise NeuroFluxError(f"block {stage.index}'s input batches have shape {tuple(xb.shape[1:])} but the plan "
                                     f"says {want} for {self.plan.units[stage.unit_idx[0]].name} (its shapes were "
                                     "edited, or the model changed): re-plan with nf-plan")
            if augment is not None:
                xb = call_augment(augment, xb)
            inputs = [xb]
            del xb
            if dev.type == "cpu" and track and step < 2 and MemTracker is not None:
                peak = max(peak, self._tracked_step(stage, inputs, yb, stats, prefix=prefix))
            else:
                block_step(stage.trainers, inputs, yb, stats)
            ebar.update(1)
            if self.cfg.max_steps_per_epoch is not None and step + 1 >= self.cfg.max_steps_per_epoch:
                break
            if step % 50 == 49:
                self._check_finite(stage, stats, epoch)
            if step % 20 == 0:
                loss, acc = stats.summary()
                ebar.set_postfix(loss=f"{loss[-1]:.3f}", acc=f"{acc[-1]:.3f}")
        ebar.close()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        self._check_finite(stage, stats, epoch)
        return peak, stats.summary()

    def _check_finite(self, stage: _Stage, stats: StepStats, epoch: int) -> None:
        """A non-finite loss (the sum of the epoch's, one sync) means the unit
        diverged: stop, name it, suggest the fix."""
        flags = self.dist.all_sum((~torch.isfinite(stats.loss)).to(torch.int64))  # every rank stops together
        bad = flags.nonzero().flatten().tolist()
        if not bad:
            return
        where = ", ".join(stage.exits[i] if self.cfg.method == "neuroflux" else "the model" for i in bad)
        raise Diverged(f"training diverged in block {stage.index} at epoch {epoch + 1}: non-finite loss in {where} "
                       f"(lr {stage.trainers[bad[0]].opt.param_groups[0]['lr']:.3g}); re-plan with a lower --lr "
                       "(e.g. 10x lower) and start a new --out")

    def _tracked_step(self, stage: _Stage, inputs, yb, stats, *, prefix: nn.Module) -> int:
        tracker = MemTracker()
        for t in stage.trainers:
            tracker.track_external(*t.modules(), t.opt)
        if any(True for _ in prefix.parameters()):  # a recomputed prefix's weights stay on the device all block
            tracker.track_external(prefix)
        gc.collect(0)  # as the planner's profile does: the collector's timing must not move the peak
        gc.disable()
        try:
            with tracker:
                block_step(stage.trainers, inputs, yb, stats)
        finally:
            gc.enable()
        return tracker_peak_bytes(tracker)

    # ---------------------------------------------------------------- adaptive epochs and depth
    def _epoch_s(self, stage: _Stage, steps_per_epoch: int) -> float:
        """Predicted training time of one epoch of ``stage`` (the plan's unit profiles)."""
        b = stage.batch_size
        return steps_per_epoch * sum(self.plan.units[i].profile.step_fixed_s + self.plan.units[i].profile.step_per_sample_s * b
                                     for i in stage.unit_idx)

    def _epoch_policy(self, stage: _Stage, blk: dict[str, Any], accs: dict[str, float], state, *, steps_per_epoch: int) -> str:
        """Per-block epochs (``policy.epoch_decision``), NeuroFlux only; a
        granted extra epoch stretches the units' LR schedules."""
        if self.cfg.method != "neuroflux":
            return "planned"
        decision, bank = epoch_decision(blk, max(accs.values()), epochs_done=state["epoch"], tolerance=self.tolerance,
                                        epoch_patience=self.epoch_patience, max_extra=self.max_extra_epochs,
                                        bank_s=state["bank_s"], epoch_s=self._epoch_s(stage, steps_per_epoch))
        state["bank_s"] += bank
        if decision == "extended":
            for t in stage.trainers:
                t.extend(blk["limit"] * steps_per_epoch)
        return decision

    def _apply_depth_policy(self, stage: _Stage, stages: list[_Stage], state, accs: dict[str, float]) -> None:
        """Adaptive depth (``policy.observe_exits``), counted in units; a
        stop skips the remaining blocks."""
        if self.cfg.method != "neuroflux":
            return
        depth = state["depth"]
        observe_exits(depth, [(name, accs[name]) for name in stage.exits], tolerance=self.tolerance)
        pos = stages.index(stage)
        if not depth_should_stop(depth, patience=self.patience, is_last_block=pos == len(stages) - 1):
            return
        skipped = stages[pos + 1:]
        state["stopped"] = (f"the last {depth['stall']} exits (through {stage.exits[-1]}) did not beat the best, "
                            f"{depth['best_exit']} at {depth['best']:.4f}, by more than {self.tolerance:.3f} "
                            f"(patience {self.patience} units); stopped after block {stage.index}")
        state["stop"] = {"after_block": stage.index, "at_unit": stage.exits[-1], "best_exit": depth["best_exit"],
                         "blocks_skipped": [s.index for s in skipped],
                         "units_skipped": [u for s in skipped for u in s.exits],
                         "skipped_predicted_s": sum(self.plan.blocks[s.index].predicted_time_s for s in skipped)}
        self._log({"event": "early_stop", "reason": state["stopped"], **state["stop"]})

    def _stopping_summary(self, stages: list[_Stage], state: RunState) -> dict[str, Any]:
        """Where training stopped, why, and the training time that saved."""
        plan = self.plan
        ran = {b["index"]: b["epochs_run"] for b in state["done"]}
        stop = state.get("stop")
        saved_pred = stop["skipped_predicted_s"] if stop else 0.0
        for s in stages:
            if s.index in ran and self.cfg.method == "neuroflux":
                steps = -(-plan.recipe.train_size // s.batch_size)
                saved_pred += (s.epochs - ran[s.index]) * self._epoch_s(s, steps)
        predicted_ran = sum(plan.blocks[s.index].predicted_time_s for s in stages if s.index in ran) \
            if self.cfg.method == "neuroflux" else 0.0
        measured_ran = sum(b["time_s"] for b in state["done"])
        scale = measured_ran / predicted_ran if predicted_ran > 0 else 1.0
        last = state["done"][-1]["units"][-1] if state["done"] else None
        return {
            "stopped_at_unit": stop["at_unit"] if stop else last,
            "stopped_after_block": stop["after_block"] if stop else (state["done"][-1]["index"] if state["done"] else None),
            "full_depth": stop is None,
            "reason": state["stopped"] or "every block ran (no exit plateau of the patience's length)",
            "blocks_skipped": stop["blocks_skipped"] if stop else [],
            "units_skipped": stop["units_skipped"] if stop else [],
            "epochs_planned": {str(s.index): s.epochs for s in stages},
            "epochs_run": {str(k): v for k, v in ran.items()},
            "saved_predicted_s": saved_pred,
            "saved_estimated_s": saved_pred * scale,
            "patience_units": self.patience, "epoch_patience": self.epoch_patience, "tolerance": self.tolerance,
        }

    # ---------------------------------------------------------------- passes without training
    def _writer(self, stage: _Stage, n: int) -> CacheWriter:
        unit = self.plan.units[stage.unit_idx[-1]]
        spec = stage.cache
        path = self._cache_file(stage.index, spec) if spec.location == "disk" else None
        return CacheWriter(n, tuple(unit.output_shape), dtype=spec.dtype, location=spec.location, path=path,
                           pin=self.device.type == "cuda")

    @torch.inference_mode()
    def _eval_exits(self, stage: _Stage, val: Any) -> dict[str, float]:
        """Accuracy of every exit of the stage on val."""
        for t in stage.trainers:
            t.train(False)
            self.dist.broadcast_buffers(t.modules())
        # At the training batch: inference needs less than a training step at
        # the same batch, so evaluation stays inside the budget the plan proved.
        dev, bs = self.device, stage.batch_size
        correct = torch.zeros(len(stage.trainers), dtype=torch.int64, device=dev)
        for h, y in val.batches(bs, shuffle=False, device=dev):
            for i, t in enumerate(stage.trainers):
                h = t.unit(h)
                correct[i] += (t.logits(h).argmax(1) == y).sum()
        counts = self.dist.all_sum(torch.cat([correct, torch.tensor([len(val)], device=dev)]))
        n = int(counts[-1])
        return {name: c / n for name, c in zip(stage.exits, counts[:-1].tolist())}

    @torch.inference_mode()
    def _write_cache(self, stage: _Stage, train: Any, val: Any) -> tuple[TensorCache, TensorCache]:
        """The block's outputs for train then val: the next block's input cache."""
        for t in stage.trainers:
            t.train(False)
            self.dist.broadcast_buffers(t.modules())
        units = Chain([t.unit for t in stage.trainers])
        return self._cache_through(units, train, val, index=stage.index, spec=stage.cache, batch=stage.batch_size)

    def _record_digest(self, state: RunState, index: int, spec: Any) -> None:
        if spec is not None and spec.location == "disk":
            state.setdefault("cache_digests", {})[self._digest_key(index)] = _file_digest(self._cache_file(index, spec))

    def _digest_key(self, index: int) -> str:
        """Rank 0 saves the state: other ranks' files have no digest there (and are size-checked only)."""
        return str(index) if self.dist.main else f"{index}.rank{self.dist.rank}"

    def _cache_through(self, units: nn.Module, train: Any, val: Any, *, index: int, spec: Any,
                       batch: int) -> tuple[TensorCache, TensorCache]:
        """``train`` then ``val`` through ``units`` into block ``index``'s cache
        (``spec``: location and dtype), at ``batch`` (the training batch:
        inside the budget). Callers hold inference mode."""
        shape = tuple(self.plan.units[self.plan.unit(self.plan.blocks[index].units[-1]).index].output_shape)
        path = self._cache_file(index, spec) if spec.location == "disk" else None
        writer = CacheWriter(len(train) + len(val), shape, dtype=spec.dtype, location=spec.location, path=path,
                             pin=self.device.type == "cuda")
        labels = []
        for data in (train, val):
            for x, y in data.batches(batch, shuffle=False, device=self.device):
                writer.append(units(x))
                labels.append(y.cpu())
        full = writer.finish(torch.cat(labels))
        n = len(train)
        return TensorCache(full.x[:n], full.y[:n]), TensorCache(full.x[n:], full.y[n:])

    def _raw_sources(self) -> tuple[Any, Any]:
        """The dataset as the plan says: stacked in RAM once, or streamed
        through DataLoader workers; checked against the plan's sizes; this
        rank's shard under torchrun."""
        train_set, val_set = self.mf.datasets()
        r = self.plan.recipe
        for what, ds, planned in (("train", train_set, r.train_size), ("val", val_set, r.val_size)):
            # Dry runs (max_steps_per_epoch) cut the data on purpose.
            if len(ds) != planned and not self.cfg.force and self.cfg.max_steps_per_epoch is None:
                raise NeuroFluxError(f"the {what} set has {len(ds)} samples but the plan was made for {planned}: its "
                                     "batches, learning-rate schedule and cache sizes assume that many; re-plan for "
                                     "this data (or pass --force to run anyway)")
        meta = dict(input_shape=tuple(self.plan.model.input_shape), num_classes=self.plan.model.num_classes)
        workers = default_loader_workers() if self.cfg.loader_workers is None else self.cfg.loader_workers
        mode = self.plan.data.mode if self.plan.data is not None else "stack"
        shards = [None, None]
        if self.dist.enabled:  # this rank's shards: its caches hold only these
            shards = [shard_indices(len(train_set), self.dist, equal=True),
                      shard_indices(len(val_set), self.dist, equal=False)]
        out = []
        for what, ds, shard in (("train", train_set, shards[0]), ("val", val_set, shards[1])):
            if mode == "stream":
                out.append(StreamSource(ds, what=what, workers=workers, indices=shard, **meta))
                continue
            src = TensorCache(*dataset_tensors(ds, what=what, workers=workers, **meta))
            if what == "train" and len(src) > 1 and bool((src.y == src.y[0]).all()):
                log.warning("every training sample has label %d: the run can only learn to predict that class; "
                            "check the datasets function", int(src.y[0]))
            out.append(src if shard is None else src.subset(shard))
        return out[0], out[1]

    def _input(self, stage: _Stage, caches: dict[int | None, tuple[Any, Any]],
               asm: Assembled) -> tuple[Any, Any, nn.Module]:
        """The stage's train and val sources, and its recomputed prefix (an
        empty Chain when it reads a cache or the dataset directly)."""
        spec = stage.source
        if spec is None:  # a baseline: the dataset
            return (*caches[None], Chain([]))
        train, val = caches[spec.source_block]
        if spec.kind != "recompute":
            return train, val, Chain([])
        prefix = Chain([asm.units[self.plan.unit(u).index] for u in spec.recompute_units]).to(self.device).eval()
        self.dist.broadcast_buffers([prefix])
        augment = self.mf.augment() if spec.source_block is None else None
        return PrefixSource(train, prefix, augment=augment), PrefixSource(val, prefix), prefix

    def _needed(self, stages: list[_Stage], after: int) -> set[int]:
        """Caches that stages after position ``after`` read."""
        return {s.source.source_block for s in stages[after + 1:] if s.source is not None
                and s.source.source_block is not None}

    def _drop_caches(self, caches: dict[int | None, tuple[Any, Any]], stages: list[_Stage], *, after: _Stage) -> None:
        """Free the caches no later block reads (RAM, and disk files once the
        checkpoint no longer needs them): the plan's host budgets count a
        block's source and output caches only."""
        needed = self._needed(stages, stages.index(after))
        for j in [j for j in caches if j is not None and j not in needed]:
            del caches[j]
            spec = self.plan.blocks[j].cache
            if spec is not None and spec.location == "disk" and os.environ.get(KEEP_CACHES_ENV) != "1":  # each rank its own
                path = self._cache_file(j, spec)
                path.unlink(missing_ok=True)
                _labels_file(path).unlink(missing_ok=True)
        gc.collect()

    @torch.inference_mode()
    def _restore_caches(self, stages: list[_Stage], start: int, asm: Assembled, raw: tuple[Any, Any],
                        state: RunState) -> dict[int, tuple[TensorCache, TensorCache]]:
        """The caches the remaining stages read, after a resume: a disk cache
        whose file is intact is opened; any other is recomputed from the
        dataset through the finished blocks (inference only, no training)."""
        out = {}
        n_train, n_val = len(raw[0]), len(raw[1])
        for j in sorted(self._needed(stages, start - 1)):
            spec, blk = self.plan.blocks[j].cache, self.plan.blocks[j]
            shape = tuple(self.plan.unit(blk.units[-1]).output_shape)
            if spec.location == "disk":
                opened = self._open_disk_cache(j, spec, shape, n_train + n_val,
                                               digest=state.get("cache_digests", {}).get(self._digest_key(j)))
                if opened is not None:
                    x, y = opened
                    out[j] = (TensorCache(x[:n_train], y[:n_train]), TensorCache(x[n_train:], y[n_train:]))
                    continue
            log.info("recomputing the output cache of block %d from the finished blocks", j)
            last = self.plan.unit(blk.units[-1]).index
            chain = Chain(asm.units[: last + 1]).to(self.device).eval()
            out[j] = self._cache_through(chain, raw[0], raw[1], index=j, spec=spec, batch=blk.batch_size)
            self._record_digest(state, j, spec)
            chain.to("cpu")
        return out

    def _open_disk_cache(self, index: int, spec: Any, shape: tuple[int, ...], n: int, *, digest: str | None) -> Any:
        """Block ``index``'s cache file as a memmap and its labels, or None
        (with a warning) when either is missing, not a regular file,
        truncated or of another shape or dtype: then the cache is rebuilt,
        never read as garbage."""
        import numpy as np

        path = self._cache_file(index, spec)
        labels = _labels_file(path)
        want = (n, *shape)
        try:
            for f in (path, labels):
                if f.is_symlink() or not f.is_file():
                    raise ValueError(f"{f.name} is missing or not a regular file")
            x = np.load(path, mmap_mode="r")
            if tuple(x.shape) != want or x.dtype != np.dtype(spec.dtype):
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

    def _save(self, asm: Assembled, state, *, trainers: list[UnitTrainer] | None) -> None:
        if not self.dist.main:
            return
        atomic_torch_save({
            "world_size": self.dist.world,
            "method": self.cfg.method, "plan_sha": self._plan_key(), "model": asm.model.state_dict(),
            "heads": [None if h is None else h.state_dict() for h in asm.heads],
            "trainers": None if trainers is None else [t.state_dict() for t in trainers], "state": state,
        }, self.ckpt_path)

    def _cache_file(self, index: int, spec) -> Path:  # noqa: ANN001 - a CacheSpec
        """Block ``index``'s disk cache: the plan's file, one per rank when
        data-parallel, confined to the run directory (no ``..``, no absolute
        path, no symbolic link on the way)."""
        rel = Path(spec.file or f"cache/block{index}.npy")
        if self.dist.enabled:
            rel = rel.with_name(f"{rel.stem}.rank{self.dist.rank}{rel.suffix}")
        return confined_path(self.out, str(rel))

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.main:
            append_jsonl(self.metrics_path, record)

    # ---------------------------------------------------------------- final
    def _finish(self, asm: Assembled, stages: list[_Stage], state, wall_s: float) -> dict[str, Any]:
        plan = self.plan
        accs: dict[str, float] = state["exit_acc"]
        order = [u.name for u in plan.units if u.name in accs]
        best = max(accs[u] for u in order)
        if self.cfg.method != "neuroflux" or plan.exit_policy.prefer == "best":
            chosen = max(order, key=lambda u: (accs[u], -plan.unit(u).index))
        else:
            chosen = next(u for u in order if accs[u] >= best - self.tolerance)
        k = plan.unit(chosen).index
        if self.cfg.method == "neuroflux":
            final = Chain(asm.units[: k + 1], asm.heads[k])
        else:
            final = asm.model
        shape = plan.model.input_shape
        if self.dist.main:
            atomic_torch_save(final.state_dict(), self.out / "final_model.pt")  # replaces a link, never follows it
        if self.cfg.export_onnx and self.dist.main:
            export_onnx(final, shape, self.out / "final_model.onnx")
        final_params = sum(p.numel() for p in final.parameters())
        original_params = sum(p.numel() for p in asm.model.parameters())
        if self.capped:  # the report's inference throughput is not training: measured with the cap lifted
            self._set_cap(1.0)
        reps = 1 if self.cfg.throughput_batch is not None else 5
        tp_final = throughput(final, shape, device=self.device, batch=self.cfg.throughput_batch, reps=reps)
        tp_orig = throughput(asm.model, shape, device=self.device, batch=self.cfg.throughput_batch, reps=reps)
        final.to("cpu")
        asm.model.to("cpu")
        summary = {
            "method": self.cfg.method, "status": "ok", "final_accuracy": accs[chosen], "final_exit": chosen,
            "final_params": final_params, "original_params": original_params,
            "param_reduction": original_params / final_params, "wall_time_s": wall_s,
            "train_time_s": state["train_s"], "blocks": state["done"], "stopped_early": state["stopped"],
            "stopping": self._stopping_summary(stages, state),
            "exit_accuracies": {u: accs[u] for u in order},
            "throughput": {"final_images_per_s": tp_final, "original_images_per_s": tp_orig,
                           "speedup": tp_final / tp_orig},
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "budget_bytes": plan.budget_bytes, "budget_enforced": self.capped,
            "torch": torch.__version__, "command": self.cfg.command, "world_size": self.dist.world,
        }
        # Typed on the way out: a field missing or misnamed fails here, not in a reader.
        summary = summary_to_dict(summary_from_dict(summary))
        if self.dist.main:
            atomic_write_json(summary, self.out / "summary.json")
        return summary


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


def _labels_file(cache: Path) -> Path:
    """The labels beside a disk cache (``block0.npy`` -> ``block0.labels.npy``)."""
    return cache.with_name(f"{cache.stem}.labels{cache.suffix}")


class _Clock:
    """Seconds of this run so far, resumed runs included."""

    def __init__(self, t_start: float, before: float) -> None:
        self.t_start, self.before = t_start, before

    def __call__(self) -> float:
        return self.before + time.perf_counter() - self.t_start


def _new_state() -> RunState:
    return RunState(done=[], epoch=0, exit_acc={}, stopped=None, stop=None, elapsed_s=0.0, train_s=0.0,
                    depth=new_depth_state(), block=None, last_accs=None, bank_s=0.0)


def _nvml_process_bytes() -> int | None:
    """This process's GPU memory as NVML sees it (CUDA context included)."""
    try:
        import os

        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if p.pid == os.getpid():
                    return int(p.usedGpuMemory or 0)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML is a report, never a reason to fail a run
        return None
    return None
