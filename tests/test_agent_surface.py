"""What an agent sees besides the scan tools, through in-memory clients of create_server(...)
(the in_memory fixture): the typed `scan` tool and its parity with custom_scan, nmap_version,
resources, prompts, instructions and serverInfo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import OpenClient
from tests.support import ROOT, Listeners, answer_of, call, error_text

pytestmark = pytest.mark.anyio


def queued_argvs(audit_log: Path) -> list[list[str]]:
    lines = audit_log.read_text().splitlines()
    return [entry["argv"] for entry in map(json.loads, lines) if entry["event"] == "queued"]


@pytest.mark.parametrize(("typed", "command"), [
    ({"targets": "127.0.0.1", "ports": "{p}"}, "-sT -p {p} -T3 127.0.0.1"),
    ({"targets": "127.0.0.1, 127.0.0.2", "top_ports": 20, "skip_host_discovery": True, "timing": "T4"},
     "-sT --top-ports 20 -Pn -T4 127.0.0.1 127.0.0.2"),
    ({"targets": "127.0.0.1", "ports": "{p}", "service_versions": True, "scripts": ["default", "safe"]},
     "-sT -p {p} -sV --script default,safe -T3 127.0.0.1"),
    ({"targets": "127.0.0.0/30", "scan_type": "ping"}, "-sn -T3 127.0.0.0/30"),
    ({"targets": ["127.0.0.1", "127.0.0.2, 127.0.0.3"], "ports": "{p}"},
     "-sT -p {p} -T3 127.0.0.1 127.0.0.2 127.0.0.3"),
])
async def test_the_typed_scan_builds_the_argv_custom_scan_builds(
    in_memory: OpenClient, listeners: Listeners, tmp_path: Path, typed: dict[str, Any], command: str
) -> None:
    [port] = listeners.open_free_top_ports(1)
    arguments = {k: v.format(p=port) if isinstance(v, str) else v for k, v in typed.items()}
    async with in_memory() as alice:
        answer = await answer_of(alice, "scan", **arguments, timeout=60)
        assert answer["status"] == "completed" and answer["kind"] == "custom"
        if "ports" in typed:
            assert port in {p["port"] for h in answer["result"]["hosts"] for p in h["ports"] if p["state"] == "open"}
        custom = await answer_of(alice, "custom_scan", command=command.format(p=port), timeout=60)
        assert custom["status"] == "completed"
    typed_argv, custom_argv = queued_argvs(tmp_path / "audit.jsonl")
    assert typed_argv == custom_argv


async def test_the_typed_scan_keeps_custom_scans_policy(in_memory: OpenClient) -> None:
    async with in_memory() as alice:
        syn = await call(alice, "scan", {"targets": "127.0.0.1", "scan_type": "syn"})
        assert error_text(syn).startswith("invalid_command: '-sS' needs raw packets")
        intrusive = await call(alice, "scan", {"targets": "127.0.0.1", "scripts": ["intrusive"]})
        assert error_text(intrusive).startswith("invalid_argument: scripts must be")
        outside = await call(alice, "scan", {"targets": "169.254.169.254"})
        assert error_text(outside).startswith("invalid_target: ")


async def test_nmap_version_tells_what_the_scanner_can_do(in_memory: OpenClient) -> None:
    async with in_memory() as alice:
        version = await answer_of(alice, "nmap_version")
    assert version["nmap_version"].count(".") >= 1 and "liblua" in " ".join(version["compiled_with"])
    assert version["raw_packet_scans"] is False and version["script_categories"] == [
        "default", "safe", "discovery", "version"]
    assert version["server_version"] == (ROOT / "VERSION").read_text().strip()


async def test_a_tasks_result_is_a_resource_only_its_token_reads(in_memory: OpenClient, listeners: Listeners) -> None:
    [port] = listeners.open_free_top_ports(1)
    async with in_memory(mode="legacy") as alice, in_memory("bob", mode="legacy") as bob:
        done = await answer_of(alice, "custom_scan", command=f"-p {port} 127.0.0.1")
        expected = await answer_of(alice, "get_task_result", task_id=done["task_id"])
        templates = await alice.list_resource_templates()
        assert [t.uri_template for t in templates] == ["nmap://tasks/{task_id}"]
        [read] = await alice.read_resource(f"nmap://tasks/{done['task_id']}")
        assert json.loads(read.text) == expected  # type: ignore[union-attr]
        with pytest.raises(Exception, match="not_found: no task"):
            await bob.read_resource(f"nmap://tasks/{done['task_id']}")


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_prompts_instructions_and_server_info(in_memory: OpenClient, mode: str) -> None:
    async with in_memory(mode=mode) as alice:
        prompts = {p.name: p for p in await alice.list_prompts()}
        assert set(prompts) == {"assess_network", "what_changed"}
        assessed = await alice.get_prompt("assess_network", {"network": "10.0.0.0/24"})
        text = assessed.messages[0].content.text  # type: ignore[union-attr]
        assert "quick_scan on 10.0.0.0/24" in text and "find_hosts" in text and "diff_scans" in text
        info = alice.server_info
        instructions = alice.instructions or ""
    assert info is not None and info.title == "nmap scanner" and info.description and info.name == "nmap-mcp"
    for tool in ("quick_scan", "get_task_result", "find_hosts", "diff_scans", "list_workers"):
        assert tool in instructions
