"""The service over real HTTP: `python server.py` in a subprocess, real clients, real nmap:
tokens in headers and URLs, kill -9, /healthz and Host/Origin, test_client.py. What the tools
do with a call is tested through in-memory clients in test_tools.py."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from tests.support import (
    ALICE,
    ROOT,
    SECRETS,
    Listeners,
    LiveServer,
    NmapWrapper,
    StartServer,
    call_tool,
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
    """With a wrong token test_client.py says why each check failed: 401 for the first ones,
    429 once its address has sent more refused tokens than failed_token_limit. Its good run
    sends 2 wrong tokens (its refusal checks), its bad run 10, in this order: url_token 2,
    bearer_header 3, wrong_token, wrong_url_token, quick_scan 3."""
    server = live_server(failed_token_limit=6)
    good = run_test_client(server, ALICE)
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.count("PASS ") == 7 and "7 passed, 0 failed" in good.stdout
    assert ALICE not in good.stdout + good.stderr
    bad = run_test_client(server, "not-the-right-token-at-all")
    assert bad.returncode == 1
    assert "FAIL url_token: HTTP 401, token not accepted: the token is not one of" in bad.stdout
    assert "FAIL quick_scan: HTTP 429, throttled: too many refused tokens from this address: retry in" in bad.stdout
    assert "PASS no_token" in bad.stdout and "PASS wrong_url_token: refused with 429" in bad.stdout
    assert run_test_client(server, ALICE).returncode == 0, "the valid token still works from that address"
