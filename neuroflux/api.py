"""NeuroFlux from Python: plan and train a model object, no files needed.

    import neuroflux

    plan = neuroflux.plan(model, budget="1GB", input_shape=(3, 32, 32), train_size=50_000, val_size=10_000)
    plan.save("plan.json")                      # nf-graph, nf-run --help etc. read it
    result = neuroflux.train(plan, model, train_set, val_set, out="runs/x")
    result.model                                # the final early-exit nn.Module
    result.summary["final_accuracy"]

These are the functions ``nf-plan`` and ``nf-run`` run (``make_plan``,
``run_plan``): the same plan for the same model, the same training.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from neuroflux.errors import NeuroFluxError

if TYPE_CHECKING:
    from neuroflux.planner.jobs import Progress
    from neuroflux.runtime.model_file import ModelObject
    from neuroflux.schemas.plan import Plan

__all__ = ["plan", "train", "load_plan", "export_onnx", "Result"]


def _source(model: nn.Module | str | Path | Callable[[], nn.Module], **kw: Any) -> ModelObject | str:
    from neuroflux.runtime.model_file import ModelObject

    if isinstance(model, nn.Module):
        return ModelObject(model, **kw)
    if isinstance(model, (str, Path)):
        return str(model)
    if callable(model):
        return ModelObject(model(), **kw)
    raise TypeError(
        f"model must be an nn.Module, a factory returning one, or a model file path; got {type(model).__name__}"
    )


def _check_progress(progress: object) -> None:
    if progress is not None and not isinstance(progress, bool) and not callable(progress):
        raise TypeError("progress must be a callable(description, done, total), True, False or None")


def plan(
    model: nn.Module | str | Path | Callable[[], nn.Module],
    budget: str | int = "1GB",
    *,
    input_shape: Sequence[int] | None = None,
    train_size: int | None = None,
    val_size: int | None = None,
    num_classes: int | None = None,
    device: Literal["cpu", "cuda"] = "cpu",
    progress: Progress | bool | None = None,
    **options: Any,
) -> Plan:
    """Plan ``model`` under ``budget`` (``"1GB"``, ``"512MiB"`` or bytes).

    ``model``: an ``nn.Module`` (its structure is planned; its weights are
    not touched), a factory returning one, or a model file / import path as
    ``nf-plan`` takes. For a module, give ``input_shape`` (one sample, e.g.
    ``(3, 32, 32)``) and the training and validation set sizes. ``device``
    is the target's kind; a device profile (``device_profile="gpu.json"``)
    plans for a device elsewhere. ``progress``: ``True`` for a progress bar
    on stderr, or a callable ``progress(description, done, total)`` (as
    ``train`` takes); ``None`` or ``False`` for none. ``options`` are
    ``PlanConfig`` options (``planner/config.py``), named as the ``nf-plan``
    flags are (``epochs=5``, ``head_kind="pooled"``, ``max_batch=256``,
    ``strategy="greedy"``, ...); a value out of range raises ``ValueError``
    naming the option. Returns the typed ``Plan``; ``plan.save(path)`` writes it.
    """
    from neuroflux.planner.build import make_plan
    from neuroflux.planner.config import PlanConfig

    budget_bytes = _checked_budget(budget, device=device, options=options)
    _check_sizes(train_size=train_size, val_size=val_size, num_classes=num_classes, input_shape=input_shape)
    _check_progress(progress)
    source = _source(model, num_classes=num_classes)
    cfg = PlanConfig.from_options(
        budget_bytes=budget_bytes,
        budget_text=str(budget),
        device_kind=device,
        device_name=device,
        train_size=train_size,
        val_size=val_size,
        input_shape=None if input_shape is None else tuple(input_shape),
        **options,
    )
    if progress is True:
        from neuroflux.planner.cli import planning_progress

        bar, callback = planning_progress(quiet=False)
        try:
            return make_plan(source, cfg, plan_dir=Path.cwd(), progress=callback).plan
        finally:
            bar.close()
    return make_plan(source, cfg, plan_dir=Path.cwd(), progress=progress or None).plan


def _checked_budget(budget: Any, *, device: Any, options: dict[str, Any]) -> int:
    """``plan``'s budget in bytes, after checking the options, device and budget it was given."""
    from neuroflux.planner.budget import parse_bytes
    from neuroflux.planner.config import option_names

    known = set(option_names()) - {"budget_bytes", "budget_text", "device_kind", "device_name"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown plan option(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if isinstance(budget, bool) or not isinstance(budget, (str, int)):
        raise TypeError(f"budget must be text such as '1GB' or a number of bytes, got {type(budget).__name__}")
    budget_bytes = budget if isinstance(budget, int) else parse_bytes(budget, what="budget")
    if budget_bytes < 1:
        raise ValueError(f"budget must be >= 1 byte, got {budget}")
    return budget_bytes


def _check_sizes(*, train_size: Any, val_size: Any, num_classes: Any, input_shape: Any) -> None:
    """``plan``'s sizes: ints >= 1, and a shape of positive ints."""
    for name, value in (("train_size", train_size), ("val_size", val_size), ("num_classes", num_classes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if input_shape is not None and (
        isinstance(input_shape, (str, bytes, int))
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in input_shape)
    ):
        raise ValueError(
            f"input_shape must be one sample's shape as positive ints, e.g. (3, 32, 32); got {input_shape!r}"
        )


@dataclass(frozen=True)
class Result:
    """What ``train`` gives back."""

    summary: dict[str, Any]
    """``summary.json``: per-block times, peaks and exit accuracies, the final exit and its accuracy."""
    model: nn.Module
    """The final model (the network up to the chosen exit, with its head;
    for a baseline, the whole network), on the CPU, in eval mode."""
    out: Path
    """The run directory (checkpoint, metrics, ``final_model.pt``, ``final_model.onnx``)."""


def train(
    plan: Plan,
    model: nn.Module | Callable[[], nn.Module],
    train_set: Any,
    val_set: Any,
    *,
    out: str | Path | None = None,
    device: Literal["auto", "cuda", "cpu"] = "auto",
    method: Literal["neuroflux", "bp", "bp-checkpoint", "bp-checkpoint-all", "bp-compile"] = "neuroflux",
    augment: Callable[[Any], Any] | None = None,
    resume: bool = False,
    force: bool = False,
    export_onnx: bool = True,
    progress: Progress | bool | None = False,
) -> Result:
    """Train ``model`` as ``plan`` says (``method="bp"``, ``"bp-checkpoint"``,
    ``"bp-checkpoint-all"`` or ``"bp-compile"``: the plan's baselines). ``model`` must have the
    planned structure (parameter and buffer names, shapes and dtypes; a
    changed model is refused unless ``force``); training starts from its
    current weights and leaves the object unchanged. ``train_set`` and
    ``val_set`` are map-style datasets of ``(tensor, int)`` pairs.
    ``progress``: ``True`` for progress bars on stderr (blocks and epochs),
    or a callable ``progress(description, done, total)`` (as ``plan``
    takes), called for the blocks (described by the method) and for each
    epoch's batches; ``False`` or ``None`` for none.
    """
    from neuroflux.runtime.assemble import load_final_model
    from neuroflux.runtime.model_file import ModelObject
    from neuroflux.runtime.progress import progress_bars
    from neuroflux.runtime.runner import RunConfig, run_plan

    _check_train_args(
        plan,
        method=method,
        device=device,
        out=out,
        augment=augment,
        progress=progress,
        flags={"resume": resume, "force": force, "export_onnx": export_onnx},
    )
    source = _source(model, datasets=(train_set, val_set), augment=augment)
    if not isinstance(source, ModelObject):
        raise NeuroFluxError("train() takes the model object; for a model file use nf-run plan.json")
    out = (
        Path(out)
        if out is not None
        else Path("runs") / f"{source.path.stem.strip('<>').split()[0]}-{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    bar = progress_bars(enabled=True) if progress is True else (_callback_bars(progress) if progress else None)
    cfg = RunConfig(
        out_dir=out,
        method=method,
        device=device,
        resume=resume,
        force=force,
        export_onnx=export_onnx,
        command=f"neuroflux.train(plan, {source.label}, ...)",
    )
    summary = run_plan(plan, None, cfg, source=source, **({"bar": bar} if bar else {}))
    return Result(summary=summary, model=load_final_model(plan, source, out, summary), out=out)


def _check_train_args(
    plan: Any, *, method: Any, device: Any, out: Any, augment: Any, progress: Any, flags: dict[str, Any]
) -> None:
    """``train``'s arguments, up front: nothing is written before they are
    known good. An in-memory plan is validated as a plan file is."""
    from neuroflux.schemas.plan import Plan, plan_from_dict, plan_to_dict

    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a neuroflux Plan (from neuroflux.plan or load_plan), got {type(plan).__name__}")
    if method not in ("neuroflux", "bp", "bp-checkpoint", "bp-checkpoint-all", "bp-compile"):
        raise ValueError(
            f"method must be 'neuroflux', 'bp', 'bp-checkpoint', 'bp-checkpoint-all' or 'bp-compile', got {method!r}"
        )
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if out is not None and not isinstance(out, (str, Path)):
        raise TypeError(f"out must be a path, got {type(out).__name__}")
    if augment is not None and not callable(augment):
        raise TypeError("augment must be a callable(batch) -> batch or None")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    _check_progress(progress)
    try:
        plan_from_dict(plan_to_dict(plan))  # the schema and every consistency check, as for a file
    except NeuroFluxError as e:
        raise ValueError(f"the plan is not valid: {e}") from None


class _CallbackBar:
    """A progress bar that reports to ``progress(description, done, total)``
    (the runner's bar interface: update, set_postfix, close)."""

    def __init__(self, progress: Progress, *, total: int, desc: str = "", initial: int = 0, **_: Any) -> None:
        self.progress, self.total, self.desc, self.done = progress, total, desc, initial
        progress(desc, initial, total)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.progress(self.desc, self.done, self.total)

    def set_postfix(self, *a: Any, **k: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _callback_bars(progress: Progress) -> Callable[..., _CallbackBar]:
    """The runner's bar factory for a ``progress`` callable."""
    return lambda **kw: _CallbackBar(progress, **kw)


def export_onnx(plan: Plan, model: nn.Module, path: str | Path) -> Path:
    """The planned model as ONNX, every node naming its unit and block (what
    ``nf-graph plan.json -o plan.onnx`` writes for a model file), for a plan
    made from ``model``. Its structure must be the planned one."""
    from neuroflux.runtime.assemble import check_model_object
    from neuroflux.runtime.model_file import ModelObject
    from neuroflux.tools.graph import write_onnx

    source = _source(model)
    if not isinstance(source, ModelObject):
        raise NeuroFluxError(
            "export_onnx() takes the model object; for a model file use nf-graph plan.json -o plan.onnx"
        )
    check_model_object(plan, source)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_onnx(plan, None, path, source=source)
    return path


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file (``nf-plan -o``'s or ``Plan.save``'s)."""
    from neuroflux.schemas import load_plan as _load

    return _load(path)
