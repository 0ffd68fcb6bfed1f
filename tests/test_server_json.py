"""server.json, the MCP registry entry: valid against the registry's published schema and in
step with the project (VERSION, the README's ownership marker, the secret header)."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable
from importlib.resources import files
from typing import Any

import pytest
from jsonschema import Draft7Validator

from tests.support import ROOT

SCHEMA_ID = "https://static.modelcontextprotocol.io/schemas/2025-12-11/server.schema.json"
# The schema as published from modelcontextprotocol/static (commit a9ba437, 2025-12-12). The
# skillsaw package on PyPI ships that file unchanged; the hash proves the copy is that one.
SCHEMA_SHA256 = "3fba09590c99f61735d234822279f4223fab9e300c0a81e81c91ab62a4114de0"
# The registry's own name rule (internal/validators), stricter than the schema's pattern.
REGISTRY_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9.-]*[a-zA-Z0-9]/[a-zA-Z0-9][a-zA-Z0-9._-]*[a-zA-Z0-9]$")
SERVER = json.loads((ROOT / "server.json").read_text())
VERSION = (ROOT / "VERSION").read_text().strip()


def published_schema() -> dict[str, object]:
    raw = (files("skillsaw.schemas.mcp_registry.v2025_12_11") / "server.schema.json").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == SCHEMA_SHA256
    schema: dict[str, object] = json.loads(raw)
    assert schema["$id"] == SCHEMA_ID
    return schema


def errors(document: dict[str, object]) -> list[str]:
    validator = Draft7Validator(published_schema(), format_checker=Draft7Validator.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_server_json_is_valid_against_the_published_schema() -> None:
    assert SERVER["$schema"] == SCHEMA_ID
    assert errors(SERVER) == []


@pytest.mark.parametrize(
    "spoil",
    [
        lambda d: d.update(name="nmap-mcp"),
        lambda d: d["packages"][0].update(version="latest"),
        lambda d: d.update(description="x" * 101),
        lambda d: d["remotes"][0].update(url="ftp://{host}/mcp"),
        lambda d: d["packages"][0].pop("transport"),
    ],
)
def test_the_schema_rejects_a_spoilt_entry(spoil: Callable[[dict[str, Any]], object]) -> None:
    spoilt = copy.deepcopy(SERVER)
    spoil(spoilt)
    assert errors(spoilt)


def test_name_is_reverse_dns_under_a_github_account() -> None:
    assert REGISTRY_NAME.match(SERVER["name"])
    owner = re.fullmatch(r"io\.github\.([A-Za-z0-9-]+)/nmap-mcp", SERVER["name"])
    assert owner, SERVER["name"]
    # The registry lets a GitHub login publish only under its own io.github.<login>/ namespace.
    assert SERVER["repository"] == {"url": f"https://github.com/{owner.group(1)}/nmap-mcp", "source": "github"}


def test_versions_are_the_project_version() -> None:
    assert SERVER["version"] == VERSION
    assert [package["version"] for package in SERVER["packages"]] == [VERSION]


def test_pypi_package_runs_the_stdio_server_through_uvx() -> None:
    [package] = SERVER["packages"]
    assert package["registryType"] == "pypi" and package["identifier"] == "nmap-mcp"
    assert package["runtimeHint"] == "uvx" and package["transport"] == {"type": "stdio"}
    assert [(a["type"], a["value"]) for a in package["packageArguments"]] == [("positional", "--stdio")]


def test_remote_takes_a_host_and_a_secret_bearer_header() -> None:
    [remote] = SERVER["remotes"]
    assert remote["type"] == "streamable-http" and remote["url"].startswith("https://")
    assert set(re.findall(r"\{(\w+)\}", remote["url"])) == set(remote["variables"]) == {"host"}
    [header] = remote["headers"]
    assert header["name"] == "Authorization" and header["isSecret"] is True and header["isRequired"] is True
    assert header["description"]
    assert header["value"] == "Bearer {token}"
    assert header["variables"]["token"]["isSecret"] is True


def test_readme_carries_the_pypi_ownership_marker() -> None:
    # The registry proves ownership of a PyPI package by finding this line in its description.
    assert f"mcp-name: {SERVER['name']}" in (ROOT / "README.md").read_text()
