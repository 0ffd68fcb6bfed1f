"""GET /metrics through live servers: values after real scans (real nmap on 127.0.0.1, ports the
test opened), refused calls and wrong tokens; the queue of a slowed-down worker; metrics_token;
and a `--worker` process serving /metrics and /healthz alone on its metrics_port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sqlite3
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from config import ConfigError, load_settings
from tests.support import (
    ALICE,
    SECRETS,
    START_UP_SECONDS,
    Listeners,
    NmapWrapper,
    ServiceProcess,
    StartServer,
    call_tool,
    error_text,
    free_port,
    poll_until_finished,
    post,
    raw_tool_call,
    server_argv,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.anyio
METRICS_SECRET = "metrics-secret-" + "m" * 30
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int, token: str = METRICS_SECRET) -> Samples:
    """Every sample of the /metrics page on 127.0.0.1:port, by name and labels."""
    page = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(page.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_a_quick_scan_refused_calls_and_an_internal_error_are_counted(
    live_server: StartServer, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    server = live_server(metrics_token=METRICS_SECRET)
    before = scrape(server.port)
    assert value(before, "nmap_mcp_scans_total", kind="quick", status="completed") == 0
    assert value(before, "nmap_mcp_tool_calls_total", tool="quick_scan", verdict="allowed") == 0
    answer = (await call_tool(server.url, ALICE, "quick_scan", {"target": "127.0.0.1"})).structured_content
    assert answer["status"] == "completed"
    assert port in {p["port"] for p in answer["result"]["hosts"][0]["ports"] if p["state"] == "open"}
    refused = await call_tool(server.url, ALICE, "custom_scan", {"command": "-oN /tmp/x 127.0.0.1"})
    assert error_text(refused).startswith("invalid_command:")
    unknown = await raw_tool_call(server.url, ALICE, "no_such_tool_" + "x" * 40, {})
    assert unknown["isError"]
    # A row the store cannot read (a damaged database): the tool fails inside, an `error`.
    with contextlib.closing(sqlite3.connect(server.config_path.parent / "tasks.db")) as db, db:
        db.execute("UPDATE tasks SET argv = 'not json' WHERE id = ?", (answer["task_id"],))
    broken = await call_tool(server.url, ALICE, "get_task_status", {"task_id": answer["task_id"]})
    assert error_text(broken).startswith("internal_error:")
    after = scrape(server.port)
    assert value(after, "nmap_mcp_scans_total", kind="quick", status="completed") == 1
    assert value(after, "nmap_mcp_scan_duration_seconds_count", kind="quick") == 1
    assert 0 < value(after, "nmap_mcp_scan_duration_seconds_sum", kind="quick") < 30  # type: ignore[operator]
    bounds = {dict(labels)["le"] for name, labels in after if name == "nmap_mcp_scan_duration_seconds_bucket"}
    assert min(bounds, key=float) == "0.05" and max(bounds - {"+Inf"}, key=float) == "3600.0"
    assert value(after, "nmap_mcp_scan_duration_seconds_bucket", kind="quick", le="+Inf") == 1
    assert value(after, "nmap_mcp_tool_calls_total", tool="quick_scan", verdict="allowed") == 1
    assert value(after, "nmap_mcp_tool_calls_total", tool="custom_scan", verdict="refused") == 1
    assert value(after, "nmap_mcp_tool_calls_total", tool="unknown", verdict="refused") == 1
    assert value(after, "nmap_mcp_tool_calls_total", tool="get_task_status", verdict="error") == 1
    audited = [json.loads(line) for line in (server.config_path.parent / "audit.jsonl").read_text().splitlines()]
    assert [r["verdict"] for r in audited if r["event"] == "done" and r["tool"] == "get_task_status"] == ["error"]
    assert not [key for key in after if "no_such_tool" in str(key)], "a caller's tool name became a series"
    assert value(after, "nmap_mcp_nmap_processes") == 0
    assert value(after, "nmap_mcp_database_up") == 1
    assert not [key for key in after if key[0] == "nmap_mcp_database_errors_total"]


def test_auth_failures_count_the_401s_of_the_mcp_endpoint_by_reason(live_server: StartServer) -> None:
    server = live_server(allow_query_token=False, metrics_token=METRICS_SECRET)
    assert post(server).status_code == 401
    assert post(server, Authorization="Bearer wrong-token").status_code == 401
    assert post(server, Authorization="Bearer wrong-token").status_code == 401
    assert post(server, url=f"{server.url}?token={ALICE}").status_code == 401
    assert post(server, Authorization=f"Bearer {ALICE}").status_code == 200
    samples = scrape(server.port)
    assert value(samples, "nmap_mcp_auth_failures_total", endpoint="mcp", reason="missing_token") == 1
    assert value(samples, "nmap_mcp_auth_failures_total", endpoint="mcp", reason="wrong_token") == 2
    assert value(samples, "nmap_mcp_auth_failures_total", endpoint="mcp", reason="query_token_off") == 1


async def test_queue_depth_running_scans_and_nmap_processes_of_a_slow_worker(
    live_server: StartServer, nmap_wrapper: NmapWrapper
) -> None:
    nmap_wrapper.set_delay(60)
    server = live_server(max_concurrent_tasks=1, lease_seconds=3, metrics_token=METRICS_SECRET)
    calls = [call_tool(server.url, ALICE, "quick_scan", {"target": "127.0.0.1", "timeout": 5, "rescan": True})
             for _ in range(2)]
    answers = [result.structured_content for result in await asyncio.gather(*calls)]
    assert sorted(a["status"] for a in answers) == ["queued", "running"]
    samples = scrape(server.port)
    assert value(samples, "nmap_mcp_queue_depth", pool="default") == 1
    assert value(samples, "nmap_mcp_running_scans", pool="default") == 1
    assert value(samples, "nmap_mcp_workers_alive", pool="default") == 1
    assert value(samples, "nmap_mcp_nmap_processes") == 1
    # The queued one first: cancelled the other way round, it would start in the freed slot.
    for answer in sorted(answers, key=lambda a: a["status"] != "queued"):
        await call_tool(server.url, ALICE, "cancel_task", {"task_id": answer["task_id"]})
    assert wait_until(lambda: not nmap_wrapper.alive(), 10)
    # The pool gauges are read at most once a second: the next page after that shows the change.
    assert wait_until(lambda: value(scrape(server.port), "nmap_mcp_queue_depth", pool="default") == 0, 5, 0.3)
    samples = scrape(server.port)
    assert value(samples, "nmap_mcp_running_scans", pool="default") == 0
    assert value(samples, "nmap_mcp_nmap_processes") == 0
    # Only the scan that ran is counted; the one cancelled in the queue never reached a worker.
    assert value(samples, "nmap_mcp_scans_total", kind="quick", status="cancelled") == 1


def test_metrics_token_guards_metrics_and_opens_nothing_else(live_server: StartServer) -> None:
    server = live_server(metrics_token=METRICS_SECRET)
    url = f"http://127.0.0.1:{server.port}/metrics"
    missing = httpx.get(url)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == 'Bearer realm="nmap-mcp metrics"'
    assert missing.json()["error_description"].startswith("no token: /metrics needs 'Authorization: Bearer")
    mcp_token = httpx.get(url, headers={"Authorization": f"Bearer {ALICE}"})
    assert mcp_token.status_code == 401 and 'Bearer realm="nmap-mcp metrics"' in mcp_token.headers["www-authenticate"]
    assert mcp_token.json() == {"error": "invalid_token", "error_description": (
        "the token is not this server's metrics_token: compare it with `metrics_token` in the server's config file. "
        "The MCP tokens do not open /metrics.")}
    # A token in the URL is not taken (and is removed before the access log sees the request).
    in_url = httpx.get(f"{url}?token={METRICS_SECRET}")
    assert in_url.status_code == 401 and in_url.json()["error"] == "unauthorized"
    assert httpx.post(url, headers={"Authorization": f"Bearer {METRICS_SECRET}"}).status_code == 405
    # The MCP endpoint's Host and Origin check, before the token is looked at.
    auth = {"Authorization": f"Bearer {METRICS_SECRET}"}
    assert httpx.get(url, headers=auth | {"Host": "evil.example"}).status_code == 421
    assert httpx.get(url, headers=auth | {"Origin": "http://evil.example"}).status_code == 403
    assert httpx.get(url, headers=auth | {"Host": f"localhost:{server.port}"}).status_code == 200
    samples = scrape(server.port)
    assert value(samples, "nmap_mcp_database_up") == 1
    assert post(server, Authorization=f"Bearer {METRICS_SECRET}").status_code == 401
    assert value(scrape(server.port), "nmap_mcp_auth_failures_total", endpoint="mcp",
                 reason="wrong_token") == 1
    server.stop()
    assert METRICS_SECRET not in server.log_text()


def test_metrics_are_off_without_metrics_token_and_have_the_host_check(live_server: StartServer) -> None:
    server = live_server(allowed_hosts=["scanner.example"])
    url = f"http://127.0.0.1:{server.port}/metrics"
    for headers in ({}, {"Authorization": f"Bearer {ALICE}"}):
        off = httpx.get(url, headers=headers)
        assert off.status_code == 404
        assert off.json()["error_description"].startswith("/metrics is off: set `metrics_token`")
    assert httpx.get(url, headers={"Host": "evil.example"}).status_code == 421
    assert httpx.get(url, headers={"Host": "scanner.example"}).status_code == 404, "allowed_hosts apply to /metrics"


def test_metrics_token_must_be_long_and_its_own(tmp_path: Path) -> None:
    short = write_config(tmp_path / "short.json", metrics_token="m" * 31)
    with pytest.raises(ConfigError, match="metrics_token has 31 characters, fewer than 32"):
        load_settings(short)
    shared = write_config(tmp_path / "shared.json", metrics_token=SECRETS["bob"])
    with pytest.raises(ConfigError, match="metrics_token is the secret of token 'bob'; give /metrics") as refused:
        load_settings(shared)
    assert SECRETS["bob"] not in str(refused.value)
    assert load_settings(write_config(tmp_path / "fine.json", metrics_token=METRICS_SECRET)).metrics_token


@pytest.mark.server
async def test_a_worker_serves_metrics_and_its_health_alone_on_its_metrics_port(
    tmp_path: Path, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    shared = {"db_path": str(tmp_path / "fleet.db"), "nmap_path": str(nmap_wrapper.path), "lease_seconds": 3}
    api_config = write_config(tmp_path / "api.json", audit_log=str(tmp_path / "api.audit"),
                              metrics_token=METRICS_SECRET, **shared)
    metrics_port = free_port()
    worker_config = write_config(tmp_path / "worker.json", metrics_port=metrics_port, metrics_token=METRICS_SECRET,
                                 worker_name="w1", **shared)
    api = ServiceProcess(server_argv(api_config, "--api"), tmp_path / "api.log").start()
    worker = ServiceProcess(server_argv(worker_config, "--worker"), tmp_path / "worker.log").start()
    api_port = json.loads(api_config.read_text())["port"]
    try:
        up = START_UP_SECONDS
        assert wait_until(lambda: responds(f"http://127.0.0.1:{api_port}/healthz"), up, 0.1), api.log_text()
        assert wait_until(lambda: responds(f"http://127.0.0.1:{metrics_port}/metrics"), up, 0.1), worker.log_text()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{metrics_port}") as http:
            assert (await http.get("/metrics")).status_code == 401
            rebound = await http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_SECRET}",
                                                          "Host": "evil.example"})
            assert rebound.status_code == 421, "a worker's /metrics has the Host check too"
            health = await http.get("/healthz")
            assert (health.status_code, health.json()["status"]) == (200, "ok"), "no token: a HEALTHCHECK has none"
            other = await http.get("/mcp")
        assert other.status_code == 404 and "only /metrics and /healthz" in other.json()["error_description"]
        url = f"http://127.0.0.1:{api_port}/mcp"
        started = (await call_tool(url, ALICE, "quick_scan", {"target": "127.0.0.1", "timeout": 30})).structured_content
        final = started if started["status"] == "completed" else await poll_until_finished(url, ALICE,
                                                                                          started["task_id"])
        assert final["status"] == "completed"
        assert port in {p["port"] for p in final["result"]["hosts"][0]["ports"]}
        on_worker = scrape(metrics_port)
        assert value(on_worker, "nmap_mcp_scans_total", kind="quick", status="completed") == 1
        assert value(on_worker, "nmap_mcp_workers_alive", pool="default") == 1
        assert value(on_worker, "nmap_mcp_tool_calls_total", tool="quick_scan", verdict="allowed") is None
        on_api = scrape(api_port)
        assert value(on_api, "nmap_mcp_scans_total", kind="quick", status="completed") == 0
        assert value(on_api, "nmap_mcp_tool_calls_total", tool="quick_scan", verdict="allowed") == 1
        worker.stop()
        assert worker.process is not None and worker.process.returncode == 0, worker.log_text()
        assert not responds(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        worker.stop()
        api.stop()
    assert METRICS_SECRET not in worker.log_text()


def responds(url: str) -> bool:
    """Whether anything answers HTTP at `url` (any status)."""
    try:
        httpx.get(url, timeout=1)
    except httpx.HTTPError:
        return False
    return True


@pytest.mark.server
def test_a_busy_metrics_port_stops_the_worker_with_one_clear_line(tmp_path: Path) -> None:
    metrics_port = free_port()
    config = write_config(tmp_path / "worker.json", metrics_port=metrics_port)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", metrics_port))
        taken.listen()
        finished = subprocess.run(server_argv(config, "--worker"), capture_output=True, text=True,
                                  timeout=START_UP_SECONDS, check=False)
    assert finished.returncode == 2
    assert finished.stderr.strip().splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{metrics_port}: Address already in use; stop what uses it "
        "or set another `metrics_port`")
