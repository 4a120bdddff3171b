"""Generate ``plan.schema.json`` and ``summary.schema.json`` from the typed
records (``plan.py`` and the records it is made of, ``summary.py``).

The schema files are committed (they are the published formats); this
generator keeps them in step with the records, and a test fails when they
drift. Run ``python -m neuroflux.schemas.generate`` after changing either.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from neuroflux.schemas.plan import SCHEMA_VERSION, Plan
from neuroflux.schemas.summary import RunSummary

__all__ = ["generate_schema", "generate_summary_schema"]

_NONNEG_SUFFIXES = ("_bytes", "_s", "params", "epochs", "steps", "index", "bytes", "width")


def _field_schema(name: str, tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return {"anyOf": [_field_schema(name, args[0], defs), {"type": "null"}]}
    if origin is typing.Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin is list:
        (item,) = typing.get_args(tp)
        return {"type": "array", "items": _field_schema(name, item, defs)}
    if origin is dict:
        key, value = typing.get_args(tp)
        assert key is str, "JSON object keys are strings"
        return {"type": "object", "additionalProperties": _field_schema(name, value, defs)}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        _add_def(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    base = {int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"}, bool: {"type": "boolean"}}[tp]
    out: dict[str, Any] = dict(base)
    if tp in (int, float) and name.endswith(_NONNEG_SUFFIXES):
        out["minimum"] = 0
    if name == "batch_size":
        out["minimum"] = 0
    return out


#: Fields that must be at least 1 (a zero would divide or build an empty layer).
_AT_LEAST_ONE = {
    ("Block", "batch_size"),
    ("Block", "epochs"),
    ("Block", "steps"),
    ("ModelSpec", "num_classes"),
    ("Recipe", "epochs_per_block"),
    ("Recipe", "train_size"),
    ("Recipe", "val_size"),
    ("Recipe", "base_batch_size"),
}


def _object_schema(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    props = {}
    for f in dataclasses.fields(cls):
        prop = _field_schema(f.name, hints[f.name], defs)
        if (cls.__name__, f.name) in _AT_LEAST_ONE:
            prop["minimum"] = 1
        doc = _field_doc(cls, f.name)
        if doc:
            prop = {"description": doc, **prop}
        props[f.name] = prop
    return {
        "type": "object",
        "description": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
        "properties": props,
        # A field with a default was added in a minor version: older plans omit it.
        "required": [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ],
        "additionalProperties": False,
    }


def _add_def(cls: type, defs: dict[str, Any]) -> None:
    if cls.__name__ not in defs:
        defs[cls.__name__] = {}  # placeholder against recursion
        defs[cls.__name__] = _object_schema(cls, defs)


def _field_doc(cls: type, name: str) -> str:
    """The attribute docstring under a field, read from the source."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for i, stmt in enumerate(body):
        if isinstance(stmt, ast.AnnAssign) and getattr(stmt.target, "id", None) == name:
            nxt = body[i + 1] if i + 1 < len(body) else None
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                return " ".join(str(nxt.value.value).split())
    return ""


def generate_schema() -> dict[str, Any]:
    defs: dict[str, Any] = {}
    top = _object_schema(Plan, defs)
    top["properties"]["schema_version"] = {
        "description": f"MAJOR.MINOR; this is version {SCHEMA_VERSION}",
        "type": "string",
        "pattern": r"^[0-9]+\.[0-9]+$",
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://neuroflux.dev/schemas/plan-{SCHEMA_VERSION}.json",
        "title": "NeuroFlux plan",
        **top,
        "$defs": dict(sorted(defs.items())),
    }


def generate_summary_schema() -> dict[str, Any]:
    defs: dict[str, Any] = {}
    top = _object_schema(RunSummary, defs)
    # A finished run has every field; a diverged one only the required few and its error.
    top["if"] = {"properties": {"status": {"const": "ok"}}}
    top["then"] = {
        "required": [f.name for f in dataclasses.fields(RunSummary) if f.name not in ("error", "stopped_early")]
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://neuroflux.dev/schemas/summary.json",
        "title": "NeuroFlux run summary (summary.json)",
        **top,
        "$defs": dict(sorted(defs.items())),
    }


def main() -> None:
    for name, schema in (("plan.schema.json", generate_schema()), ("summary.schema.json", generate_summary_schema())):
        path = Path(__file__).with_name(name)
        path.write_text(json.dumps(schema, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
