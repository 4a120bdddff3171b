"""Finishing a run: the exit kept as the final model, its files
(``final_model.pt``, ``final_model.onnx``), the inference throughput, where
and why training stopped, and ``summary.json`` (a diverged run's too)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from neuroflux.errors import NeuroFluxError
from neuroflux.runtime.assemble import Assembled
from neuroflux.runtime.checkpoint import atomic_torch_save
from neuroflux.runtime.config import Method, RunConfig, RunPolicy
from neuroflux.runtime.distributed import Dist
from neuroflux.runtime.export import export_onnx, throughput
from neuroflux.runtime.host_memory import host_memory_setting
from neuroflux.runtime.memory import set_cap
from neuroflux.runtime.modules import Chain
from neuroflux.runtime.run_dir import RunDir
from neuroflux.runtime.run_state import RunState, block_result_json
from neuroflux.runtime.stages import Stage, predicted_epoch_s
from neuroflux.schemas.plan import Plan
from neuroflux.schemas.summary import RunSummary, summary_from_dict, summary_to_dict

__all__ = ["choose_exit", "finish_run", "stopping_summary", "write_diverged_summary"]


def choose_exit(plan: Plan, accs: dict[str, float], *, method: Method, tolerance: float) -> str:
    """The exit kept, among those small enough (``exit_policy.min_reduction``):
    the most accurate (the shallower on a tie), or with ``prefer:
    shallowest`` the shallowest within ``tolerance`` of the best."""
    allowed = set(plan.allowed_exits()) if method == "neuroflux" else {u.name for u in plan.units}
    order = [u.name for u in plan.units if u.name in accs and u.name in allowed]
    if not order:
        raise NeuroFluxError(
            f"no trained exit is {plan.exit_policy.min_reduction:g}x smaller than the model; re-plan with a "
            "lower --min-reduction"
        )
    best = max(accs[u] for u in order)
    if method != "neuroflux" or plan.exit_policy.prefer == "best":
        return max(order, key=lambda u: (accs[u], -plan.unit(u).index))
    return next(u for u in order if accs[u] >= best - tolerance)


def finish_run(
    plan: Plan,
    asm: Assembled,
    stages: list[Stage],
    state: RunState,
    *,
    cfg: RunConfig,
    policy: RunPolicy,
    run_dir: RunDir,
    device: torch.device,
    dist: Dist,
    capped: bool,
    wall_s: float,
) -> dict[str, Any]:
    """The final model saved (and exported), measured and summarized; returns the summary dict."""
    accs = state.exit_acc
    chosen = choose_exit(plan, accs, method=cfg.method, tolerance=policy.tolerance)
    k = plan.unit(chosen).index
    final = Chain(asm.units[: k + 1], asm.heads[k]) if cfg.method == "neuroflux" else asm.model
    shape = plan.model.input_shape
    if dist.main:
        atomic_torch_save(final.state_dict(), run_dir.path / "final_model.pt")  # replaces a link, never follows it
    if cfg.export_onnx and dist.main:
        export_onnx(final, shape, run_dir.path / "final_model.onnx")
    final_params = sum(p.numel() for p in final.parameters())
    original_params = sum(p.numel() for p in asm.model.parameters())
    if capped:  # the report's inference throughput is not training: measured with the cap lifted
        set_cap(device, 1.0)
    tp_final, tp_orig = _throughputs(final, asm.model, shape, device=device, batch=cfg.throughput_batch)
    summary = {
        "method": cfg.method,
        "status": "ok",
        "final_accuracy": accs[chosen],
        "final_exit": chosen,
        "final_params": final_params,
        "original_params": original_params,
        "param_reduction": original_params / final_params,
        "wall_time_s": wall_s,
        "train_time_s": state.train_s,
        "blocks": [block_result_json(b) for b in state.done],
        "stopped_early": state.stopped,
        "stopping": stopping_summary(plan, stages, state, method=cfg.method, policy=policy),
        "exit_accuracies": {u.name: accs[u.name] for u in plan.units if u.name in accs},
        "throughput": {"final_images_per_s": tp_final, "original_images_per_s": tp_orig, "speedup": tp_final / tp_orig},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "budget_bytes": plan.budget_bytes,
        "budget_enforced": capped,
        "torch": torch.__version__,
        "command": cfg.command,
        "world_size": dist.world,
        "host_memory": host_memory_setting() if device.type == "cpu" else None,
        "polish": None if state.polish is None else dataclasses.asdict(state.polish),
        "compile": stages[0].compile if stages else None,
    }
    # Typed on the way out: a field missing or misnamed fails here, not in a reader.
    summary = summary_to_dict(summary_from_dict(summary))
    run_dir.write_summary(summary)
    return summary


def _throughputs(
    final: nn.Module, original: nn.Module, shape: Any, *, device: torch.device, batch: int | None
) -> tuple[float, float]:
    """Inference images per second of the final and the original model (both left on the CPU)."""
    reps = 1 if batch is not None else 5
    tp_final = throughput(final, shape, device=device, batch=batch, reps=reps)
    tp_orig = throughput(original, shape, device=device, batch=batch, reps=reps)
    final.to("cpu")
    original.to("cpu")
    return tp_final, tp_orig


def stopping_summary(
    plan: Plan, stages: list[Stage], state: RunState, *, method: Method, policy: RunPolicy
) -> dict[str, Any]:
    """Where training stopped, why, and the training time that saved (in the
    plan's terms: see ``predicted_epoch_s``)."""
    ran = {b.index: b.epochs_run for b in state.done}
    stop = state.stop
    saved_pred = stop.skipped_predicted_s if stop else 0.0
    for s in stages:  # epochs not run (or extra), and units the size limit left untrained
        if s.index in ran and method == "neuroflux":
            saved_pred += (s.epochs - ran[s.index]) * predicted_epoch_s(plan, s)
            saved_pred += plan.blocks[s.index].predicted_time_s - s.predicted_time_s
    predicted_ran = sum(s.predicted_time_s for s in stages if s.index in ran) if method == "neuroflux" else 0.0
    measured_ran = sum(b.time_s for b in state.done)
    scale = measured_ran / predicted_ran if predicted_ran > 0 else 1.0
    last = state.done[-1].units[-1] if state.done else None
    return {
        "stopped_at_unit": stop.at_unit if stop else last,
        "stopped_after_block": stop.after_block if stop else (state.done[-1].index if state.done else None),
        "full_depth": stop is None,
        "reason": state.stopped or "every block ran (no exit plateau of the patience's length)",
        "blocks_skipped": stop.blocks_skipped if stop else [],
        "units_skipped": stop.units_skipped if stop else [],
        "epochs_planned": {str(s.index): s.epochs for s in stages},
        "epochs_run": {str(k): v for k, v in ran.items()},
        "saved_predicted_s": saved_pred,
        "saved_estimated_s": saved_pred * scale,
        "patience_units": policy.patience,
        "epoch_patience": policy.epoch_patience,
        "tolerance": policy.tolerance,
    }


def write_diverged_summary(state: RunState, *, run_dir: RunDir, method: Method, error: str, command: str) -> None:
    """``summary.json`` of a run that diverged: the blocks it finished and why it stopped."""
    diverged = RunSummary(method=method, status="diverged", error=error, blocks=list(state.done), command=command)
    run_dir.write_summary(summary_to_dict(diverged))
