"""Flatten an OpenAPI schema into rows for the offline /docs page (no Swagger UI, no CDN)."""

from __future__ import annotations

from typing import NamedTuple


class Param(NamedTuple):
    name: str
    where: str
    type: str
    required: bool


class Operation(NamedTuple):
    method: str
    path: str
    summary: str
    description: str
    params: list[Param]
    body: str


def _type(schema: dict) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_type(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list[{_type(schema.get('items', {}))}]"
    if "enum" in schema:
        return " | ".join(repr(v) for v in schema["enum"])
    if "const" in schema:
        return repr(schema["const"])
    return str(schema.get("type", "any"))


def operations(spec: dict) -> list[Operation]:
    out = []
    for path, methods in spec.get("paths", {}).items():
        for method, op in methods.items():
            params = [Param(p["name"], p.get("in", ""), _type(p.get("schema", {})), bool(p.get("required")))
                      for p in op.get("parameters", [])]
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            out.append(Operation(method.upper(), path, op.get("summary", ""), op.get("description", ""), params,
                                 _type(body) if body else ""))
    return out


def schemas(spec: dict) -> list[tuple[str, list[tuple[str, str, str]]]]:
    out = []
    for name, schema in sorted(spec.get("components", {}).get("schemas", {}).items()):
        if name in ("HTTPValidationError", "ValidationError"):
            continue
        fields = [(fname, _type(f), f.get("description", "")) for fname, f in schema.get("properties", {}).items()]
        out.append((name, fields))
    return out
