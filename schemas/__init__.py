"""The plan and run formats: JSON Schemas (``plan.schema.json``,
``summary.schema.json``) and typed records.

``load_plan`` is the one way into a plan: it validates against the schema and
returns frozen dataclasses. ``load_summary`` is the one way into a run's
``summary.json``. Nothing below them passes string-keyed dicts around.
"""

from neuroflux.schemas.plan import (
    SCHEMA_VERSION,
    AuxHead,
    Baseline,
    Baselines,
    Block,
    CacheSpec,
    DeviceSpec,
    ExitPolicy,
    GraphEdge,
    GraphNode,
    ModelSpec,
    Plan,
    PlanError,
    Predicted,
    ProfileInfo,
    Recipe,
    SolverInfo,
    Unit,
    UnitProfile,
    load_plan,
    plan_from_dict,
    plan_to_dict,
    save_plan,
    schema,
)
from neuroflux.schemas.summary import BlockResult, RunSummary, Stopping, Throughput, load_summary, summary_from_dict


__all__ = [
    "SCHEMA_VERSION",
    "AuxHead",
    "Baseline",
    "Baselines",
    "Block",
    "CacheSpec",
    "DeviceSpec",
    "ExitPolicy",
    "GraphEdge",
    "GraphNode",
    "ModelSpec",
    "Plan",
    "PlanError",
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
    "BlockResult",
    "RunSummary",
    "Stopping",
    "Throughput",
    "load_summary",
    "summary_from_dict",
]
