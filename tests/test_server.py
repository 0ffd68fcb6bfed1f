"""The service over real HTTP: `python server.py` in a subprocess, real clients, real nmap."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from tests.support import (
    ALICE,
    BOB,
    ROOT,
    SECRETS,
    Listeners,
    LiveServer,
    NmapWrapper,
    StartServer,
    call_tool,
    error_text,
    failure_of,
    poll_until_finished,
    post,
    wait_until,
)

pytestmark = pytest.mark.anyio
async def test_auth_matrix_in_both_eras_and_no_token_in_any_log(
    live_server: StartServer, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    server = live_server()
    for mode in ("legacy", "auto"):
        for via in ("header", "query"):
            result = await call_tool(server.url, ALICE, "quick_scan", {"target": "127.0.0.1"}, mode=mode, via=via)
            assert not result.is_error, (mode, via)
            assert result.structured_content["status"] == "completed"
            ports = result.structured_content["result"]["hosts"][0]["ports"]
            assert {"port": port, "protocol": "tcp", "state": "open"}.items() <= next(
                p for p in ports if p["port"] == port
            ).items()
        for via in ("header", "query"):
            refused = await failure_of(call_tool(server.url, "wrong-" + "x" * 20, "list_tasks", {}, mode=mode, via=via))
            assert isinstance(refused, MCPError), (mode, via, refused)
    missing = post(server)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    wrong = post(server, Authorization="Bearer " + ALICE[:-1] + "z")
    assert wrong.status_code == 401 and "invalid_token" in wrong.headers["www-authenticate"]
    wrong_query = post(server, url=f"{server.url}?token={ALICE[:-1]}z")
    assert wrong_query.status_code == 401
    assert post(server, url=f"{server.url}?token={ALICE}").status_code == 200
    server.stop()
    log = server.log_text()
    assert "POST /mcp" in log and "DEBUG" in log, "the log must be the real, verbose one"
    for secret in SECRETS.values():
        assert secret not in log
        assert secret[:-1] not in log


async def test_query_token_is_ignored_when_disabled(live_server: StartServer) -> None:
    server = live_server(allow_query_token=False)
    assert post(server, url=f"{server.url}?token={ALICE}").status_code == 401
    assert post(server, Authorization=f"Bearer {ALICE}").status_code == 200
    server.stop()
    assert ALICE not in server.log_text()


async def test_quick_scan_reports_exactly_the_test_listeners(live_server: StartServer, listeners: Listeners) -> None:
    ports = listeners.open_free_top_ports(3)
    server = live_server()

    async def open_ports(**flags: bool) -> tuple[set[int], str | None]:
        result = (await call_tool(server.url, ALICE, "quick_scan", {"target": "127.0.0.1", **flags})).structured_content
        [host] = result["result"]["hosts"]
        return {p["port"] for p in host["ports"] if p["state"] == "open" and p["port"] in ports}, result["message"]

    assert await open_ports() == (set(ports), None)
    listeners.close_all()
    cached, message = await open_ports()
    assert cached == set(ports) and "pass rescan=true to scan again" in (message or "")
    assert await open_ports(rescan=True) == (set(), None)


async def test_a_scan_longer_than_the_wait_returns_a_task_id_and_runs_once(
    live_server: StartServer, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    nmap_wrapper.set_delay(6)
    server = live_server()
    first = (await call_tool(server.url, ALICE, "quick_scan", {"target": "127.0.0.1", "timeout": 5})).structured_content
    assert first["status"] == "running" and first["result"] is None
    assert f"get_task_result with task_id '{first['task_id']}'" in first["message"]
    final = await poll_until_finished(server.url, ALICE, first["task_id"])
    assert final["status"] == "completed"
    assert port in {p["port"] for p in final["result"]["hosts"][0]["ports"]}
    assert len(nmap_wrapper.pids()) == 1


async def test_simultaneous_calls_respect_concurrency_and_queue_bounds(
    live_server: StartServer, nmap_wrapper: NmapWrapper
) -> None:
    nmap_wrapper.set_delay(1)
    server = live_server(max_concurrent_tasks=2, max_queued_tasks=3)
    calls = [
        asyncio.create_task(call_tool(server.url, ALICE, "quick_scan",
                                      {"target": "127.0.0.1", "timeout": 30, "rescan": True}))
        for _ in range(10)
    ]
    peak = 0
    while not all(call.done() for call in calls):
        peak = max(peak, len(nmap_wrapper.alive()))
        await asyncio.sleep(0.01)
    results = [call.result() for call in calls]
    refused = [error_text(r) for r in results if r.is_error]
    accepted = [r.structured_content for r in results if not r.is_error]
    assert peak == 2
    assert refused and all(text.startswith("queue_full: the scan queue is full") for text in refused)
    assert all(a["status"] == "completed" for a in accepted)
    assert len(nmap_wrapper.pids()) == len(accepted)


async def test_cancel_task_stops_nmap(live_server: StartServer, nmap_wrapper: NmapWrapper) -> None:
    nmap_wrapper.set_delay(60)
    server = live_server()
    started = (await call_tool(server.url, ALICE, "quick_scan",
                               {"target": "127.0.0.1", "timeout": 5})).structured_content
    [pid] = nmap_wrapper.alive()
    cancelled = (await call_tool(server.url, ALICE, "cancel_task", {"task_id": started["task_id"]})).structured_content
    assert cancelled["status"] == "cancelled"
    assert nmap_wrapper.alive() == [] and pid in nmap_wrapper.pids()
    again = await call_tool(server.url, ALICE, "cancel_task", {"task_id": started["task_id"]})
    assert error_text(again) == f"already_finished: task {started['task_id']} is already cancelled"


async def test_kill_9_then_restart_resolves_the_task_and_frees_capacity(
    live_server: StartServer, nmap_wrapper: NmapWrapper
) -> None:
    nmap_wrapper.set_delay(60)
    server = live_server(max_concurrent_tasks=1, lease_seconds=2)
    started = (await call_tool(server.url, ALICE, "quick_scan",
                               {"target": "127.0.0.1", "timeout": 5})).structured_content
    assert started["status"] == "running"
    [pid] = nmap_wrapper.alive()
    server.kill()
    assert wait_until(lambda: nmap_wrapper.alive() == [], 5), "nmap outlived the server"
    nmap_wrapper.set_delay(0)
    server.start()
    fresh = (await call_tool(server.url, ALICE, "quick_scan", {"target": "127.0.0.1", "timeout": 20, "rescan": True})
             ).structured_content
    assert fresh["status"] == "completed", "the dead worker's task must not hold the new worker's capacity"
    final = await poll_until_finished(server.url, ALICE, started["task_id"], timeout=10)
    assert final["status"] == "interrupted" and "submit it again" in final["error"]
    assert len(nmap_wrapper.pids()) == 2 and pid in nmap_wrapper.pids()


async def test_tokens_cannot_see_each_others_tasks(live_server: StartServer) -> None:
    server = live_server()
    mine = (await call_tool(server.url, ALICE, "quick_scan", {"target": "127.0.0.1"})).structured_content
    unknown = "00000000-0000-4000-8000-000000000000"
    for tool in ("get_task_status", "get_task_result", "cancel_task"):
        foreign = error_text(await call_tool(server.url, BOB, tool, {"task_id": mine["task_id"]}))
        missing = error_text(await call_tool(server.url, BOB, tool, {"task_id": unknown}))
        assert foreign == missing.replace(unknown, mine["task_id"]) == f"not_found: no task '{mine['task_id']}'"
    assert (await call_tool(server.url, BOB, "list_tasks", {})).structured_content == {"tasks": []}
    listed = (await call_tool(server.url, ALICE, "list_tasks", {"status": "completed"})).structured_content
    assert [t["task_id"] for t in listed["tasks"]] == [mine["task_id"]]


@pytest.mark.parametrize("target_template", [
    "--script={tmp}/x.nse", "-oN{tmp}/x", "-iL/etc/passwd", "127.0.0.1;id", "127.0.0.1 -oN{tmp}/y",
    "$(touch {tmp}/z)", "0177.0.0.1", "169.254.169.254", "::ffff:127.0.0.1", "10.0.0.0/8",
])
async def test_hostile_targets_are_refused_before_nmap_starts(
    live_server: StartServer, nmap_wrapper: NmapWrapper, tmp_path: Path, target_template: str
) -> None:
    (tmp_path / "x.nse").write_text('os.execute("touch ' + str(tmp_path / "ran") + '")')
    server = live_server(allowed_targets=["0.0.0.0/0"])
    before = set(tmp_path.iterdir())
    for tool in ("quick_scan", "full_scan"):
        result = await call_tool(server.url, ALICE, tool, {"target": target_template.format(tmp=tmp_path)})
        assert error_text(result).startswith("invalid_target: ")
    assert nmap_wrapper.pids() == []
    assert set(tmp_path.iterdir()) == before


async def test_input_validation_is_strict(live_server: StartServer, nmap_wrapper: NmapWrapper) -> None:
    server = live_server()
    for args in ({"target": "127.0.0.1", "timeout": "30"}, {"target": "127.0.0.1", "timeout": 4},
                 {"target": "127.0.0.1", "timeout": 301}, {"target": "127.0.0.1", "extra": 1}, {}):
        result = await call_tool(server.url, ALICE, "quick_scan", args)
        assert result.is_error, args
    bad_id = await call_tool(server.url, ALICE, "get_task_status", {"task_id": "../../etc/passwd"})
    assert bad_id.is_error
    assert nmap_wrapper.pids() == []


async def test_tools_describe_themselves(live_server: StartServer) -> None:
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    server = live_server()
    async with (httpx2.AsyncClient(headers={"Authorization": f"Bearer {ALICE}"}) as http,
                Client(streamable_http_client(server.url, http_client=http), mode="legacy") as client):
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) == {"quick_scan", "full_scan", "custom_scan", "get_task_status", "get_task_result",
                          "list_tasks", "cancel_task", "diff_scans", "list_workers", "find_hosts", "top_values",
                          "scan", "nmap_version", "get_limits",
                          "schedule_scan", "list_schedules", "delete_schedule"}
    for tool in tools.values():
        assert tool.description and tool.output_schema and tool.annotations
    assert "--top-ports 100" in tools["quick_scan"].description
    assert tools["quick_scan"].input_schema["properties"]["timeout"]["maximum"] == 300
    assert tools["full_scan"].input_schema["properties"]["timeout"]["maximum"] == 600
    assert tools["get_task_status"].annotations.read_only_hint is True
    assert tools["cancel_task"].annotations.destructive_hint is True
    assert tools["delete_schedule"].annotations.destructive_hint is True
    assert "X-Nmap-MCP-Signature" in tools["schedule_scan"].description


async def test_healthz_needs_no_token_and_host_origin_protection_is_on(live_server: StartServer) -> None:
    server = live_server()
    health = httpx.get(f"http://127.0.0.1:{server.port}/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert post(server, Host="evil.example", Authorization=f"Bearer {ALICE}").status_code == 421
    assert post(server, Origin="http://evil.example", Authorization=f"Bearer {ALICE}").status_code == 403


def run_test_client(server: LiveServer, token: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "test_client.py"), token, "--url", server.url],
        capture_output=True, text=True, timeout=120, check=False,
    )


async def test_test_client_passes_on_a_live_server_and_fails_with_a_wrong_token(live_server: StartServer) -> None:
    server = live_server()
    good = run_test_client(server, ALICE)
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.count("PASS ") == 7 and "7 passed, 0 failed" in good.stdout
    assert ALICE not in good.stdout + good.stderr
    bad = run_test_client(server, "not-the-right-token-at-all")
    assert bad.returncode == 1
    assert "FAIL url_token: HTTP 401, token not accepted: the token is not one of" in bad.stdout
    assert "FAIL quick_scan: HTTP 401, token not accepted" in bad.stdout
    assert "PASS no_token" in bad.stdout


async def test_identical_scans_share_one_task_unless_rescan(
    live_server: StartServer, nmap_wrapper: NmapWrapper
) -> None:
    nmap_wrapper.set_delay(1)
    server = live_server()
    first, second = await asyncio.gather(*(
        call_tool(server.url, ALICE, "quick_scan", {"target": "127.0.0.2", "timeout": 30}) for _ in range(2)
    ))
    ids = {first.structured_content["task_id"], second.structured_content["task_id"]}
    assert len(ids) == 1 and len(nmap_wrapper.pids()) == 1
    fresh = await call_tool(server.url, ALICE, "quick_scan", {"target": "127.0.0.2", "rescan": True})
    assert fresh.structured_content["task_id"] not in ids and len(nmap_wrapper.pids()) == 2
    others = await call_tool(server.url, BOB, "quick_scan", {"target": "127.0.0.2"})
    assert others.structured_content["task_id"] not in ids and len(nmap_wrapper.pids()) == 3
