"""Executing a plan: block by block, with caches, exits and checkpoints.

The same loop runs the baselines: ``bp`` is one stage whose single "unit" is
the whole model, ``bp-checkpoint`` the whole model as a chain of the plan's
units recomputing the ones the plan names (``bp-checkpoint-all``: every one),
``bp-compile`` the whole model compiled at the batch its search measured
(``compile_baseline``).
After NeuroFlux's blocks, a plan with a polish trains the kept exit end to
end (``polish.py``). Every method writes the same files to the run directory:
``summary.json``, ``metrics.jsonl``, ``checkpoint.pt``, ``final_model.pt`` and
``final_model.onnx``.

This module is the loop: the run, its stages, their epochs and steps, and
the epoch and depth rules acted on between them. What it calls lives by
name: ``run_dir`` (lock, resume checks, metrics), ``checkpoint``,
``run_state``, ``stages``, ``memory`` (budget, allocator cap, measured
peaks), ``caches`` and ``passes`` (work without training), ``finish`` (exit
choice, export, summary).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from neuroflux.common import torch_device
from neuroflux.errors import NeuroFluxError
from neuroflux.runtime.assemble import Assembled, assemble, check_model_object, open_model_file
from neuroflux.runtime.caches import KEEP_CACHES_ENV, BlockCaches
from neuroflux.runtime.checkpoint import load_checkpoint, plan_key, restore_checkpoint
from neuroflux.runtime.compile_baseline import compile_stage
from neuroflux.runtime.config import Method, RunConfig, RunPolicy
from neuroflux.runtime.data import call_augment, dataset_sources, default_loader_workers
from neuroflux.runtime.distributed import from_env
from neuroflux.runtime.finish import choose_exit, finish_run, write_diverged_summary
from neuroflux.runtime.host_memory import keep_freed_host_memory
from neuroflux.runtime.memory import (
    CAN_TRACK,
    cap_requested,
    check_device,
    check_edited_batches,
    enforce_budget,
    tracked_step,
)
from neuroflux.runtime.model_file import ModelFile, ModelObject
from neuroflux.runtime.passes import eval_exits, stage_input
from neuroflux.runtime.policy import (
    TIME_PARTS,
    BlockState,
    depth_should_stop,
    epoch_decision,
    new_block_state,
    observe_exits,
)
from neuroflux.runtime.polish import polish_exit
from neuroflux.runtime.precision import EMULATED_PRECISION_ENV, Precision, check_supported
from neuroflux.runtime.progress import BarFactory, NoBar
from neuroflux.runtime.run_dir import RunDir
from neuroflux.runtime.run_state import Clock, RunState, StopRecord, block_result, block_result_json
from neuroflux.runtime.stages import (
    Stage,
    build_stages,
    predicted_epoch_s,
    size_limit_bank_s,
    steps_per_epoch,
)
from neuroflux.runtime.train import StepStats, block_step
from neuroflux.schemas.plan import Plan
from neuroflux.schemas.summary import BlockResult, TimeBreakdown

__all__ = ["RunConfig", "run_plan", "Method", "BarFactory", "Diverged", "KEEP_CACHES_ENV"]

log = logging.getLogger(__name__)


class Diverged(NeuroFluxError):
    """A non-finite loss: the run failed (exit 3), nothing is exported."""


def run_plan(
    plan: Plan, plan_path: Path | None, cfg: RunConfig, *, bar: BarFactory = NoBar, source: ModelObject | None = None
) -> dict[str, Any]:
    """Execute ``plan`` (or a baseline of it); returns the summary dict. The
    model comes from the plan's model file (``plan_path`` locates a relative
    one) or, for a plan made in Python, from ``source``, whose structure
    must be the planned one."""
    return Runner(plan, plan_path, cfg, bar, source).run()


class Runner:
    def __init__(
        self, plan: Plan, plan_path: Path | None, cfg: RunConfig, bar: BarFactory, source: ModelObject | None = None
    ) -> None:
        self.plan, self.cfg, self.bar = plan, cfg, bar
        self.out = cfg.out_dir
        self.device = torch_device(cfg.device)
        if self.device.type == "cpu":
            keep_freed_host_memory()  # large activations reused, not faulted in fresh every step
        self.dist = from_env(self.device.type)
        self.mf: ModelFile | ModelObject
        if source is not None:
            check_model_object(plan, source, force=cfg.force)
            self.mf = source
        else:
            self.mf = open_model_file(plan, Path(plan_path or "."), force=cfg.force)
        self.policy = RunPolicy.of(plan, cfg)
        self.run_dir = RunDir(self.out, dist=self.dist, method=cfg.method, plan_key=plan_key(plan, self.policy))
        self.capped = False
        """Whether the CUDA allocator is capped at the budget (set once the run starts)."""

    # ---------------------------------------------------------------- the run
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
                    "command with --resume"
                ) from e
            raise
        finally:
            self.dist.close()

    def _run_main(self) -> dict[str, Any]:
        lock = self.run_dir.lock(resume=self.cfg.resume)
        try:
            if self.dist.enabled:
                ckpt = self.run_dir.prepare(resume=self.cfg.resume)  # checked here, before the other ranks start
                self.dist.barrier()
                return self._run_locked(ckpt)
            return self._run_locked()
        finally:
            lock.release()

    def _run_locked(self, ckpt: dict[str, Any] | None | Literal[False] = False) -> dict[str, Any]:
        t_start = time.perf_counter()
        if ckpt is False:  # not prepared by rank 0 already
            ckpt = (
                self.run_dir.prepare(resume=self.cfg.resume)
                if self.dist.main
                else (load_checkpoint(self.run_dir.checkpoint_path) if self.cfg.resume else None)
            )
        asm = assemble(self.plan, self.mf)
        if self.cfg.method == "neuroflux":
            check_edited_batches(self.plan, device=self.device)
        precision = Precision.of(self.plan.recipe, self.device.type)
        if not os.environ.get(EMULATED_PRECISION_ENV):
            check_supported(precision.name, self.device)
        caches = BlockCaches(self.plan, run_dir=self.out, dist=self.dist, device=self.device, dataset=self._dataset())
        # (Data read and checked first: bp-compile's search below takes minutes.)
        if self.cfg.method == "bp-compile":  # its batch is measured here, on this device
            stages = [compile_stage(self.plan, asm, device=self.device, dist=self.dist, precision=precision,
                                    out=self.out, resume=self.cfg.resume)]  # fmt: skip
        else:
            stages = build_stages(self.plan, asm, method=self.cfg.method, dist=self.dist, precision=precision)
        check_device(self.plan, self.device)
        self.capped = cap_requested(self.device)
        if self.capped:
            enforce_budget(self.device, budget_bytes=self.plan.budget_bytes)
        # NeuroFlux's time bank starts with the units the exit size limit skips (paid out as extra epochs).
        state = RunState(bank_s=size_limit_bank_s(self.plan) if self.cfg.method == "neuroflux" else 0.0)
        if ckpt is not None:
            state = restore_checkpoint(ckpt, asm, stages, run_dir=self.out)
            self.run_dir.log_missing_blocks(state.done)
        start = len(state.done)
        if start > 0 and state.stopped is None and start < len(stages):
            caches.restore(stages, start=start, asm=asm, state=state)
        clock = Clock(t_start, state.elapsed_s)
        self._run_stages(stages, start=start, caches=caches, asm=asm, state=state, clock=clock)
        self._polish(asm, state, caches.sources[None], clock, precision=precision)
        return self._finish(asm, stages, state, clock())

    def _dataset(self) -> tuple[Any, Any]:
        """The dataset's (train, val) sources (``data.dataset_sources``)."""
        train_set, val_set = self.mf.datasets()
        workers = default_loader_workers() if self.cfg.loader_workers is None else self.cfg.loader_workers
        # Dry runs (max_steps_per_epoch) cut the data on purpose.
        return dataset_sources(
            train_set,
            val_set,
            self.plan,
            dist=self.dist,
            workers=workers,
            check_sizes=not self.cfg.force and self.cfg.max_steps_per_epoch is None,
        )

    def _run_stages(
        self, stages: list[Stage], *, start: int, caches: BlockCaches, asm: Assembled, state: RunState, clock: Clock
    ) -> None:
        """The stages from ``start`` on, each checkpointed and logged; a
        divergence is saved and summarized before it is raised."""
        blocks_bar = self.bar(total=len(stages), desc=self.cfg.method, leave=True, initial=start)
        try:
            for stage in stages[start:]:
                if state.stopped is not None:
                    break
                self._run_stage(stage, caches, asm, state, clock, stages=stages)
                blocks_bar.update(1)
                state.elapsed_s = clock()
                self.run_dir.save(asm, state, trainers=None)
                # Logged after the checkpoint: a logged block is always a saved one (a kill between the
                # two leaves it unlogged, and the resume logs it).
                self._log({"event": "block", "method": self.cfg.method, **block_result_json(state.done[-1])})
                caches.drop(stages, after=stage)
        except Diverged as e:
            state.failed = str(e)
            self.run_dir.save(asm, state, trainers=None)
            self._log({"event": "diverged", "reason": str(e)})
            write_diverged_summary(
                state, run_dir=self.run_dir, method=self.cfg.method, error=str(e), command=self.cfg.command
            )
            raise
        finally:
            blocks_bar.close()

    def _polish(self, asm: Assembled, state: RunState, data: Any, clock: Clock, *, precision: Precision) -> None:
        """The plan's polish of the exit the run keeps (NeuroFlux only), once:
        checkpointed after it, so a resume never repeats it."""
        if self.cfg.method != "neuroflux" or self.plan.polish is None or state.polish is not None:
            return
        chosen = choose_exit(self.plan, state.exit_acc, method=self.cfg.method, tolerance=self.policy.tolerance)
        result = polish_exit(
            *(self.plan, asm, chosen),
            data=data,
            augment=self.mf.augment(),
            device=self.device,
            dist=self.dist,
            precision=precision,
            max_steps=self.cfg.max_steps_per_epoch,
        )
        if result is None:
            log.warning("the plan has no polish of %s (no batch fits its end-to-end step): kept unpolished", chosen)
            return
        state.polish, state.train_s, state.elapsed_s = result, state.train_s + result.time_s, clock()
        # The kept exit's accuracy as the polish measured it: through its units from the data, as it is deployed.
        state.exit_acc[chosen] = result.accuracy_after if result.kept else result.accuracy_before
        self.run_dir.save(asm, state, trainers=None)
        self._log({"event": "polish", **dataclasses.asdict(result), "elapsed_s": state.elapsed_s})

    def _log(self, record: dict[str, Any]) -> None:
        self.run_dir.log(record)

    def _finish(self, asm: Assembled, stages: list[Stage], state: RunState, wall_s: float) -> dict[str, Any]:
        return finish_run(self.plan, asm, stages, state, cfg=self.cfg, policy=self.policy, run_dir=self.run_dir,
                          device=self.device, dist=self.dist, capped=self.capped, wall_s=wall_s)  # fmt: skip

    # ---------------------------------------------------------------- a stage
    def _run_stage(
        self, stage: Stage, caches: BlockCaches, asm: Assembled, state: RunState, clock: Clock, *, stages: list[Stage]
    ) -> None:
        dev = self.device
        train, val, prefix = stage_input(
            stage, caches.sources, asm, plan=self.plan, augment=self.mf.augment(), device=dev, dist=self.dist
        )
        for t in stage.trainers:
            for m in t.modules():
                m.to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        accs, measured_cpu_peak = self._run_epochs(stage, train, val, prefix=prefix, asm=asm, state=state, clock=clock)

        # After training: adaptive depth first, so that a run that stops here
        # never pays for an output cache nobody reads; then the next block's input cache.
        self._apply_depth_policy(stage, stages, state, accs)
        times = state.block["times"] if state.block is not None else dict.fromkeys(TIME_PARTS, 0.0)
        if stage.cache is not None and self.cfg.method == "neuroflux" and state.stopped is None:
            tw = time.perf_counter()
            caches.write(stage, train, val, state=state)
            times["cache_write_s"] = time.perf_counter() - tw
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else measured_cpu_peak
        peak -= (stage.compile or {}).get("workspace_bytes", 0) if dev.type == "cpu" else 0  # as its search counts
        # Off the device: the next block's budget is its own.
        for m in [m for t in stage.trainers for m in t.modules()] + [prefix]:
            m.to("cpu")
        state.exit_acc.update(accs)
        result = self._block_result(stage, accs, peak=int(peak), epochs_run=state.epoch, t0=t0, clock=clock)
        state.done.append(dataclasses.replace(result, time_breakdown=TimeBreakdown(**times)))
        state.epoch, state.block, state.last_accs = 0, None, None

    def _block_result(
        self, stage: Stage, accs: dict[str, float], *, peak: int, epochs_run: int, t0: float, clock: Clock
    ) -> BlockResult:
        return block_result(self.plan, stage, accs, peak=peak, epochs_run=epochs_run, time_s=time.perf_counter() - t0,
                            elapsed_s=clock(), device=self.device)  # fmt: skip

    def _run_epochs(
        self, stage: Stage, train: Any, val: Any, *, prefix: nn.Module, asm: Assembled, state: RunState, clock: Clock
    ) -> tuple[dict[str, float], int]:
        """The stage's epochs from ``state.epoch`` on, each checkpointed and
        logged; returns the last exit accuracies and the measured CPU peak."""
        blk = state.block
        if blk is None or blk["index"] != stage.index:
            blk = state.block = new_block_state(stage.index, stage.epochs)
        measured_cpu_peak, accs, first = 0, state.last_accs or {}, state.epoch
        steps = steps_per_epoch(len(train), batch_size=stage.batch_size)  # this rank's shard already
        times = blk.setdefault("times", dict.fromkeys(TIME_PARTS, 0.0))
        while state.epoch < blk["limit"]:
            epoch = state.epoch
            te, recomputed = time.perf_counter(), getattr(train, "seconds", 0.0)
            peak, (loss, acc) = self._train_epoch(
                stage, train, epoch, blk["limit"], track=epoch == first, prefix=prefix
            )
            measured_cpu_peak = max(measured_cpu_peak, peak)
            tv = time.perf_counter()
            state.train_s += tv - te
            times["train_s"] += tv - te
            times["recompute_s"] += getattr(train, "seconds", 0.0) - recomputed
            accs = self._eval_exits(stage, val)
            times["eval_s"] += time.perf_counter() - tv
            state.epoch = epoch + 1
            decision = self._epoch_policy(stage, blk, accs, state, steps=steps)
            state.last_accs = accs
            state.elapsed_s = clock()
            rec = {
                "event": "epoch",
                "method": self.cfg.method,
                "block": stage.index,
                "epoch": epoch + 1,
                "units": stage.exits if self.cfg.method == "neuroflux" else ["model"],
                "train_loss": loss,
                "train_acc": acc,
                "val_exit_acc": accs,
                "val_acc": max(accs.values()),
                "decision": decision,
                "epoch_s": time.perf_counter() - te,
                "elapsed_s": state.elapsed_s,
            }
            # Checkpoint first: a logged epoch is always a saved epoch.
            tc = time.perf_counter()
            self.run_dir.save(asm, state, trainers=stage.trainers)
            times["checkpoint_s"] += time.perf_counter() - tc
            self._log(rec)
            if decision == "converged":
                break
        return accs, measured_cpu_peak

    def _train_epoch(
        self, stage: Stage, train: Any, epoch: int, limit: int, *, track: bool, prefix: nn.Module
    ) -> tuple[int, tuple[list[float], list[float]]]:
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
        ebar = self.bar(
            total=steps_per_epoch(len(train), batch_size=stage.batch_size),
            desc=f"block {stage.index} epoch {epoch + 1}/{limit}",
            leave=False,
        )
        peak = 0
        batches = train.batches(stage.batch_size, shuffle=True, generator=gen, device=dev)
        want = tuple(self.plan.units[stage.unit_idx[0]].input_shape)
        # Not enumerate(): it keeps its last result tuple, and so the batch, alive
        # through the next step, past the point where the step frees its input.
        step = -1
        for xb, yb in batches:
            step += 1
            if step == 0 and tuple(xb.shape[1:]) != want:
                raise NeuroFluxError(
                    f"block {stage.index}'s input batches have shape {tuple(xb.shape[1:])} but "
                    f"the plan says {want} for {self.plan.units[stage.unit_idx[0]].name} (its "
                    "shapes were edited, or the model changed): re-plan with nf-plan"
                )
            if augment is not None:
                xb = call_augment(augment, xb)
            inputs = [stage.trainers[0].precision.format_input(xb)]  # the NCHW batch is freed here
            del xb
            if dev.type == "cpu" and track and step < 2 and CAN_TRACK:
                peak = max(peak, tracked_step(stage.trainers, inputs, yb, stats, prefix=prefix))
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

    def _check_finite(self, stage: Stage, stats: StepStats, epoch: int) -> None:
        """A non-finite loss (the sum of the epoch's, one sync) means the unit
        diverged: stop, name it, suggest the fix."""
        flags = self.dist.all_sum((~torch.isfinite(stats.loss)).to(torch.int64))  # every rank stops together
        bad = flags.nonzero().flatten().tolist()
        if not bad:
            return
        where = ", ".join(stage.exits[i] if self.cfg.method == "neuroflux" else "the model" for i in bad)
        raise Diverged(
            f"training diverged in block {stage.index} at epoch {epoch + 1}: non-finite loss in {where} "
            f"(lr {stage.trainers[bad[0]].opt.param_groups[0]['lr']:.3g}); re-plan with a lower --lr "
            "(e.g. 10x lower) and start a new --out"
        )

    def _eval_exits(self, stage: Stage, val: Any) -> dict[str, float]:
        return eval_exits(stage, val, device=self.device, dist=self.dist)

    # ---------------------------------------------------------------- adaptive epochs and depth
    def _epoch_policy(
        self, stage: Stage, blk: BlockState, accs: dict[str, float], state: RunState, *, steps: int
    ) -> str:
        """Per-block epochs (``policy.epoch_decision``), NeuroFlux only; a
        granted extra epoch stretches the units' LR schedules. ``steps``: an
        epoch's (this rank's)."""
        if self.cfg.method != "neuroflux":
            return "planned"
        p = self.policy
        decision, bank = epoch_decision(
            blk,
            max(accs.values()),
            epochs_done=state.epoch,
            tolerance=p.tolerance,
            epoch_patience=p.epoch_patience,
            max_extra=p.max_extra_epochs,
            bank_s=state.bank_s,
            epoch_s=predicted_epoch_s(self.plan, stage),
        )
        state.bank_s += bank
        if decision == "extended":
            for t in stage.trainers:
                t.extend(blk["limit"] * steps)
        return decision

    def _apply_depth_policy(self, stage: Stage, stages: list[Stage], state: RunState, accs: dict[str, float]) -> None:
        """Adaptive depth (``policy.observe_exits``), counted in units, and the
        exit size limit (no later exit small enough to keep); a stop skips the
        remaining blocks."""
        if self.cfg.method != "neuroflux":
            return
        depth, p = state.depth, self.policy
        observe_exits(depth, [(name, accs[name]) for name in stage.exits], tolerance=p.tolerance)
        pos = stages.index(stage)
        is_last = pos == len(stages) - 1
        plateau = depth_should_stop(depth, patience=p.patience, is_last_block=is_last)
        past = self.plan.units_past_size_limit()  # the size limit stops the run at the unit before them
        at_limit = bool(past) and stage.unit_idx[-1] + 1 >= self.plan.unit(past[0]).index
        if not plateau and not at_limit:
            return
        trimmed = [u for u in self.plan.blocks[stage.index].units if u in past]
        skipped = stages[pos + 1 :]
        state.stopped = (
            f"the last {depth['stall']} exits (through {stage.exits[-1]}) did not beat the best, "
            f"{depth['best_exit']} at {depth['best']:.4f}, by more than {p.tolerance:.3f} "
            f"(patience {p.patience} units); stopped after block {stage.index}"
            if plateau
            else f"no later exit is {self.plan.exit_policy.min_reduction:g}x smaller than the model "
            f"(--min-reduction); stopped at {stage.exits[-1]} in block {stage.index}"
        )
        state.stop = StopRecord(
            after_block=stage.index,
            at_unit=stage.exits[-1],
            best_exit=depth["best_exit"],
            blocks_skipped=[s.index for s in skipped],
            units_skipped=[*trimmed, *(u for s in skipped for u in self.plan.blocks[s.index].units)],
            skipped_predicted_s=sum(self.plan.blocks[s.index].predicted_time_s for s in skipped),
        )
        self._log({"event": "early_stop", "reason": state.stopped, **dataclasses.asdict(state.stop)})
