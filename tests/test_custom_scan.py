"""custom_scan, token scopes and the audit log over real HTTP, with real nmap on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.commands import HOSTILE_COMMANDS, LEGITIMATE_COMMANDS, PRIVILEGED_COMMANDS
from tests.support import (
    ALICE,
    BOB,
    BannerServer,
    Listeners,
    LiveServer,
    NmapWrapper,
    StartServer,
    call_tool,
    error_text,
    poll_until_finished,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def banner() -> Iterator[BannerServer]:
    server = BannerServer()
    yield server
    server.stop()


def audit_records(server: LiveServer) -> list[dict]:
    """One record per tool call: its accepted, queued and done lines merged, in call order."""
    path = server.config_path.parent / "audit.jsonl"
    calls: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        merged = calls.setdefault(entry["call"], {"argv": None, "targets": None, "events": []})
        merged["events"].append(entry.pop("event"))
        merged.update({k: v for k, v in entry.items() if v is not None or k not in merged})
    assert all(call["events"][0] == "accepted" and call["events"][-1] == "done" for call in calls.values())
    return list(calls.values())


async def test_hostile_commands_are_refused_before_nmap_and_audited(
    live_server: StartServer, nmap_wrapper: NmapWrapper, tmp_path: Path
) -> None:
    watched = tmp_path / "watched"
    watched.mkdir()
    (watched / "x.nse").write_text(f'os.execute("touch {watched}/ran")')
    (watched / "targets").write_text("127.0.0.1\n")
    server = live_server(allowed_targets=["0.0.0.0/0", "::/0"])
    before = sorted(watched.iterdir())
    reasons = []
    for command in HOSTILE_COMMANDS:
        result = await call_tool(server.url, ALICE, "custom_scan", {"command": command.format(tmp=watched)})
        reasons.append(error_text(result) if result.is_error else "")
        assert reasons[-1].startswith(("invalid_command: ", "invalid_target: ")) or (
            not command.strip() and result.is_error
        ), (command, reasons[-1])
    assert nmap_wrapper.pids() == [], "an nmap process started for a refused command"
    assert sorted(watched.iterdir()) == before, "a refused command created a file"
    server.stop()
    records = [r for r in audit_records(server) if r["tool"] == "custom_scan"]
    assert len(records) == len(HOSTILE_COMMANDS)
    assert {r["verdict"] for r in records} <= {"refused", "error"}
    assert all(r["token"] == "alice" and r["argv"] is None for r in records)
    audit_text = (server.config_path.parent / "audit.jsonl").read_text()
    assert ALICE not in audit_text and BOB not in audit_text


def expected_ports(names: list[str], ports: dict[str, int]) -> set[int]:
    return {ports[name] for name in names}


async def run_commands(server: LiveServer, commands: list[tuple[str, list[str]]], ports: dict[str, int]) -> None:
    for command, open_names in commands:
        text = command.format(**{name: str(port) for name, port in ports.items()})
        result = await call_tool(server.url, ALICE, "custom_scan", {"command": text, "timeout": 60})
        assert not result.is_error, (text, result.content)
        answer = result.structured_content
        assert answer["status"] == "completed", (text, answer)
        hosts = answer["result"]["hosts"]
        assert hosts, text
        reported = {p["port"] for h in hosts for p in h["ports"] if p["state"] == "open"}
        assert expected_ports(open_names, ports) <= reported, (text, reported)


async def test_legitimate_commands_run_real_nmap_and_return_parsed_results(
    live_server: StartServer, listeners: Listeners, banner: BannerServer
) -> None:
    p1, p2 = listeners.open_free_top_ports(2)
    server = live_server()
    await run_commands(server, LEGITIMATE_COMMANDS, {"p1": p1, "p2": p2, "banner": banner.port})
    versions = await call_tool(server.url, ALICE, "custom_scan", {"command": f"-sV -p {banner.port} 127.0.0.1"})
    [port] = versions.structured_content["result"]["hosts"][0]["ports"]
    assert port["service"] == "ssh" and port["version"].startswith("OpenSSH 9.2p1")


@pytest.mark.requires_root("raw-packet scans (-sS, -O), which need root or nmap with capabilities")
async def test_privileged_scans_when_the_server_allows_them(live_server: StartServer, listeners: Listeners) -> None:
    [p1] = listeners.open_free_top_ports(1)
    server = live_server(privileged=True)
    await run_commands(server, PRIVILEGED_COMMANDS, {"p1": p1})
    quick = (await call_tool(server.url, ALICE, "quick_scan", {"target": "127.0.0.1"})).structured_content
    assert quick["status"] == "completed"
    allowed = [r for r in audit_records(server) if r["verdict"] == "allowed" and r["tool"] == "quick_scan"]
    assert allowed[-1]["argv"][1] == "-sS" and "--privileged" in allowed[-1]["argv"]


async def test_unprivileged_server_always_passes_unprivileged(live_server: StartServer) -> None:
    server = live_server()
    await call_tool(server.url, ALICE, "custom_scan", {"command": "-p 1 127.0.0.1"})
    await call_tool(server.url, ALICE, "full_scan", {"target": "127.0.0.1", "timeout": 5})
    argvs = [r["argv"] for r in audit_records(server) if r["argv"]]
    assert len(argvs) == 2 and all("--unprivileged" in argv and argv[1] == "-sT" for argv in argvs)


async def test_custom_scan_result_survives_the_background_hand_off(
    live_server: StartServer, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    [p1] = listeners.open_free_top_ports(1)
    nmap_wrapper.set_delay(6)
    server = live_server()
    first = (await call_tool(server.url, ALICE, "custom_scan", {"command": f"-p {p1} 127.0.0.1", "timeout": 5}))
    task_id = first.structured_content["task_id"]
    assert first.structured_content["status"] == "running"
    answer = await poll_until_finished(server.url, ALICE, task_id)
    assert answer["status"] == "completed" and answer["kind"] == "custom"
    assert [(p["port"], p["state"]) for p in answer["result"]["hosts"][0]["ports"]] == [(p1, "open")]


async def test_audit_record_of_an_allowed_call(live_server: StartServer, listeners: Listeners) -> None:
    [p1] = listeners.open_free_top_ports(1)
    server = live_server()
    answer = (await call_tool(server.url, ALICE, "custom_scan", {"command": f"-sT -p{p1} --open localhost"}))
    assert answer.structured_content["result"]["hosts"][0]["hostnames"] == ["localhost"]
    server.stop()
    [record] = [r for r in audit_records(server) if r["tool"] == "custom_scan"]
    assert record["verdict"] == "allowed" and record["reason"] is None and record["token"] == "alice"
    assert record["targets"] == ["127.0.0.1"] and record["task_id"] == answer.structured_content["task_id"]
    argv = record["argv"]
    assert argv[1:] == ["-sT", "-p", str(p1), "--open", "--host-timeout", "900s", "-n", "-oX", "-",
                        "--stats-every", "2s", "--unprivileged", "--", "127.0.0.1"]
    assert record["duration_ms"] > 0 and record["time"].endswith("+00:00")


async def test_wrong_argument_types_are_refused(live_server: StartServer, nmap_wrapper: NmapWrapper) -> None:
    server = live_server()
    for command in (42, ["-p", "80", "127.0.0.1"], None, {"a": 1}, "x" * 2001):
        assert (await call_tool(server.url, ALICE, "custom_scan", {"command": command})).is_error
    assert nmap_wrapper.pids() == []


async def list_tool_names(server: LiveServer, token: str) -> set[str]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http,
        Client(streamable_http_client(server.url, http_client=http)) as client,
    ):
        return {tool.name for tool in (await client.list_tools()).tools}


async def test_tokens_can_be_limited_to_tools_and_to_targets(
    live_server: StartServer, nmap_wrapper: NmapWrapper
) -> None:
    tokens = {
        "alice": {"secret": ALICE},
        "bob": {"secret": BOB, "tools": ["quick_scan", "get_task_result"], "allowed_targets": ["127.0.0.2/32"]},
    }
    server = live_server(tokens=tokens)
    assert await list_tool_names(server, BOB) == {"quick_scan", "get_task_result"}
    assert "custom_scan" in await list_tool_names(server, ALICE)
    forbidden = await call_tool(server.url, BOB, "custom_scan", {"command": "-p 1 127.0.0.2"})
    assert error_text(forbidden) == "forbidden: this token may not use custom_scan"
    outside = await call_tool(server.url, BOB, "quick_scan", {"target": "127.0.0.1"})
    assert "outside the networks this token may scan" in error_text(outside)
    assert nmap_wrapper.pids() == []
    inside = await call_tool(server.url, BOB, "quick_scan", {"target": "127.0.0.2"})
    assert inside.structured_content["status"] == "completed"
    quick = await call_tool(server.url, ALICE, "quick_scan", {"target": "127.0.0.1"})
    assert quick.structured_content["status"] == "completed"
    server.stop()
    verdicts = [(r["token"], r["tool"], r["verdict"]) for r in audit_records(server)]
    assert ("bob", "custom_scan", "refused") in verdicts and ("bob", "quick_scan", "allowed") in verdicts


async def test_the_allowlist_is_published_as_a_resource_the_description_links(live_server: StartServer) -> None:
    server = live_server()
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {ALICE}"}) as http,
        Client(streamable_http_client(server.url, http_client=http)) as client,
    ):
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        published = (await client.read_resource("nmap://help/custom_scan")).contents[0].text  # type: ignore[union-attr]
    description = tools["custom_scan"].description or ""
    assert "nmap://help/custom_scan" in description and len(description) < 1000
    for option in ("-sT", "-p VALUE", "--top-ports VALUE", "--script VALUE", "-T4", "--exclude VALUE"):
        assert f"  {option}:" in published
    assert "  -sS:" not in published and "intrusive" in published
