"""custom_scan, token scopes and the audit log through in-memory clients of create_server(...)
(the in_memory fixture), with real nmap on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastmcp import Client

from tests.commands import HOSTILE_COMMANDS, LEGITIMATE_COMMANDS, PRIVILEGED_COMMANDS
from tests.conftest import OpenClient
from tests.support import (
    ALICE,
    BOB,
    BannerServer,
    Listeners,
    NmapWrapper,
    answer_of,
    call,
    error_text,
    finished,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def banner() -> Iterator[BannerServer]:
    server = BannerServer()
    yield server
    server.stop()


def audit_records(directory: Path) -> list[dict]:
    """One record per tool call: its accepted, queued and done lines merged, in call order."""
    calls: dict[str, dict] = {}
    for line in (directory / "audit.jsonl").read_text().splitlines():
        entry = json.loads(line)
        merged = calls.setdefault(entry["call"], {"argv": None, "targets": None, "events": []})
        merged["events"].append(entry.pop("event"))
        merged.update({k: v for k, v in entry.items() if v is not None or k not in merged})
    assert all(call["events"][0] == "accepted" and call["events"][-1] == "done" for call in calls.values())
    return list(calls.values())


async def test_hostile_commands_are_refused_before_nmap_and_audited(
    in_memory: OpenClient, nmap_wrapper: NmapWrapper, tmp_path: Path
) -> None:
    watched = tmp_path / "watched"
    watched.mkdir()
    (watched / "x.nse").write_text(f'os.execute("touch {watched}/ran")')
    (watched / "targets").write_text("127.0.0.1\n")
    before = sorted(watched.iterdir())
    reasons = []
    async with in_memory(allowed_targets=["0.0.0.0/0", "::/0"]) as alice:
        for command in HOSTILE_COMMANDS:
            result = await call(alice, "custom_scan", {"command": command.format(tmp=watched)})
            reasons.append(error_text(result) if result.is_error else "")
            assert reasons[-1].startswith(("invalid_command: ", "invalid_target: ")) or (
                not command.strip() and result.is_error
            ), (command, reasons[-1])
    assert nmap_wrapper.pids() == [], "an nmap process started for a refused command"
    assert sorted(watched.iterdir()) == before, "a refused command created a file"
    records = [r for r in audit_records(tmp_path) if r["tool"] == "custom_scan"]
    assert len(records) == len(HOSTILE_COMMANDS)
    assert {r["verdict"] for r in records} <= {"refused", "error"}
    assert all(r["token"] == "alice" and r["argv"] is None for r in records)
    audit_text = (tmp_path / "audit.jsonl").read_text()
    assert ALICE not in audit_text and BOB not in audit_text


def expected_ports(names: list[str], ports: dict[str, int]) -> set[int]:
    return {ports[name] for name in names}


async def run_commands(client: Client, commands: list[tuple[str, list[str]]], ports: dict[str, int]) -> None:
    for command, open_names in commands:
        text = command.format(**{name: str(port) for name, port in ports.items()})
        answer = await answer_of(client, "custom_scan", command=text, timeout=60)
        assert answer["status"] == "completed", (text, answer)
        hosts = answer["result"]["hosts"]
        assert hosts, text
        reported = {p["port"] for h in hosts for p in h["ports"] if p["state"] == "open"}
        assert expected_ports(open_names, ports) <= reported, (text, reported)


async def test_legitimate_commands_run_real_nmap_and_return_parsed_results(
    in_memory: OpenClient, listeners: Listeners, banner: BannerServer
) -> None:
    p1, p2 = listeners.open_free_top_ports(2)
    async with in_memory() as alice:
        await run_commands(alice, LEGITIMATE_COMMANDS, {"p1": p1, "p2": p2, "banner": banner.port})
        versions = await answer_of(alice, "custom_scan", command=f"-sV -p {banner.port} 127.0.0.1")
    [port] = versions["result"]["hosts"][0]["ports"]
    assert port["service"] == "ssh" and port["untrusted"] == {"product": "OpenSSH", "version": "9.2p1 Debian 2+deb12u3"}


@pytest.mark.requires_root("raw-packet scans (-sS, -O), which need root or nmap with capabilities")
async def test_privileged_scans_when_the_server_allows_them(
    in_memory: OpenClient, listeners: Listeners, tmp_path: Path
) -> None:
    [p1] = listeners.open_free_top_ports(1)
    async with in_memory(privileged=True) as alice:
        await run_commands(alice, PRIVILEGED_COMMANDS, {"p1": p1})
        quick = await answer_of(alice, "quick_scan", target="127.0.0.1")
    assert quick["status"] == "completed"
    allowed = [r for r in audit_records(tmp_path) if r["verdict"] == "allowed" and r["tool"] == "quick_scan"]
    assert allowed[-1]["argv"][1] == "-sS" and "--privileged" in allowed[-1]["argv"]


async def test_unprivileged_server_always_passes_unprivileged(in_memory: OpenClient, tmp_path: Path) -> None:
    async with in_memory() as alice:
        await call(alice, "custom_scan", {"command": "-p 1 127.0.0.1"})
        # An address where nothing listens: the full scan ends with its discovery.
        await call(alice, "full_scan", {"target": "127.0.0.66", "timeout": 30})
    argvs = [r["argv"] for r in audit_records(tmp_path) if r["argv"]]
    assert len(argvs) == 2 and all("--unprivileged" in argv and argv[1] == "-sT" for argv in argvs)


async def test_custom_scan_result_survives_the_background_hand_off(
    in_memory: OpenClient, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    [p1] = listeners.open_free_top_ports(1)
    nmap_wrapper.set_delay(6)
    async with in_memory() as alice:
        first = await answer_of(alice, "custom_scan", command=f"-p {p1} 127.0.0.1", timeout=5)
        assert first["status"] == "running"
        answer = await finished(alice, first["task_id"])
    assert answer["status"] == "completed" and answer["kind"] == "custom"
    assert answer["result"]["hosts_up"] == 1 and not answer["result"]["partial"]
    assert [(p["port"], p["state"]) for p in answer["result"]["hosts"][0]["ports"]] == [(p1, "open")]


async def test_audit_record_of_an_allowed_call(in_memory: OpenClient, listeners: Listeners, tmp_path: Path) -> None:
    [p1] = listeners.open_free_top_ports(1)
    async with in_memory() as alice:
        answer = await answer_of(alice, "custom_scan", command=f"-sT -p{p1} --open localhost")
    assert answer["result"]["hosts"][0]["hostnames"] == ["localhost"]
    [record] = [r for r in audit_records(tmp_path) if r["tool"] == "custom_scan"]
    assert record["verdict"] == "allowed" and record["reason"] is None and record["token"] == "alice"
    assert record["targets"] == ["127.0.0.1"] and record["task_id"] == answer["task_id"]
    argv = record["argv"]
    assert argv[1:] == ["-sT", "-p", str(p1), "--open", "--host-timeout", "900000ms", "--max-rate", "50000", "-n", "-v",
                        "-oX", "/proc/self/fd/0", "--stats-every", "2s", "--unprivileged", "--", "127.0.0.1"]
    assert record["duration_ms"] > 0 and record["time"].endswith("+00:00")


async def test_wrong_argument_types_are_refused(in_memory: OpenClient, nmap_wrapper: NmapWrapper) -> None:
    async with in_memory() as alice:
        for command in (42, ["-p", "80", "127.0.0.1"], None, {"a": 1}, "x" * 2001):
            assert (await call(alice, "custom_scan", {"command": command})).is_error
    assert nmap_wrapper.pids() == []


async def test_tokens_can_be_limited_to_tools_and_to_targets(
    in_memory: OpenClient, nmap_wrapper: NmapWrapper, tmp_path: Path
) -> None:
    tokens = {
        "alice": {"secret": ALICE},
        "bob": {"secret": BOB, "tools": ["quick_scan", "get_task_result"], "allowed_targets": ["127.0.0.2/32"]},
    }
    async with in_memory(tokens=tokens) as alice, in_memory("bob", tokens=tokens) as bob:
        assert {tool.name for tool in await bob.list_tools()} == {"quick_scan", "get_task_result"}
        assert "custom_scan" in {tool.name for tool in await alice.list_tools()}
        forbidden = await call(bob, "custom_scan", {"command": "-p 1 127.0.0.2"})
        assert error_text(forbidden) == "forbidden: this token may not use custom_scan"
        outside = await call(bob, "quick_scan", {"target": "127.0.0.1"})
        assert "outside the networks this token may scan" in error_text(outside)
        assert nmap_wrapper.pids() == []
        inside = await answer_of(bob, "quick_scan", target="127.0.0.2")
        assert inside["status"] == "completed"
        quick = await answer_of(alice, "quick_scan", target="127.0.0.1")
        assert quick["status"] == "completed"
    verdicts = [(r["token"], r["tool"], r["verdict"]) for r in audit_records(tmp_path)]
    assert ("bob", "custom_scan", "refused") in verdicts and ("bob", "quick_scan", "allowed") in verdicts


async def test_the_allowlist_is_published_as_a_resource_the_description_links(in_memory: OpenClient) -> None:
    async with in_memory() as alice:
        tools = {tool.name: tool for tool in await alice.list_tools()}
        [published] = await alice.read_resource("nmap://help/custom_scan")
    description = tools["custom_scan"].description or ""
    assert "nmap://help/custom_scan" in description and len(description) < 1000
    for option in ("-sT", "-p VALUE", "--top-ports VALUE", "--script VALUE", "-T4", "--exclude VALUE"):
        assert f"  {option}:" in published.text  # type: ignore[union-attr]
    assert "  -sS:" not in published.text and "intrusive" in published.text  # type: ignore[union-attr]
