"""JSON data and typed records: checking data against a JSON Schema, and
building the frozen dataclasses from it. Plans and run summaries share both.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from neuroflux.errors import NeuroFluxError

__all__ = ["record_from_json", "validate_record"]


def record_from_json(tp: Any, value: Any) -> Any:
    """``value`` (JSON data already checked against the schema) as the typed
    record ``tp``: dataclasses, lists, optionals; ints become floats where
    the field is a float. Plans and run summaries are both read with it."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else record_from_json(args[0], value)
    if origin is list:
        (item,) = typing.get_args(tp)
        return [record_from_json(item, v) for v in value]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        kwargs = {
            f.name: record_from_json(hints[f.name], value[f.name])
            for f in dataclasses.fields(tp)
            if f.name in value or f.default is dataclasses.MISSING
        }
        return tp(**kwargs)
    if tp is float and isinstance(value, int):
        return float(value)
    if tp is int and isinstance(value, float):  # JSON Schema counts 12.0 as an integer; Python does not
        return int(value)
    return value


def validate_record(
    data: Any, schema_doc: dict[str, Any], *, what: str, fix: str, error: type[NeuroFluxError] = NeuroFluxError
) -> None:
    """Check ``data`` against a JSON Schema; the first problem (where, what,
    how many more) and ``fix`` become ``error``. A field the schema does not
    know is named as such."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema_doc)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        message = first.message
        if first.validator == "additionalProperties":
            known = set(first.schema.get("properties", {}))
            message = f"unknown field(s) {sorted(set(first.instance) - known)}"
        raise error(f"invalid {what} at {where}: {message}{more}; {fix}")
