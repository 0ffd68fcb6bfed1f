"""The tools' schemas as clients and model APIs read them, from the real tools/list of in-memory
clients of create_server(...): one type for every parameter, only the scans this server runs on
offer, every input schema within what OpenAI-style function calling accepts, output schemas that
still validate real answers, and the size of the whole listing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from mcp.types import Tool

from tests.conftest import OpenClient
from tests.support import Listeners, answer_of, call, error_text

pytestmark = pytest.mark.anyio

# OpenAI's function calling ("Structured Outputs: supported schemas"): the types, the keywords
# of each type and the string formats it documents, at most 10 levels of nesting, at most 1000
# enum values in all. Strict mode also wants every property in `required` (optional ones typed
# as nullable) and no `default`, `minLength` or `maxLength`: meeting that would make every
# parameter of every tool required for all MCP clients, and the defaults and bounds the other
# clients show would be gone. So the schemas meet the non-strict rules checked here, which
# strict mode's only adds to; a client wanting strict mode has to rewrite `required` anyway.
TYPES = {"string", "number", "integer", "boolean", "object", "array", "null"}
ANY_TYPE = {"type", "description", "enum", "const", "default", "anyOf"}
TYPE_KEYWORDS = {
    "string": {"pattern", "format", "minLength", "maxLength"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "array": {"items", "minItems", "maxItems"},
    "object": {"properties", "required", "additionalProperties"},
    "boolean": set(), "null": set(),
}
FORMATS = {"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"}
MAX_DEPTH = 10
MAX_ENUM_VALUES = 1000
# tools/list of an unprivileged server in bytes (compact JSON): 129,141 before the schemas were
# shaped (tool_schemas), 109,176 after, 87,357 once the status tools (get_task_status,
# cancel_task, list_tasks) advertised a task's state rather than a whole answer with its result;
# 87,529 with plan_scan, once enums' docstrings (TaskStatus's lifecycle) left the output schemas;
# then the engagement tools (list_engagements returns states only, get_engagement rules) and
# get_task_evidence.
MAX_LISTING_BYTES = 100_000
# Objects whose properties are another tool's: plan_scan's `arguments` are those of the scan tool
# it names, checked against that tool's own schema (its schemas again here would add 4.8 kB).
FREE_FORM_OBJECTS = {"plan_scan.arguments"}


def problems(node: dict[str, Any], where: str, depth: int = 0) -> Iterator[str]:
    """Every way `node` (and what it nests) breaks the function-calling rules above."""
    if depth > MAX_DEPTH:
        yield f"{where}: nested deeper than {MAX_DEPTH}"
    if "anyOf" in node:
        for index, branch in enumerate(node["anyOf"]):
            yield from problems(branch, f"{where}.anyOf[{index}]", depth + 1)
        return
    kinds = node.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if not kinds or not set(kinds) <= TYPES:
        yield f"{where}: no JSON type ({kinds!r})"
        return
    if unknown := set(node) - ANY_TYPE - set().union(*(TYPE_KEYWORDS[kind] for kind in kinds)):
        yield f"{where}: keywords {sorted(unknown)} are not in the subset"
    if node.get("format", "date") not in FORMATS:
        yield f"{where}: format {node['format']!r} is not supported"
    if "array" in kinds:
        yield from problems(node.get("items", {}), f"{where}.items", depth + 1)
    if "object" in kinds:
        yield from object_problems(node, where, depth)


def object_problems(node: dict[str, Any], where: str, depth: int) -> Iterator[str]:
    if node.get("additionalProperties") is not False and where not in FREE_FORM_OBJECTS:
        yield f"{where}: additionalProperties is not false"
    if missing := set(node.get("required", ())) - set(node.get("properties", {})):
        yield f"{where}: required names unknown properties {sorted(missing)}"
    for name, prop in node.get("properties", {}).items():
        yield from problems(prop, f"{where}.{name}", depth + 1)


def enum_values(node: Any) -> int:
    if isinstance(node, list):
        return sum(enum_values(item) for item in node)
    if not isinstance(node, dict):
        return 0
    return len(node.get("enum", ())) + sum(enum_values(value) for value in node.values())


async def listed(in_memory: OpenClient, **config: object) -> dict[str, Tool]:
    async with in_memory(mode="legacy", **config) as alice:
        return {tool.name: tool for tool in await alice.list_tools()}


async def test_every_input_schema_is_an_openai_style_function_definition(in_memory: OpenClient) -> None:
    for privileged in (False, True):
        for name, tool in (await listed(in_memory, privileged=privileged)).items():
            schema = tool.input_schema
            assert schema["type"] == "object" and "anyOf" not in schema, name
            assert list(problems(schema, name)) == []
            assert enum_values(schema) <= MAX_ENUM_VALUES, name
            jsonschema.Draft202012Validator.check_schema(schema)


async def test_every_parameter_has_one_top_level_type(in_memory: OpenClient) -> None:
    tools = await listed(in_memory)
    untyped = [(name, parameter) for name, tool in tools.items()
               for parameter, prop in tool.input_schema["properties"].items() if "type" not in prop]
    assert untyped == []
    assert tools["find_hosts"].input_schema["properties"]["port"] == {
        "type": "integer", "minimum": 1, "maximum": 65535, "description": "Only hosts with this port"}
    assert tools["scan"].input_schema["properties"]["targets"]["type"] == ["string", "array"]


async def test_an_optional_parameter_still_takes_an_explicit_null(in_memory: OpenClient) -> None:
    async with in_memory() as alice:
        page = await answer_of(alice, "find_hosts", port=None, network=None)
        refused = await call(alice, "find_hosts", {"port": "22"})
    assert page["hosts"] == []
    assert error_text(refused) == "invalid_argument: port must be a whole number from 1 to 65535"


async def test_only_the_scans_this_server_runs_are_offered(in_memory: OpenClient) -> None:
    unprivileged = (await listed(in_memory))["scan"]
    privileged = (await listed(in_memory, privileged=True))["scan"]
    assert unprivileged.input_schema["properties"]["scan_type"]["enum"] == ["connect", "ping"]
    assert "os_detection" not in unprivileged.input_schema["properties"]
    assert "syn (SYN), udp" not in (unprivileged.description or "")
    assert privileged.input_schema["properties"]["scan_type"]["enum"] == ["connect", "syn", "udp", "ping"]
    assert privileged.input_schema["properties"]["os_detection"]["type"] == "boolean"
    async with in_memory() as alice:
        asked_anyway = await call(alice, "scan", {"targets": "127.0.0.1", "os_detection": True})
    assert error_text(asked_anyway).startswith("invalid_command: '-O' needs raw packets")


async def test_targets_are_a_list_or_one_string(in_memory: OpenClient) -> None:
    async with in_memory() as alice:
        empty = await call(alice, "scan", {"targets": []})
        too_long = await call(alice, "scan", {"targets": ["x" * 1001]})
    assert error_text(empty) == ("invalid_argument: targets must be a string of 1 to 1000 characters or a list of "
                                 "1 to 64 items")
    assert error_text(too_long).startswith("invalid_argument: targets")


async def test_output_schemas_validate_real_answers_and_the_listing_is_smaller(
    in_memory: OpenClient, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    async with in_memory(mode="legacy") as alice:
        tools = {tool.name: tool for tool in await alice.list_tools()}
        done = await answer_of(alice, "custom_scan", command=f"-sV -p {port} 127.0.0.1", timeout=60)
        answers = {"custom_scan": done,
                   "get_task_result": await answer_of(alice, "get_task_result", task_id=done["task_id"], view="full"),
                   "list_tasks": await answer_of(alice, "list_tasks")}
    for name, answer in answers.items():
        jsonschema.validate(answer, tools[name].output_schema or {})
    listing = [tool.model_dump(mode="json", by_alias=True, exclude_none=True) for tool in tools.values()]
    assert len(json.dumps({"tools": listing}, separators=(",", ":"))) < MAX_LISTING_BYTES
    assert "Everything nmap reports about one host" not in str(tools["quick_scan"].output_schema), "docstrings go"
