"""The plan and run formats: JSON Schemas (``plan.schema.json``,
``summary.schema.json``) and typed records.

``load_plan`` is the one way into a plan: it validates against the schema and
returns frozen dataclasses. ``load_summary`` is the one way into a run's
``summary.json``. Nothing below them passes string-keyed dicts around.

Where things live: ``plan.py`` the ``Plan``, its checks, ``load_plan`` and
``save_plan``; its records in ``specs.py`` (model, device, data, recipe, exit
policy), ``blocks.py`` (units and blocks), ``estimates.py`` (baselines,
predictions, solver and profile) and ``graph.py`` (the traced graph);
``summary.py`` the run summary; ``typed_json.py`` schema checks and JSON to
records; ``generate.py`` the JSON Schemas from the records.
"""

from neuroflux.schemas.blocks import AuxHead, Block, CacheSpec, Unit, UnitProfile
from neuroflux.schemas.estimates import Baseline, Baselines, Predicted, ProfileInfo, SolverInfo
from neuroflux.schemas.graph import GraphEdge, GraphNode
from neuroflux.schemas.plan import (
    SCHEMA_VERSION,
    Plan,
    PlanError,
    load_plan,
    plan_from_dict,
    plan_to_dict,
    save_plan,
    schema,
)
from neuroflux.schemas.specs import DeviceSpec, ExitPolicy, ModelSpec, Recipe
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
