"""A small JSON Schema (draft 2020-12) checker for the schemas in docs/schemas/ — the subset
they use: type, properties, required, additionalProperties, items, enum, const, $ref to
$defs, anyOf, oneOf, minimum, format uuid — so the tests need nothing but the standard
library."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any, Optional

SCHEMAS = Path(__file__).resolve().parent.parent.parent / "docs" / "schemas"

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def load(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{name}.json").read_text())  # type: ignore[no-any-return]


def errors(value: Any, schema: Any, root: dict[str, Any], path: str = "$") -> list[str]:
    """What is wrong with ``value`` against ``schema`` (empty: valid)."""
    if schema is True or schema == {}:
        return []
    if schema is False:
        return [f"{path}: nothing is allowed here"]
    out: list[str] = []
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        out += errors(value, root["$defs"][ref[len("#/$defs/"):]], root, path)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            return out + [f"{path}: {value!r} is not of type {types}"]
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {value!r} not in {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        out.append(f"{path}: {value!r} is not {schema['const']!r}")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        out.append(f"{path}: {value} < {schema['minimum']}")
    if schema.get("format") == "uuid" and isinstance(value, str):
        try:
            uuid.UUID(value)
        except ValueError:
            out.append(f"{path}: {value!r} is not a uuid")
    if "anyOf" in schema:
        if not any(not errors(value, s, root, path) for s in schema["anyOf"]):
            out.append(f"{path}: matches none of anyOf")
    if "oneOf" in schema:
        matching = [s for s in schema["oneOf"] if not errors(value, s, root, path)]
        if len(matching) != 1:
            detail = [errors(value, s, root, path)[:2] for s in schema["oneOf"]]
            out.append(f"{path}: matches {len(matching)} of oneOf: {detail}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for req in schema.get("required", []):
            if req not in value:
                out.append(f"{path}: missing {req!r}")
        for k, v in value.items():
            if k in props:
                out += errors(v, props[k], root, f"{path}.{k}")
            else:
                extra = schema.get("additionalProperties", True)
                if extra is False:
                    out.append(f"{path}: property {k!r} is not allowed")
                elif isinstance(extra, dict):
                    out += errors(v, extra, root, f"{path}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            out += errors(v, schema["items"], root, f"{path}[{i}]")
    return out


def validate(value: Any, name: str) -> list[str]:
    schema = load(name)
    return errors(value, schema, schema)


class Index:
    """docs/schemas/index.json: which message (and reply) goes on which subject."""

    def __init__(self, ns: str) -> None:
        self.entries = json.loads((SCHEMAS / "index.json").read_text())
        self.routes: list[tuple[re.Pattern[str], dict[str, Any]]] = []
        for e in self.entries:
            subject = e["subject"]
            if not subject.startswith("<ns>."):
                continue  # KV values: checked separately
            pattern = re.escape(subject)
            pattern = pattern.replace(re.escape("<ns>"), re.escape(ns))
            pattern = pattern.replace(re.escape("<agent_id>"), r"[^.]+")
            pattern = pattern.replace(re.escape("<task_id>"), r"[^.]+")
            pattern = pattern.replace(re.escape("<event type>"), r".+")
            self.routes.append((re.compile(f"^{pattern}$"), e))

    def entry(self, subject: str) -> Optional[dict[str, Any]]:
        for rx, e in self.routes:
            if rx.match(subject):
                return e
        return None
