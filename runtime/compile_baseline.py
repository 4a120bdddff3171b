"""``bp-compile``: BP under ``torch.compile`` with an activation memory budget,
the strongest compiled baseline at the plan's byte budget.

A compiled step's peak depends on what the compiler saves for backward, fuses
and recomputes, which no eager trace shows, so this baseline's batch is
measured on the run's device, not predicted: for every ratio of
``torch._functorch.config.activation_memory_budget`` in the plan's grid the
model is compiled once (a dynamic batch dimension), and the plan's candidate
batches are measured in ascending order until one's peak exceeds the budget
(less the plan's margin): one training step's peak (CUDA: the allocator's;
CPU: the profiler's record of every allocation, which sees compiled code's
buffers) and the fastest of three more. The pair with the least training time
(steps x measured step time) among those that fit trains, with the plan's rate
and schedule for its batch. The search trains on random inputs: the weights
and the random state are restored after it. Its record (every probe, compile
and search time) is written to the run directory, so a resume trains the same
choice, and reaches ``summary.json`` as ``compile``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from neuroflux.common import atomic_write_json
from neuroflux.errors import NeuroFluxError
from neuroflux.runtime.assemble import Assembled
from neuroflux.runtime.distributed import Dist
from neuroflux.runtime.memory import CAN_TRACK, allocation_peak, live_bytes, tracked_step
from neuroflux.runtime.precision import Precision
from neuroflux.runtime.run_dir import SEARCH_FILE
from neuroflux.runtime.stages import Stage, whole_model_stage, whole_model_trainer
from neuroflux.runtime.train import StepStats, UnitTrainer
from neuroflux.schemas.plan import CompileBaseline, CompileCandidate, Plan, record_from_json
from neuroflux.schemas.summary import CompileProbe, CompileResult

__all__ = ["compile_stage", "SEARCH_FILE"]

log = logging.getLogger(__name__)


def compile_stage(
    plan: Plan, asm: Assembled, *, device: torch.device, dist: Dist, precision: Precision, out: Path, resume: bool
) -> Stage:
    """The bp-compile stage: the model compiled at the (ratio, batch) the
    search chose on ``device`` (or, on ``resume``, the one it chose before)."""
    bc = plan.baseline.bp_compile
    if bc is None:
        raise NeuroFluxError("this plan has no bp-compile baseline (made before schema 2.7); re-plan it with nf-plan")
    if dist.enabled:
        raise NeuroFluxError(
            "bp-compile runs in one process (its search measures this device); run it without torchrun"
        )
    precision.format_modules(asm.model)  # before compiling: the graphs see the run's layout
    path = out / SEARCH_FILE
    cap = int(plan.budget_bytes * (1 - plan.device.margin_fraction))
    compiled: nn.Module | None = None
    if resume:
        search = _searched(path, bc, cap=cap)
    else:
        search, (last_ratio, last) = _search(plan, bc, asm.model, device=device, precision=precision, cap=cap)
        atomic_write_json(dataclasses.asdict(search), path)
        compiled = last if last_ratio == search.ratio else None  # the search's last compile is the choice's
    cand = next(c for c in bc.candidates if c.batch_size == search.batch_size)
    with _budget(search.ratio):
        if compiled is None:
            torch._dynamo.reset()
            compiled = _compile(asm.model, search.ratio)
        # Compiled here, under the chosen ratio (training and evaluation graphs), not at the first step outside it.
        _warm(compiled, asm.model, plan, cand, device=device, precision=precision)
    return _stage(plan, compiled, cand, bc, search, dist=dist, precision=precision)


def _searched(path: Path, bc: CompileBaseline, *, cap: int) -> CompileResult:
    """The search a run being resumed made, checked against the plan's grid and cap."""
    if path.is_symlink() or not path.is_file():
        raise NeuroFluxError(
            f"this bp-compile run has no {path.name} (its search's choice) in {path.parent}, or it is not a "
            "regular file: it cannot be resumed with the same batch; start a new --out"
        )
    try:
        search = record_from_json(CompileResult, json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise NeuroFluxError(
            f"{path} is not a bp-compile search record ({type(e).__name__}: {str(e)[:120]}); start a new --out"
        ) from None
    batches = {c.batch_size for c in bc.candidates}
    if search.ratio not in bc.ratios or search.batch_size not in batches or search.cap_bytes != cap:
        raise NeuroFluxError(
            f"{path} chose ratio {search.ratio} at batch {search.batch_size} under {search.cap_bytes} bytes, "
            "which the plan's bp-compile grid or budget no longer offers; resume with the plan the run started "
            "with, or start a new --out"
        )
    return search


def _stage(
    plan: Plan,
    model: nn.Module,
    cand: CompileCandidate,
    bc: CompileBaseline,
    search: CompileResult,
    *,
    dist: Dist,
    precision: Precision,
) -> Stage:
    """The one stage training ``model`` (compiled) at ``cand``'s batch, rate and schedule."""
    return whole_model_stage(
        plan,
        model,
        dist=dist,
        precision=precision,
        lr=cand.lr,
        steps=cand.steps,
        batch=cand.batch_size,
        epochs=bc.epochs,
        peak=search.peak_bytes,  # measured by the search: nothing predicts a compiled step
        shuffle_seed=bc.shuffle_seed,
        compile=dataclasses.asdict(search),
    )


class _DynamicBatch(nn.Module):
    """A compiled model whose every input has its batch dimension marked dynamic
    (marked here, on the tensor the compiled code receives: the trainer hands
    the model a detached alias of its batch, which would not carry the mark),
    so that one compile serves every batch size, the last partial batch too."""

    def __init__(self, compiled: nn.Module, ratio: float) -> None:
        super().__init__()
        self.compiled, self.ratio = compiled, ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A recompile (a batch size outside a compiled graph's guards) happens at this model's ratio too.
        with _budget(self.ratio):
            return cast(torch.Tensor, self.compiled(_marked(x)))


def _compile(model: nn.Module, ratio: float) -> nn.Module:
    """``model`` compiled (inductor: C++ on a CPU, Triton on a GPU) at ``ratio``."""
    return _DynamicBatch(cast(nn.Module, torch.compile(model)), ratio)


@contextmanager
def _budget(ratio: float) -> Iterator[None]:
    import torch._functorch.config as functorch_config

    with functorch_config.patch(activation_memory_budget=ratio):
        yield


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights and buffers, copied to the CPU (a copy on the device would count in every probe's peak)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Weights, buffers and random state as they were before (the search trains on random data)."""
    state = _snapshot(model)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        model.load_state_dict(state)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _batch(plan: Plan, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of ``b`` samples."""
    g = torch.Generator().manual_seed(b)
    x = torch.randn(b, *plan.model.input_shape, generator=g).to(device)
    y = torch.randint(0, plan.model.num_classes, (b,), generator=g).to(device)
    return x, y


def _marked(t: torch.Tensor) -> torch.Tensor:
    torch._dynamo.maybe_mark_dynamic(t, 0)
    return t


def _warm(
    compiled: nn.Module,
    model: nn.Module,
    plan: Plan,
    cand: CompileCandidate,
    *,
    device: torch.device,
    precision: Precision,
) -> None:
    """One training step and one evaluation forward of ``compiled`` (its
    graphs compiled), weights and random state restored after."""
    model.to(device)
    with _restored(model):
        trainer = _probe_trainer(plan, compiled, cand, precision=precision)
        x, y = _batch(plan, cand.batch_size, device)
        compiled.train(True)
        trainer.step(x, y)
        compiled.train(False)
        with torch.inference_mode(), precision.autocast():
            compiled(precision.format_input(x).clone())  # an inference tensor, as evaluation's batches are
        compiled.train(True)


def _probe_trainer(plan: Plan, model: nn.Module, cand: CompileCandidate, *, precision: Precision) -> UnitTrainer:
    return whole_model_trainer(
        plan, model, dist=Dist(), lr=cand.lr, steps=cand.steps, batch=cand.batch_size, epochs=1, precision=precision
    )


def _search(
    plan: Plan, bc: CompileBaseline, model: nn.Module, *, device: torch.device, precision: Precision, cap: int
) -> tuple[CompileResult, tuple[float, nn.Module]]:
    """Every ratio's candidates, ascending until one does not fit; the
    fastest fitting pair, and the last ratio searched with its compiled model."""
    t0 = time.perf_counter()
    probes: list[CompileProbe] = []
    compile_s = 0.0
    model.to(device)
    with _restored(model):
        for ratio in bc.ratios:
            found, spent, compiled = _probe_ratio(plan, bc, model, ratio, device=device, precision=precision, cap=cap)
            probes += found
            compile_s += spent
    model.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what the probes that did not fit reserved
    fitting = [p for p in probes if p.fits and p.train_s is not None]
    if not fitting:
        smallest = min((p.peak_bytes for p in probes if p.peak_bytes is not None), default=None)
        raise NeuroFluxError(
            f"bp-compile fits no candidate batch under {plan.device.budget_text} (less the plan's "
            f"{plan.device.margin_fraction:.0%} margin): its smallest measured peak is "
            + (f"{smallest / 2**20:.1f} MiB" if smallest is not None else "out of memory")
            + "; that is the comparison: compiled BP cannot train under this budget"
        )
    best = min(fitting, key=lambda p: (p.train_s, -p.ratio, p.batch_size))
    log.info(
        "bp-compile: ratio %.2f at batch %d (%.1f s of training measured)", best.ratio, best.batch_size, best.train_s
    )
    search = CompileResult(
        ratio=best.ratio,
        batch_size=best.batch_size,
        peak_bytes=int(best.peak_bytes or 0),
        cap_bytes=cap,
        workspace_bytes=best.workspace_bytes,
        compile_s=compile_s,
        search_s=time.perf_counter() - t0,
        probes=probes,
    )
    return search, (bc.ratios[-1], compiled)


def _probe_ratio(
    plan: Plan,
    bc: CompileBaseline,
    model: nn.Module,
    ratio: float,
    *,
    device: torch.device,
    precision: Precision,
    cap: int,
) -> tuple[list[CompileProbe], float, nn.Module]:
    """The candidates at ``ratio``, ascending until one does not fit; the time
    its compile took, and the compiled model."""
    probes: list[CompileProbe] = []
    compile_s = 0.0
    start = _snapshot(model)
    with _budget(ratio):
        torch._dynamo.reset()
        compiled = _compile(model, ratio)
        for i, cand in enumerate(bc.candidates):
            probe, first_s = _probe(plan, model, compiled, cand, ratio, device=device, precision=precision, cap=cap)
            model.load_state_dict(start)  # every probe times the same weights, not those of the probes before it
            compile_s = first_s if i == 0 else compile_s
            probes.append(probe)
            if not probe.fits:
                break
    return probes, compile_s, compiled


def _probe(
    plan: Plan,
    model: nn.Module,
    compiled: nn.Module,
    cand: CompileCandidate,
    ratio: float,
    *,
    device: torch.device,
    precision: Precision,
    cap: int,
) -> tuple[CompileProbe, float]:
    """One (ratio, batch): its peak and step time, and how long its first step
    took (at the first batch: the compile)."""
    trainer = _probe_trainer(plan, compiled, cand, precision=precision)
    x, y = _batch(plan, cand.batch_size, device)

    def step() -> None:
        trainer.step(x, y)

    try:
        t = time.perf_counter()
        step()  # compiles (at the first batch) and creates the optimizer's state
        first_s = time.perf_counter() - t
        peak = _step_peak(step, device, alive=live_bytes([model], [trainer.opt], [x, y]))
        step_s = _step_time(step, device)
    except torch.OutOfMemoryError:
        return CompileProbe(
            ratio=ratio, batch_size=cand.batch_size, peak_bytes=None, step_s=None, train_s=None, fits=False
        ), 0.0
    finally:
        trainer.opt.zero_grad(set_to_none=True)  # no gradient of a failed step reaches the next
    work = _cpu_workspace(plan, model, cand, x, y, precision=precision) if device.type == "cpu" else 0
    peak -= work
    log.info("bp-compile probe: ratio %.2f batch %d peak %d bytes, %.4f s/step", ratio, cand.batch_size, peak, step_s)
    return CompileProbe(
        ratio=ratio,
        batch_size=cand.batch_size,
        peak_bytes=peak,
        step_s=step_s,
        train_s=step_s * cand.steps,
        fits=peak <= cap,
        workspace_bytes=work,
    ), first_s


def _cpu_workspace(
    plan: Plan, model: nn.Module, cand: CompileCandidate, x: torch.Tensor, y: torch.Tensor, *, precision: Precision
) -> int:
    """What the eager step of ``model`` at this batch allocates beyond its
    tensors: the allocator's peak less MemTracker's (both over the same step).
    The compiled step calls the same convolution kernels, so its allocator peak
    less this is what the plan's accounting would count (0 without MemTracker)."""
    if not CAN_TRACK:
        return 0
    trainer = _probe_trainer(plan, model, cand, precision=precision)
    trainer.step(x, y)  # the optimizer's state exists from here on, as in the compiled probe
    tensors = tracked_step([trainer], [x], y, StepStats(1, x.device), prefix=nn.Identity())
    allocated = live_bytes([model], [trainer.opt], [x, y]) + allocation_peak(lambda: trainer.step(x, y))
    trainer.opt.zero_grad(set_to_none=True)
    return max(0, allocated - tensors)


def _step_peak(step: Callable[[], Any], device: torch.device, *, alive: int) -> int:
    """The peak bytes allocated on ``device`` during ``step``, everything alive
    before it included (CUDA's allocator counts it; on a CPU, ``alive``)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return alive + allocation_peak(step)


def _step_time(step: Callable[[], Any], device: torch.device, reps: int = 3) -> float:
    """The fastest of ``reps`` steps (the least disturbed by whatever else the machine runs)."""
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best
