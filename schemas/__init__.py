"""The plan format: JSON Schema (``plan.schema.json``) and typed records.

``load_plan`` is the one way into a plan: it validates against the schema and
returns frozen dataclasses. Nothing below it passes string-keyed dicts around.
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
]
