"""The README's promises under hostile input and faults, through the real server over real HTTP:
no secret in any log, answers a person can act on, the audit log written ahead, shutdown that
answers, CORS, and the start-up checks of a newcomer's machine."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from config import load_settings
from nse_policy import find_script_db
from server import VERSION, bind
from tests.support import (
    ALICE,
    BOB,
    ROOT,
    SECRETS,
    START_UP_SECONDS,
    LiveServer,
    NmapWrapper,
    ServiceProcess,
    StartServer,
    call_tool,
    error_text,
    failure_of,
    fill,
    free_port,
    post,
    raw_tool_call,
    server_argv,
    stdio_initialize,
    tmpfs,
    unprivileged,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.anyio
WRONG = "wrong-secret-" + "w" * 30
METRICS_SECRET = "metrics-secret-" + "m" * 30
JSON_LINE_FIELDS = {"time", "level", "logger", "message"}


def base_url(server: LiveServer) -> str:
    return f"http://127.0.0.1:{server.port}"


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_no_secret_reaches_a_log_after_requests_each_check_rejects(
    live_server: StartServer, log_format: str
) -> None:
    """Every spelling of a URL token, on requests refused by the Host and Origin checks (421,
    403), by authentication (401), routing (404), method (405) and size (413); then the good
    ones; and /metrics with its own token in the URL, in a header, and wrong. The server logs
    at DEBUG, uvicorn's access log included; in JSON, every line of the log is one object."""
    server = live_server(log_format=log_format, metrics_token=METRICS_SECRET)
    spellings = [f"?token={ALICE}", f"?TOKEN={BOB}", f"?access_token={ALICE}", f"?x=1;token={BOB}",
                 f"?Access_Token={ALICE}", f"?token={ALICE}&token={WRONG}"]
    mcp = server.url
    async with httpx.AsyncClient() as http:
        for query in spellings:
            assert post(server, url=mcp + query, Host="evil.example").status_code == 421
            assert post(server, url=mcp + query, Origin="http://evil.example").status_code == 403
            assert (await http.get(f"{base_url(server)}/nope{query}")).status_code == 404
            assert (await http.get(mcp + query, headers={"Accept": "text/event-stream"})).status_code == 405
            big = await http.post(mcp + query, content=b"x" * (4 * 1024 * 1024 + 10), headers={
                "Content-Type": "application/json", "Accept": "application/json, text/event-stream"})
            assert big.status_code == 413
    assert post(server, url=f"{mcp};token={WRONG}").status_code == 401
    assert post(server, url=f"{mcp}?Access_Token={WRONG}").status_code == 401
    assert post(server, url=f"{mcp}?token={WRONG}").status_code == 401
    assert post(server, url=f"{mcp}?TOKEN={ALICE}").status_code == 200
    assert post(server, url=f"{mcp}/?token={ALICE}").status_code == 200, "a trailing slash must not redirect"
    await call_tool(server.url, ALICE, "list_tasks", {}, via="query")
    metrics = f"{base_url(server)}/metrics"
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{metrics}?token={METRICS_SECRET}")).status_code == 401
        assert (await http.get(metrics, headers={"Authorization": f"Bearer {WRONG}"})).status_code == 401
        assert (await http.get(metrics, headers={"Authorization": f"Bearer {METRICS_SECRET}"})).status_code == 200
    server.stop()
    if log_format == "json":
        records = [json.loads(line) for line in server.log_text().splitlines()]
        assert records and all(isinstance(r, dict) and set(r) >= JSON_LINE_FIELDS for r in records)
        messages = "\n".join(r["message"] for r in records)
    else:
        messages = server.log_text()
    logs = server.log_text() + (server.config_path.parent / "audit.jsonl").read_text()
    for status in (421, 403, 404, 405, 413, 401, 200):
        assert f'HTTP/1.1" {status}' in messages, f"the access log must show the {status}s"
    assert '"GET /metrics HTTP/1.1" 401' in messages and '"GET /metrics HTTP/1.1" 200' in messages
    for secret in (*SECRETS.values(), WRONG, METRICS_SECRET):
        assert secret not in logs


async def test_json_log_lines_name_the_caller_s_token_and_the_task_a_worker_runs(
    live_server: StartServer, nmap_wrapper: NmapWrapper
) -> None:
    """The token name rides on records made during an MCP request, the task id on those a
    worker makes while it runs the task; neither leaks into records made elsewhere."""
    nmap_wrapper.set_delay(60)
    server = live_server(log_format="json")
    refused = await call_tool(server.url, ALICE, "custom_scan", {"command": "-oN /tmp/x 127.0.0.1"})
    assert error_text(refused).startswith("invalid_command:")
    started = (await call_tool(server.url, BOB, "quick_scan", {"target": "127.0.0.1", "timeout": 5})).structured_content
    assert started["status"] == "running"
    await call_tool(server.url, BOB, "cancel_task", {"task_id": started["task_id"]})
    server.stop()
    records = [json.loads(line) for line in server.log_text().splitlines()]
    [refusal] = [r for r in records if r["message"] == "Error calling tool 'custom_scan'"]
    assert refusal["token"] == "alice" and "task_id" not in refusal
    [kept] = [r for r in records if "was cancelled or resolved elsewhere" in r["message"]]
    assert kept["task_id"] == started["task_id"] and "token" not in kept
    assert all("token" not in r and "task_id" not in r for r in records if r["logger"] == "uvicorn.error")


async def test_a_trailing_slash_is_the_endpoint_itself(live_server: StartServer) -> None:
    server = live_server()
    answer = post(server, url=f"{server.url}/?token={ALICE}")
    assert answer.status_code == 200 and "location" not in answer.headers


async def test_401_says_in_plain_words_what_is_wrong(live_server: StartServer) -> None:
    server = live_server()
    missing = post(server)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == 'Bearer realm="nmap-mcp"'
    assert missing.json()["error_description"].startswith("no token: send 'Authorization: Bearer <token>'")
    for wrong in (post(server, Authorization=f"Bearer {WRONG}"), post(server, url=f"{server.url}?token={WRONG}")):
        assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["www-authenticate"]
        text = wrong.json()["error_description"]
        assert "is not one of this server's tokens" in text and "config file" in text
        assert "register" not in text.replace("nothing can be registered", "")
    off = live_server(allow_query_token=False)
    refused = post(off, url=f"{off.url}?token={ALICE}")
    assert refused.status_code == 401 and "allow_query_token is false" in refused.json()["error_description"]


def test_batches_and_bodies_that_are_not_one_message_get_short_json_rpc_errors(live_server: StartServer) -> None:
    server = live_server()
    auth = {"Authorization": f"Bearer {ALICE}"}
    batch = post(server, body=[{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}], **auth)
    assert batch.status_code == 400 and batch.json()["error"] == {
        "code": -32600, "message": "Invalid Request: JSON-RPC batches are not supported; send one message per request"}
    garbage = httpx.post(server.url, content=b"{not json", headers={"Content-Type": "application/json",
                         "Accept": "application/json, text/event-stream", **auth})
    assert garbage.status_code == 400 and garbage.json()["error"]["code"] == -32700
    odd = post(server, body={"jsonrpc": "2.0", "id": 1, "method": 5}, **auth)
    assert odd.status_code == 400 and odd.json()["error"]["message"] == 'Invalid Request: "method" must be a string'
    for answer in (batch, garbage, odd):
        assert "pydantic" not in answer.text and "http" not in answer.text
    assert post(server, body=[1, 2]).status_code == 401, "the token is checked before the body is"


async def test_healthz_is_503_with_the_reason_when_nmap_cannot_run(
    live_server: StartServer, nmap_wrapper: NmapWrapper
) -> None:
    server = live_server()
    async with httpx.AsyncClient(base_url=base_url(server)) as http:
        healthy = await http.get("/healthz")
        assert healthy.status_code == 200 and set(healthy.json()) == {"status", "version"}
        nmap_wrapper.path.unlink()
        sick = await http.get("/healthz")
    assert sick.status_code == 503 and sick.json()["reason"] == "nmap cannot be run"
    assert str(nmap_wrapper.path) not in sick.text
    failed = (await call_tool(server.url, ALICE, "quick_scan", {"target": "127.0.0.1"})).structured_content
    assert failed["status"] == "failed" and failed["error"] == f"nmap not found at {nmap_wrapper.path}"


def audit_lines(server: LiveServer) -> list[dict[str, object]]:
    return [json.loads(line) for line in (server.config_path.parent / "audit.jsonl").read_text().splitlines()]


async def test_the_audit_record_of_a_scan_survives_kill_9(live_server: StartServer, nmap_wrapper: NmapWrapper) -> None:
    nmap_wrapper.set_delay(30)
    server = live_server()
    started = (await call_tool(server.url, ALICE, "quick_scan",
                               {"target": "127.0.0.1", "timeout": 5})).structured_content
    assert started["status"] == "running"
    server.kill()
    lines = [line for line in audit_lines(server) if line["tool"] == "quick_scan"]
    assert [line["event"] for line in lines] == ["accepted", "queued", "done"]
    server.start()
    # A second scan, cut off by kill -9 while the call still waits: no `done`, but the rest.
    waiting = asyncio.create_task(call_tool(server.url, BOB, "quick_scan", {"target": "127.0.0.2", "timeout": 60}))
    assert await asyncio.to_thread(wait_until, lambda: len(nmap_wrapper.alive()) == 1, 10)
    server.kill()
    await failure_of(waiting)  # the connection dies with the server
    cut = [line for line in audit_lines(server) if line["token"] == "bob"]
    assert [line["event"] for line in cut] == ["accepted", "queued"]
    assert cut[1]["task_id"] and cut[1]["argv"][-1] == "127.0.0.2"  # type: ignore[index]


@pytest.fixture
def tiny_disk() -> Iterator[Path]:
    """A 2 MiB tmpfs holding an empty audit log, filled up (fill) by the test once its server
    has started: with under 1 MiB free /healthz is 503, and a server's start waits for 200."""
    with tmpfs("2m") as mount:
        (mount / "audit.jsonl").touch()
        yield mount


@pytest.mark.requires_root("mounting a tmpfs")
async def test_scans_refuse_when_the_audit_log_cannot_be_written(
    live_server: StartServer, nmap_wrapper: NmapWrapper, tiny_disk: Path
) -> None:
    server = live_server(audit_log=str(tiny_disk / "audit.jsonl"))
    fill(tiny_disk)
    for target in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        refused = await call_tool(server.url, ALICE, "quick_scan", {"target": target})
        assert error_text(refused) == "unavailable: audit log not writable; the scan was not started"
    listed = await call_tool(server.url, ALICE, "list_tasks", {})
    assert not listed.is_error and listed.structured_content == {"tasks": []}
    assert nmap_wrapper.pids() == []
    assert server.log_text().count("the audit log cannot be written") == 1, "logged once a minute, not per call"
    server.stop()
    open_server = live_server(audit_log=str(tiny_disk / "audit.jsonl"), audit_fail_open=True)
    assert (await asyncio.to_thread(httpx.get, f"{base_url(open_server)}/healthz")).json() == {
        "status": "ok", "warning": "the audit log's disk is full; scans run unaudited (audit_fail_open)",
        "version": VERSION}
    ran = (await call_tool(open_server.url, ALICE, "quick_scan", {"target": "127.0.0.1"})).structured_content
    assert ran["status"] == "completed" and "scans run unaudited" in open_server.log_text()
    open_server.stop()  # before the disk is unmounted


async def test_sigterm_answers_every_waiting_call_with_its_task(
    live_server: StartServer, nmap_wrapper: NmapWrapper
) -> None:
    nmap_wrapper.set_delay(30)
    server = live_server(max_concurrent_tasks=1, shutdown_grace_seconds=0.5)
    calls = [asyncio.create_task(raw_tool_call(server.url, ALICE, "custom_scan",
                                               {"command": f"-p {port} 127.0.0.1", "timeout": 120}))
             for port in (1, 2)]
    assert await asyncio.to_thread(wait_until, lambda: len(nmap_wrapper.alive()) == 1, 10)
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    answers = [result["structuredContent"] for result in await asyncio.wait_for(asyncio.gather(*calls), 20)]
    assert sorted(answer["status"] for answer in answers) == ["interrupted", "queued"]
    assert all(answer["task_id"] for answer in answers)
    assert server.process.wait(10) == -signal.SIGTERM, "uvicorn ends by re-raising the signal it caught"
    assert nmap_wrapper.alive() == []
    nmap_wrapper.set_delay(0)
    server.start()
    [queued] = [answer for answer in answers if answer["status"] == "queued"]
    final = (await call_tool(server.url, ALICE, "get_task_status", {"task_id": queued["task_id"]})).structured_content
    for _ in range(50):
        if final["status"] == "completed":
            break
        await asyncio.sleep(0.2)
        final = (await call_tool(server.url, ALICE, "get_task_status", {"task_id": queued["task_id"]})
                 ).structured_content
    assert final["status"] == "completed", "a queued task waits for the next start"


def test_cors_preflight_and_origin_protection_agree(live_server: StartServer) -> None:
    server = live_server(cors_origins=["http://app.example"])
    preflight = httpx.options(server.url, headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, mcp-protocol-version, mcp-session-id"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://app.example"
    allowed = {h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "mcp-session-id", "mcp-protocol-version", "content-type"} <= allowed
    call = post(server, Origin="http://app.example", Authorization=f"Bearer {ALICE}")
    assert call.status_code == 200 and call.headers["access-control-allow-origin"] == "http://app.example"
    assert post(server, Origin="http://other.example", Authorization=f"Bearer {ALICE}").status_code == 403
    other = httpx.options(server.url, headers={"Origin": "http://other.example",
                                                "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers
    without = live_server()
    plain = httpx.options(without.url, headers={"Origin": "http://app.example",
                                                 "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in plain.headers


def run_server(config: Path, *args: str, not_root: bool = False) -> subprocess.CompletedProcess[str]:
    """The server run to its end; `not_root`: by a user who is not root (see unprivileged)."""
    argv = server_argv(config, *args)
    return subprocess.run(unprivileged(argv) if not_root else argv, capture_output=True, text=True,
                          timeout=START_UP_SECONDS, cwd=config.parent, check=False)


async def test_connections_to_the_listener_have_nagle_off() -> None:
    """With Nagle on, a response's second write waits for the client's delayed ACK: 40 ms on
    every request of a kept-alive connection (seen: /healthz took 44 ms, 1.5 ms without)."""
    listener = bind("127.0.0.1", free_port())
    accepted: asyncio.Queue[int] = asyncio.Queue()

    async def on_connection(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connection, sock=listener)
    async with server:
        _, writer = await asyncio.open_connection(*listener.getsockname())
        assert await asyncio.wait_for(accepted.get(), 5) == 1
        writer.close()


@pytest.mark.server
def test_a_busy_port_is_one_clear_line_and_no_banner(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.json")
    port = json.loads(config.read_text())["port"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        finished = run_server(config)
    assert finished.returncode == 2
    assert finished.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
    assert "listening on" not in finished.stdout and "--print-config" not in finished.stdout


@pytest.mark.server
def test_privileged_without_raw_sockets_is_a_start_up_error_saying_how_to_grant_them() -> None:
    home = Path(tempfile.mkdtemp(prefix="nmap-mcp-nobody-"))
    try:
        home.chmod(0o777)
        config = write_config(home / "config.json", privileged=True)
        config.chmod(0o644)
        finished = run_server(config, not_root=True)
        assert finished.returncode == 2, finished.stderr
        assert "privileged is true but this process is not root" in finished.stderr
        assert "setcap cap_net_raw,cap_net_admin+eip" in finished.stderr
    finally:
        subprocess.run(["rm", "-rf", str(home)], check=True)


@pytest.fixture
def packageless_python_first(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH finds first a `python3` (and `python`) that is this
    interpreter without its packages: on Debian, the system's python3 is what the .venv of
    ./run.sh links to, and it has no uvicorn. A printed command naming `python3` fails there."""
    bare = tmp_path / "packageless"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=START_UP_SECONDS)
    return os.environ | {"PATH": f"{bare / 'bin'}:{os.environ['PATH']}"}


def pasted(command: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`command` run as a person pasting it into a shell would run it."""
    return subprocess.run(["sh", "-c", command], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=START_UP_SECONDS, check=False)


@pytest.mark.server
def test_the_init_hint_works_pasted_in_another_directory(
    tmp_path: Path, packageless_python_first: dict[str, str]
) -> None:
    """A relative config path in a directory that does not exist yet, with a space in its name."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = Path("new dir") / "fresh.json"
    wrote = subprocess.run([sys.executable, str(ROOT / "server.py"), "--init", "-c", str(config)], cwd=tmp_path,
                           env=packageless_python_first, capture_output=True, text=True, timeout=START_UP_SECONDS,
                           check=False)
    assert wrote.returncode == 0 and "secret: " in wrote.stdout and "secret" not in wrote.stderr, wrote.stderr
    hint = wrote.stderr.split("then run: ", 1)[1].strip()
    again = pasted(f"{hint} --print-config cursor", packageless_python_first, elsewhere)
    assert again.returncode == 0, (hint, again.stderr)
    assert json.loads(again.stdout)["mcpServers"]["nmap"]["headers"]
    missing = run_server(tmp_path / "missing.json")
    assert missing.returncode == 2
    create = missing.stderr.strip().split("create one with: ", 1)[1]
    assert pasted(create, packageless_python_first, elsewhere).returncode == 0
    assert load_settings(tmp_path / "missing.json").named_tokens()


@pytest.mark.server
def test_the_banner_s_commands_work_pasted_in_another_directory(
    tmp_path: Path, packageless_python_first: dict[str, str]
) -> None:
    """The command for one client's config, and the stdio command a desktop app starts with
    neither our working directory nor our PATH."""
    config = write_config(tmp_path / "config.json")
    process = ServiceProcess(server_argv(config), tmp_path / "server.log", env=packageless_python_first).start()
    try:
        assert wait_until(lambda: "--- Cherry Studio" in process.log_text(), START_UP_SECONDS), process.log_text()
    finally:
        process.stop()
    banner = process.log_text()
    one = banner.split("one client's config alone: ", 1)[1].split(" --print-config CLIENT", 1)[0]
    printed = pasted(f"{one} --print-config claude-desktop", packageless_python_first, Path("/"))
    assert printed.returncode == 0, (one, printed.stderr)
    desktop = json.loads(printed.stdout)["mcpServers"]["nmap-local"]
    listed = json.loads(banner.split("--print-config claude-desktop) ---\n", 1)[1].splitlines()[0])
    assert listed["mcpServers"]["nmap-local"] == desktop
    answer = stdio_initialize([desktop["command"], *desktop["args"]], cwd=Path("/"))
    assert answer["serverInfo"]["name"] == "nmap-mcp"


@pytest.mark.server
def test_version_prints_the_version_file(tmp_path: Path) -> None:
    shown = subprocess.run([sys.executable, str(ROOT / "server.py"), "--version"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=START_UP_SECONDS, check=False)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == f"nmap-mcp {(ROOT / 'VERSION').read_text().strip()}\n"


def test_nmaps_data_is_found_as_nmap_finds_it(tmp_path: Path) -> None:
    wrapper = tmp_path / "bin" / "nmap"
    wrapper.parent.mkdir()
    wrapper.write_text("#!/bin/sh\nexec /usr/bin/nmap \"$@\"\n")
    assert find_script_db(str(wrapper), None) == Path("/usr/share/nmap/scripts/script.db")
    mine = tmp_path / "data"
    (mine / "scripts").mkdir(parents=True)
    (mine / "scripts" / "script.db").write_text('Entry { filename = "x.nse", categories = { "safe", } }\n')
    assert find_script_db(str(wrapper), str(mine)) == mine / "scripts" / "script.db"
    assert find_script_db(str(wrapper), str(tmp_path / "nothing")) == Path("/usr/share/nmap/scripts/script.db")


@pytest.mark.server
def test_files_holding_secrets_or_results_are_private(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    assert subprocess.run([sys.executable, str(ROOT / "server.py"), "--init", "-c", str(config)],
                          capture_output=True, timeout=START_UP_SECONDS, check=False).returncode == 0
    document = json.loads(config.read_text()) | {"port": free_port()}
    config.write_text(json.dumps(document))
    server = LiveServer(config, tmp_path / "server.log", document["port"])
    server.start()
    try:
        for name in ("config.json", "nmap_tasks.db", "audit.jsonl"):
            assert (tmp_path / name).stat().st_mode & 0o077 == 0, name
    finally:
        server.stop()
    kept = ["config.json", "initial-token", "nmap_tasks.db", "nmap_tasks.db-wal", "audit.jsonl"]
    ignored = subprocess.run(["git", "check-ignore", *kept], cwd=ROOT, capture_output=True, text=True, check=False)
    assert ignored.stdout.split() == kept
