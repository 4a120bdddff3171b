"""The plan: the ``Plan`` record with its consistency checks, and the one
loader that validates a plan file (``load_plan``), with its writer.

A plan is what ``nf-plan`` decides and ``nf-run`` executes. Every decision the
runtime acts on is in it, named by stable torch.fx node names. Byte counts are
ints named ``*_bytes``; times are floats named ``*_s``. The records it is made
of live beside it: ``specs.py`` (model, device, data, recipe, exit policy),
``blocks.py`` (units and blocks), ``estimates.py`` (baselines, predictions,
solver and profile records) and ``graph.py`` (the traced graph); every public
name stays importable from here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from neuroflux.common import atomic_write_json
from neuroflux.errors import NeuroFluxError
from neuroflux.schemas.blocks import AuxHead, Block, BlockInput, CacheSpec, Unit, UnitProfile
from neuroflux.schemas.estimates import (
    Baseline,
    Baselines,
    CompileBaseline,
    CompileCandidate,
    Polish,
    PolishExit,
    Predicted,
    ProfileInfo,
    SolverInfo,
)
from neuroflux.schemas.graph import GraphEdge, GraphNode
from neuroflux.schemas.specs import DataSpec, DeviceSpec, ExitPolicy, ModelSpec, Recipe
from neuroflux.schemas.typed_json import record_from_json, validate_record

__all__ = [
    "record_from_json",
    "validate_record",
    "SCHEMA_VERSION",
    "AuxHead",
    "Baseline",
    "Baselines",
    "Block",
    "CompileBaseline",
    "CompileCandidate",
    "BlockInput",
    "CacheSpec",
    "DataSpec",
    "DeviceSpec",
    "ExitPolicy",
    "GraphEdge",
    "GraphNode",
    "ModelSpec",
    "Plan",
    "PlanError",
    "Polish",
    "PolishExit",
    "Predicted",
    "ProfileInfo",
    "Recipe",
    "SolverInfo",
    "Unit",
    "UnitProfile",
    "load_plan",
    "plan_from_dict",
    "plan_to_dict",
    "save_plan",
    "schema",
]

#: Major.minor. A reader accepts any plan with the same major and a minor up
#: to its own; a newer plan is refused with a message to upgrade.
SCHEMA_VERSION = "2.10"


class PlanError(NeuroFluxError):
    """A plan file that cannot be used: missing, corrupt, invalid or too new."""


@dataclass(frozen=True, kw_only=True)
class Plan:
    schema_version: str
    created_by: str
    model: ModelSpec
    device: DeviceSpec
    budget_bytes: int
    """Same as ``device.budget_bytes``; top-level for tools that read it."""
    recipe: Recipe
    exit_policy: ExitPolicy
    units: list[Unit]
    blocks: list[Block]
    graph_nodes: list[GraphNode]
    graph_edges: list[GraphEdge]
    baseline: Baselines
    predicted: Predicted
    solver: SolverInfo
    profile: ProfileInfo
    data: DataSpec | None = None
    """Added in 2.3 (older plans: stacked)."""
    polish: Polish | None = None
    """The end-to-end polish of the kept exit after local learning (None: none). Added in 2.6."""

    def __post_init__(self) -> None:
        for i, u in enumerate(self.units):
            if u.index != i or u.name != f"u{i}":
                raise PlanError(
                    f"units are out of order: position {i} holds {u.name} (index {u.index}); "
                    "re-create the plan with nf-plan"
                )
            if u.aux is not None and u.aux.kind != "linear" and u.aux.width < 1:
                raise PlanError(f"unit {u.name}'s {u.aux.kind} head has width {u.aux.width}; widths are >= 1")
        names = [u.name for u in self.units]
        planned = [n for b in self.blocks for n in b.units]
        if planned != names:
            raise PlanError(f"plan blocks cover units {planned}, expected every unit once in order {names}")
        if self.budget_bytes != self.device.budget_bytes:
            raise PlanError("budget_bytes differs from device.budget_bytes")
        self._check_recipe()
        self._check_units()
        self._check_sources()
        self._check_polish()
        if not self.allowed_exits():
            raise PlanError(
                f"exit_policy.min_reduction is {self.exit_policy.min_reduction}: no exit is that many times smaller "
                "than the model; re-create the plan with nf-plan and a lower --min-reduction"
            )

    def _check_recipe(self) -> None:
        """Values the schema's types admit but training cannot use."""
        import math

        r, fix = self.recipe, "re-create the plan with nf-plan"
        checks = [
            (math.isfinite(r.lr) and r.lr > 0, f"recipe.lr is {r.lr}; it must be a positive number"),
            (
                math.isfinite(r.momentum) and 0 <= r.momentum < 1,
                f"recipe.momentum is {r.momentum}; it must be in [0, 1)",
            ),
            (
                math.isfinite(r.weight_decay) and r.weight_decay >= 0,
                f"recipe.weight_decay is {r.weight_decay}; it must be >= 0",
            ),
            (0 <= r.seed < 2**63, f"recipe.seed is {r.seed}; seeds must be in [0, 2^63)"),
            (
                math.isfinite(self.exit_policy.min_reduction) and self.exit_policy.min_reduction >= 1,
                f"exit_policy.min_reduction is {self.exit_policy.min_reduction}; it must be >= 1",
            ),
            (r.train_size >= 1 and r.val_size >= 1, "recipe.train_size and val_size must be >= 1"),
            (
                self.exit_policy.patience >= 0
                and self.exit_policy.epoch_patience >= 0
                and self.exit_policy.max_extra_epochs >= 0,
                "exit_policy counts must be >= 0",
            ),
            (
                math.isfinite(self.exit_policy.tolerance) and 0 <= self.exit_policy.tolerance <= 1,
                f"exit_policy.tolerance is {self.exit_policy.tolerance}; it must be in [0, 1]",
            ),
        ]
        for b in self.blocks:
            checks += [
                (
                    b.batch_size >= 1 and b.epochs >= 1 and b.steps >= 1,
                    f"block {b.index} has batch {b.batch_size}, "
                    f"{b.epochs} epochs and {b.steps} steps; each must be >= 1",
                ),
                (math.isfinite(b.lr) and b.lr > 0, f"block {b.index}'s lr is {b.lr}; it must be a positive number"),
                (
                    b.shuffle_seed is None or 0 <= b.shuffle_seed < 2**62,
                    f"block {b.index}'s shuffle_seed is {b.shuffle_seed}; it must be in [0, 2^62)",
                ),
            ]
        for ok, what in checks + self._baseline_checks():
            if not ok:
                raise PlanError(f"{what}; {fix}")

    def _baseline_checks(self) -> list[tuple[bool, str]]:
        """(ok, what is wrong) for each baseline's seed and recomputed units."""
        bl, known = self.baseline, {u.name for u in self.units}
        named = (("bp", bl.bp), ("bp_checkpoint", bl.bp_checkpoint), ("bp_checkpoint_all", bl.bp_checkpoint_all))
        checks = []
        for name, base in named:
            if base is None:
                continue
            unknown = sorted(set(base.checkpointed_units or ()) - known)
            checks += [
                (
                    base.shuffle_seed is None or 0 <= base.shuffle_seed < 2**62,
                    f"baseline {name}'s shuffle_seed is {base.shuffle_seed}; it must be in [0, 2^62)",
                ),
                (not unknown, f"baseline {name} recomputes unknown units {unknown}"),
            ]
        return checks + _compile_checks(bl.bp_compile)

    def _check_units(self) -> None:
        """Every unit but the last has an aux head of a sane width; the last
        exits through the model's own head; shapes are positive."""
        for u in self.units:
            last = u.index == len(self.units) - 1
            if u.is_last != last or (u.aux is None) != last:
                raise PlanError(
                    f"unit {u.name} {'has' if u.aux is not None else 'lacks'} an aux head (is_last "
                    f"{u.is_last}); only the last unit exits through the model's head: re-create the plan"
                )
            if not u.output_shape or any(d < 1 for d in u.output_shape) or any(d < 1 for d in u.input_shape):
                raise PlanError(f"unit {u.name} has shapes {u.input_shape} -> {u.output_shape}; re-create the plan")
            if u.aux is not None and u.aux.width > 16 * max(u.output_shape[0], 8):
                raise PlanError(
                    f"unit {u.name}'s aux head is {u.aux.width} wide for {u.output_shape[0]} channels "
                    "(the planner offers at most the unit's channels): re-create the plan"
                )

    def _check_sources(self) -> None:
        """Every block reads what an earlier block wrote, and recomputes
        exactly the units between: a hand-edited plan that would read a
        missing cache or skip units is refused here, not mid-run."""
        known = {u.name for u in self.units}
        for b in self.blocks:
            bad = set(b.source().recompute_units) - known
            if bad:
                raise PlanError(f"block {b.index} recomputes unknown units {sorted(bad)}; re-create the plan")
            if b.index != self.blocks.index(b):
                raise PlanError(f"block at position {self.blocks.index(b)} has index {b.index}; re-create the plan")
            src = b.source()
            first = self.unit(b.units[0]).index
            if src.kind == "data":
                ok = b.index == 0 and src.source_block is None and not src.recompute_units
            else:
                j = src.source_block
                ok = b.index > 0 and (j is None or 0 <= j < b.index) and (src.kind == "recompute" or j == b.index - 1)
                if ok:
                    start = 0 if j is None else self.unit(self.blocks[j].units[-1]).index + 1
                    ok = (
                        [self.unit(u).index for u in src.recompute_units] == list(range(start, first))
                        and (j is None or self.blocks[j].cache is not None)
                        and (src.kind == "recompute") == (start < first)
                    )
            if not ok:
                raise PlanError(
                    f"block {b.index}'s input ({src.kind}, source block {src.source_block}, recomputing "
                    f"{src.recompute_units}) does not follow from the blocks before it; re-create the plan "
                    "with nf-plan"
                )
            if b.cache is not None and b.cache.file is not None:
                f = b.cache.file
                if (
                    f.startswith(("/", "\\"))
                    or ".." in f.replace("\\", "/").split("/")
                    or f.strip("./") == ""
                    or f.endswith(("/", "\\"))
                ):
                    raise PlanError(
                        f"block {b.index}'s cache file {f!r} is not a plain path inside the run "
                        "directory; re-create the plan with nf-plan"
                    )

    def _check_polish(self) -> None:
        """A polish that names known exits once each, with steps and rates training can use."""
        import math

        p = self.polish
        if p is None:
            return
        names = [e.unit for e in p.exits]
        known = {u.name for u in self.units}
        bad = (
            [f"polish.epochs is {p.epochs}; it must be a positive number"]
            if not (math.isfinite(p.epochs) and p.epochs > 0)
            else []
        )
        bad += [f"polish.lr_scale is {p.lr_scale}; it must be positive"] * (
            not (math.isfinite(p.lr_scale) and p.lr_scale > 0)
        )
        repeated = len(set(names)) != len(names) or bool(set(names) - known)
        bad += [f"polish names unknown or repeated exits {names}"] * repeated
        bad += [
            f"polish of {e.unit}: batch {e.batch_size}, {e.steps} steps, lr {e.lr}; each must be positive"
            for e in p.exits
            if e.batch_size < 1 or e.steps < 1 or not (math.isfinite(e.lr) and e.lr > 0)
        ]
        if bad:
            raise PlanError(f"{bad[0]}; re-create the plan with nf-plan")

    def exit_params(self, name: str) -> int:
        """Parameters of the model cut at exit ``name``: its units and its head (the last: the whole model)."""
        k = self.unit(name).index
        head = self.units[k].aux
        return sum(u.params for u in self.units[: k + 1]) + (head.params if head is not None else 0)

    def allowed_exits(self, min_reduction: float | None = None) -> list[str]:
        """The exits the run may keep: at least ``min_reduction`` (default
        ``exit_policy.min_reduction``) times smaller than the model."""
        r = self.exit_policy.min_reduction if min_reduction is None else min_reduction
        if r <= 1:
            return [u.name for u in self.units]
        return [u.name for u in self.units if self.exit_params(u.name) * r <= self.model.params]

    def units_past_size_limit(self) -> list[str]:
        """The units the exit size limit never trains: those after the last
        exit ``exit_policy.min_reduction`` allows. No exit of theirs could be
        kept, and local learning sends no gradient back from them, so
        training them would change nothing the run keeps."""
        allowed = self.allowed_exits()
        if self.exit_policy.min_reduction <= 1 or not allowed:
            return []
        last = max(self.unit(u).index for u in allowed)
        return [u.name for u in self.units[last + 1 :]]

    def blocks_past_size_limit(self) -> list[int]:
        """The blocks the exit size limit never runs: all of their units are
        past the last exit it allows (the run stops before them). The block
        holding that exit trains only up to it (``units_past_size_limit``)."""
        past = set(self.units_past_size_limit())
        return [b.index for b in self.blocks if past.issuperset(b.units)]

    def polish_exit(self, name: str) -> PolishExit | None:
        """The polish of exit ``name``: None without a polish, or where its prefix fits no batch."""
        if self.polish is None:
            return None
        return next((e for e in self.polish.exits if e.unit == name), None)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON (atomically), as ``nf-plan -o`` does."""
        save_plan(self, path)

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)

    def block_peak_bytes(self, block: Block) -> int:
        """The peak the plan's own unit profiles predict for ``block`` at its
        batch: the device workspace, every unit's resident state, and the
        largest one-unit step (units step one at a time), plus what
        recomputing its input costs (recorded by the planner)."""
        units = [self.unit(u) for u in block.units]
        return (
            self.device.workspace_bytes
            + sum(u.profile.static_bytes for u in units)
            + max(u.profile.dyn_fixed_bytes + u.profile.dyn_per_sample_bytes * block.batch_size for u in units)
            + block.predicted_peak_recompute_bytes
        )


def _compile_checks(bc: CompileBaseline | None) -> list[tuple[bool, str]]:
    """(ok, what is wrong) for the bp-compile baseline's grid."""
    if bc is None:
        return []
    batches = [c.batch_size for c in bc.candidates]
    return [
        (
            bool(bc.ratios) and all(0 < r <= 1 for r in bc.ratios),
            f"baseline bp_compile's ratios {bc.ratios} must be in (0, 1]",
        ),
        (
            bool(batches) and batches == sorted(set(batches)) and batches[0] >= 1,
            f"baseline bp_compile's batch sizes {batches} must ascend from >= 1",
        ),
        (
            all(c.lr > 0 and c.steps > 0 for c in bc.candidates),
            "baseline bp_compile's candidates need lr > 0 and steps > 0",
        ),
        (bc.epochs >= 1, f"baseline bp_compile's epochs is {bc.epochs}; it must be >= 1"),
        (
            0 <= bc.shuffle_seed < 2**62,
            f"baseline bp_compile's shuffle_seed is {bc.shuffle_seed}; it must be in [0, 2^62)",
        ),
    ]


def plan_from_dict(data: dict[str, Any]) -> Plan:
    """Validate ``data`` against the schema and build the typed plan."""
    _check_version(data)
    _validate(data)
    try:
        return record_from_json(Plan, data)
    except (KeyError, TypeError) as e:  # schema and dataclasses disagree: a bug
        raise AssertionError(f"plan passed the schema but not the types: {e}") from e


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return dataclasses.asdict(plan)


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> None:
    """Validate and write atomically (temp file, then rename)."""
    data = plan_to_dict(plan)
    _validate(data)
    atomic_write_json(data, path)


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read, validate and type a plan file. Raises PlanError with the fix."""
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"plan file {p} not found; make one with: nf-plan model.py --budget 1GB -o {p}")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"plan file {p} is not valid JSON ({e}); re-create it with nf-plan") from e
    if not isinstance(data, dict):
        raise PlanError(f"plan file {p} holds a JSON {type(data).__name__}, not a plan object")
    try:
        return plan_from_dict(data)
    except PlanError as e:
        raise PlanError(f"{p}: {e}") from e


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The JSON Schema of plan files."""
    text = resources.files("neuroflux.schemas").joinpath("plan.schema.json").read_text()
    return json.loads(text)


def _check_version(data: dict[str, Any]) -> None:
    version = data.get("schema_version")
    if not isinstance(version, str) or version.count(".") != 1:
        raise PlanError(f"schema_version is {version!r}, expected 'MAJOR.MINOR'; re-create the plan with nf-plan")
    major, minor = (int(x) if x.isdigit() else -1 for x in version.split("."))
    my_major, my_minor = (int(x) for x in SCHEMA_VERSION.split("."))
    if major > my_major or (major == my_major and minor > my_minor):
        raise PlanError(
            f"plan schema version {version} is newer than this NeuroFlux reads ({SCHEMA_VERSION}); "
            "upgrade neuroflux, or re-plan with this version's nf-plan"
        )
    if major != my_major or minor < 0:
        raise PlanError(
            f"plan schema version {version} is not supported (this NeuroFlux reads {SCHEMA_VERSION}); re-plan"
        )


def _validate(data: dict[str, Any]) -> None:
    validate_record(data, schema(), what="plan", fix="re-create it with nf-plan", error=PlanError)
