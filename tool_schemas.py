"""The JSON schemas the tools advertise, shaped once at start-up for the clients that read them.

Inputs: every parameter names one `type`. Pydantic writes an optional parameter as
`anyOf: [X, {"type": "null"}]` with `default: null`, which has no top-level type: the DeepSOC
tool page shows it as "()", and some model APIs (Gemini's, OpenAI-compatible gateways) read
only `type`. Leaving a parameter out already means its default, so the null branch is dropped
and X is what the parameter advertises (the tools still accept an explicit null). A parameter
that takes two real kinds (a string or a list) says so with a list of types.

Outputs: a client validates structuredContent against them; no client shown here hands them to
a model. The docstrings of result models and the defaults of output fields are dropped (the
field descriptions stay): each scan tool's schema lost about a sixth of its size.
MCP allows `$defs` within one schema but no definition shared between tools; the result models
are each used about once per schema, so `$defs` would not make them smaller (measured) and
VS Code Copilot reads `$ref` badly: every schema is inlined.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastmcp.utilities.json_schema import dereference_refs

NULL = {"type": "null"}
NAMED = ("properties", "$defs")


def input_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A tool's input schema inlined, with one top-level `type` for every parameter."""
    inlined = dereference_refs(schema)
    properties = {name: typed(prop) for name, prop in inlined.get("properties", {}).items()}
    return inlined | {"properties": properties}


def typed(prop: dict[str, Any]) -> dict[str, Any]:
    """One parameter's schema with a top-level `type`: the null branch of an optional parameter
    dropped, and branches of distinct types merged into one schema with a list of types."""
    if "anyOf" not in prop:
        return prop
    outer = {key: value for key, value in prop.items() if key != "anyOf"}
    branches = [branch for branch in prop["anyOf"] if branch != NULL]
    if len(branches) < len(prop["anyOf"]) and outer.get("default", 0) is None:
        outer.pop("default")
    merged = merge(branches)
    if merged is None:
        return outer | {"anyOf": branches}
    return merged | outer


def merge(branches: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Branches of distinct simple types as one schema (their keywords apply each to its own
    type); None when two branches share a type or disagree on a keyword."""
    types = [branch.get("type") for branch in branches]
    if not all(isinstance(kind, str) for kind in types) or len(set(types)) != len(types):
        return None
    merged: dict[str, Any] = {}
    for branch in branches:
        for key, value in branch.items():
            if key != "type" and merged.get(key, value) != value:
                return None
            merged[key] = value
    return merged | {"type": types[0] if len(types) == 1 else types}


def without_properties(schema: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The input schema without the parameters `names` (those this server would always refuse)."""
    hidden = set(names)
    properties = {name: prop for name, prop in schema["properties"].items() if name not in hidden}
    return schema | {"properties": properties}


def with_choices(schema: dict[str, Any], name: str, choices: Iterable[str], description: str) -> dict[str, Any]:
    """The input schema whose parameter `name` offers only `choices` of its enum, described anew."""
    prop = schema["properties"][name]
    offered = [value for value in prop["enum"] if value in set(choices)]
    return schema | {"properties": schema["properties"] | {name: prop | {"enum": offered, "description": description}}}


def output_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A tool's output schema inlined, without the docstrings of its models and enums or any default."""
    trimmed = _without_defaults(schema)
    definitions = {name: _without_docstring(model) for name, model in trimmed.get("$defs", {}).items()}
    root = _without_docstring(trimmed) | ({"$defs": definitions} if definitions else {})
    return dereference_refs(root)


def _without_docstring(model: dict[str, Any]) -> dict[str, Any]:
    # A model's own description is its Python docstring, and so is an enum's (TaskStatus's
    # lifecycle, 294 bytes in each of eight tools); a field that uses either keeps the
    # description written for the field, which dereferencing puts beside the model.
    if "properties" not in model and "enum" not in model:
        return model
    return {key: value for key, value in model.items() if key != "description"}


def _without_defaults(node: Any) -> Any:
    if isinstance(node, list):
        return [_without_defaults(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {key: _named(value) if key in NAMED else _without_defaults(value)
            for key, value in node.items() if key != "default"}


def _named(schemas: dict[str, Any]) -> dict[str, Any]:
    # Under `properties` and `$defs` the keys are names (a field may be called "default").
    return {name: _without_defaults(schema) for name, schema in schemas.items()}
