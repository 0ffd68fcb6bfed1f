"""People sign in with OAuth beside the API tokens: a real OpenID provider (oidc-provider,
tests/openid.py), a real server process, a person in headless Chromium, real MCP clients."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shlex
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from client_configs import render_client_config
from tests.openid import OpenIdProvider, SignedIn, browse_through_sign_in, openid_provider, sign_in
from tests.support import SECRETS, Listeners, LiveServer, StartServer, call_tool, free_port, wait_until
from ui_sign_in import SESSION_COOKIE

pytestmark = pytest.mark.anyio

ROLES = {
    "scanners": {"groups": ["scanners"], "allowed_targets": ["127.0.0.0/8"]},
    "auditors": {"groups": ["auditors"], "tools": ["list_tasks", "get_task_status", "get_task_result"]},
    "blue": {"groups": ["blue-team"], "allowed_targets": ["127.0.0.0/8"], "team_tasks": True},
}

Serve = Callable[..., tuple[LiveServer, OpenIdProvider]]


@pytest.fixture
def signed_in_server(live_server: StartServer, tmp_path: Path) -> Iterator[Serve]:
    """Start servers that people sign in to, each through a provider started for it."""
    with contextlib.ExitStack() as providers:
        def serve(ttl: dict[str, int] | None = None, **config: object) -> tuple[LiveServer, OpenIdProvider]:
            port = free_port()
            provider = providers.enter_context(openid_provider(tmp_path, port, **(ttl or {})))
            server = live_server(**{"port": port, "oauth": provider.oauth_config(f"http://127.0.0.1:{port}"),
                                    "roles": ROLES, "audit_log": str(tmp_path / "audit.jsonl"), **config})
            return server, provider
        yield serve


def base_of(server: LiveServer) -> str:
    return f"http://127.0.0.1:{server.port}"


async def test_a_person_signs_in_scans_and_api_keys_still_work(
    signed_in_server: Serve, browser: webdriver.Chrome, listeners: Listeners, tmp_path: Path
) -> None:
    server, _ = signed_in_server()
    [port] = listeners.open_free_top_ports(1)
    alice = sign_in(browser, base_of(server), server.url, "alice")
    scanned = await scan_port(server, alice.access_token, port)
    assert not scanned.is_error, scanned
    answer = scanned.structured_content or {}
    assert answer["status"] == "completed"
    listed = await call_tool(server.url, SECRETS["alice"], "list_tasks", {})
    assert listed.structured_content == {"tasks": []}, "an API key's owner is not the person"
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert any(entry.get("token") == "alice@example.test" for entry in audit)


async def test_each_person_owns_their_tasks_and_a_role_bounds_their_tools(
    signed_in_server: Serve, browser: webdriver.Chrome, listeners: Listeners
) -> None:
    server, _ = signed_in_server()
    [port] = listeners.open_free_top_ports(1)
    alice = sign_in(browser, base_of(server), server.url, "alice")
    browser.delete_all_cookies()
    bob = sign_in(browser, base_of(server), server.url, "bob")
    browser.delete_all_cookies()
    carol = sign_in(browser, base_of(server), server.url, "carol")
    scanned = await scan_port(server, alice.access_token, port)
    task_id = (scanned.structured_content or {})["task_id"]
    for person in (bob, carol):
        assert (await call_tool(server.url, person.access_token, "list_tasks", {})).structured_content == {"tasks": []}
        theirs = await call_tool(server.url, person.access_token, "get_task_status", {"task_id": task_id})
        assert theirs.is_error and theirs.content[0].text.startswith("not_found"), theirs  # type: ignore[union-attr]
    refused = await call_tool(server.url, carol.access_token, "custom_scan", {"command": "-sT -n -p 1 127.0.0.1"})
    assert refused.is_error and "may not use custom_scan" in refused.content[0].text  # type: ignore[union-attr]
    outside = await call_tool(server.url, bob.access_token, "custom_scan", {"command": "-sT -n -p 1 10.0.0.1"})
    assert outside.is_error and "10.0.0.1" in outside.content[0].text  # type: ignore[union-attr]
    async with bearer_client(server.url, carol.access_token) as client:
        assert {tool.name for tool in (await client.list_tools()).tools} == set(ROLES["auditors"]["tools"])


async def test_a_person_in_no_role_is_refused_saying_why_in_the_log(
    signed_in_server: Serve, browser: webdriver.Chrome
) -> None:
    server, _ = signed_in_server()
    mallory = sign_in(browser, base_of(server), server.url, "mallory")
    refused = post_tools_list(server, mallory.access_token)
    assert refused.status_code == 401
    assert "mallory@elsewhere.test is in no role (groups: none)" in server.log_path.read_text()


async def test_an_expired_sign_in_stops_working(signed_in_server: Serve, browser: webdriver.Chrome) -> None:
    """The provider's tokens live 4 s here, and this server's mirror them."""
    server, _ = signed_in_server(ttl={"IdToken": 4, "AccessToken": 4})
    alice = sign_in(browser, base_of(server), server.url, "alice")
    assert post_tools_list(server, alice.access_token).status_code == 200
    assert wait_until(lambda: post_tools_list(server, alice.access_token).status_code == 401, 30, 0.5)


async def test_a_refreshed_sign_in_works_until_it_is_revoked(
    signed_in_server: Serve, browser: webdriver.Chrome
) -> None:
    """Refreshing goes through to the provider; once the client revokes its refresh token
    (RFC 7009, at this server, which revokes the provider's too) no refresh works again."""
    server, _ = signed_in_server()
    alice = sign_in(browser, base_of(server), server.url, "alice")
    refreshed = refresh(server, alice)
    assert refreshed.status_code == 200, refreshed.text
    renewed = refreshed.json()
    assert post_tools_list(server, renewed["access_token"]).status_code == 200
    revoked = httpx.post(base_of(server) + "/revoke", timeout=10, data={
        "token": renewed["refresh_token"], "token_type_hint": "refresh_token", **alice.credentials})
    assert revoked.status_code == 200, revoked.text
    again = refresh(server, alice, renewed["refresh_token"])
    assert again.json()["error"] == "invalid_grant", again.text


async def test_no_log_line_holds_an_oauth_token_or_an_api_key(
    signed_in_server: Serve, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    """At DEBUG, through a sign-in, calls with both kinds of credential, a refresh and a
    wrong token: neither the log nor the audit log holds a token or anything JWT-shaped."""
    server, _ = signed_in_server(log_level="DEBUG")
    alice = sign_in(browser, base_of(server), server.url, "alice")
    renewed = refresh(server, alice).json()
    for token in (alice.access_token, renewed["access_token"], SECRETS["alice"], "eyJ" + "x" * 40):
        post_tools_list(server, token)
    logs = server.log_path.read_text() + (tmp_path / "audit.jsonl").read_text()
    for secret in (alice.access_token, alice.tokens["refresh_token"], renewed["access_token"],
                   renewed["refresh_token"], SECRETS["alice"]):
        assert secret not in logs
    assert "eyJ" not in logs, "a JWT (this server's or the provider's) reached a log"


async def scan_port(server: LiveServer, token: str, port: int) -> CallToolResult:
    """A connect scan of one loopback port, waited for (60 s at most), with `token`."""
    return await call_tool(server.url, token, "custom_scan",
                           {"command": f"-sT -n -Pn -p {port} 127.0.0.1", "timeout": 60})


def refresh(server: LiveServer, person: SignedIn, token: str | None = None) -> httpx.Response:
    return httpx.post(base_of(server) + "/token", timeout=10, data={
        "grant_type": "refresh_token", "refresh_token": token or person.tokens["refresh_token"],
        **person.credentials})


def post_tools_list(server: LiveServer, token: str) -> httpx.Response:
    return httpx.post(server.url, timeout=10, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                      headers={"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream",
                               "Content-Type": "application/json", "MCP-Protocol-Version": "2025-06-18"})


@contextlib.asynccontextmanager
async def bearer_client(url: str, token: str) -> AsyncIterator[Client]:
    async with (httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60) as http,
                Client(streamable_http_client(url, http_client=http)) as client):  # type: ignore[arg-type]
        yield client


async def test_an_oauth_client_finds_the_sign_in_from_the_401(signed_in_server: Serve) -> None:
    """RFC 9728: the 401 names the protected-resource metadata, which names this server as the
    authorization server; its metadata (RFC 8414) offers PKCE, registration and client ID
    metadata documents. The 401's words still say what an API token holder does."""
    server, _ = signed_in_server()
    refused = httpx.post(server.url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, timeout=10,
                         headers={"Accept": "application/json, text/event-stream"})
    assert refused.status_code == 401
    challenge = refused.headers["www-authenticate"]
    metadata_url = base_of(server) + "/.well-known/oauth-protected-resource/mcp"
    assert f'resource_metadata="{metadata_url}"' in challenge
    assert refused.json()["error_description"].endswith("asks them to, in the browser.")
    assert "does not use OAuth" not in refused.text
    resource = httpx.get(metadata_url, timeout=10).json()
    assert resource["resource"] == server.url
    assert [url.rstrip("/") for url in resource["authorization_servers"]] == [base_of(server)]
    authorization = httpx.get(base_of(server) + "/.well-known/oauth-authorization-server", timeout=10).json()
    assert authorization["code_challenge_methods_supported"] == ["S256"]
    assert authorization["registration_endpoint"] == base_of(server) + "/register"
    assert authorization["client_id_metadata_document_supported"] is True


async def test_a_person_signs_in_to_the_operator_page_with_a_cookie_no_script_reads(
    signed_in_server: Serve, browser: webdriver.Chrome, listeners: Listeners
) -> None:
    server, _ = signed_in_server()
    [port] = listeners.open_free_top_ports(1)
    alice = sign_in(browser, base_of(server), server.url, "alice")
    scanned = await scan_port(server, alice.access_token, port)
    assert (scanned.structured_content or {})["status"] == "completed"
    await scan_port(server, SECRETS["bob"], port)
    browser.delete_all_cookies()
    browser.get(base_of(server) + "/ui")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda driver: driver.find_element(By.ID, "provider-sign-in").is_displayed())
    browser.find_element(By.CSS_SELECTOR, "#provider-sign-in a").click()
    browse_through_sign_in(browser, "alice", lambda: browser.find_element(By.ID, "viewer").text != "")
    assert browser.find_element(By.ID, "viewer").text == "alice@example.test"
    rows = "section[data-section=recent] tbody tr"
    wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, rows))
    assert len(browser.find_elements(By.CSS_SELECTOR, rows)) == 1, "only her own task, not the API key's"
    session = browser.get_cookie(SESSION_COOKIE)
    assert session is not None and session["httpOnly"] and session["sameSite"] == "Strict" and session["path"] == "/ui"
    assert SESSION_COOKIE not in browser.execute_script("return document.cookie")
    browser.find_element(By.ID, "sign-out").click()
    wait.until(lambda driver: driver.find_element(By.ID, "sign-in").is_displayed())
    assert wait_until(lambda: browser.get_cookie(SESSION_COOKIE) is None, 10, 0.2)


async def test_a_person_in_no_role_is_told_so_by_the_operator_page(
    signed_in_server: Serve, browser: webdriver.Chrome
) -> None:
    server, _ = signed_in_server()
    browser.get(base_of(server) + "/ui/sign-in")
    browse_through_sign_in(browser, "mallory", lambda: browser.find_element(By.ID, "sign-in-error").text != "")
    assert browser.find_element(By.ID, "sign-in-error").text == (
        "you signed in, but your account is in no role of this server: ask its operator")
    assert browser.get_cookie(SESSION_COOKIE) is None


def test_a_person_signs_in_through_mcp_remote_as_printed_for_claude_desktop(
    signed_in_server: Serve, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    """The Claude Desktop entry printed with sign-in on, run as Claude Desktop runs it: mcp-remote
    meets the 401, discovers this server's sign-in, registers, opens the browser (here: tells the
    test, whose Chromium signs alice in), takes the code at its loopback callback, and then
    proxies the desktop app's calls with its token."""
    server, _ = signed_in_server()
    entry = json.loads(render_client_config("claude-desktop", url=server.url, secret="unused",
                                            stdio_command=["nmap-mcp", "--stdio"], sign_in=True))["mcpServers"]["nmap"]
    opened = tmp_path / "opened-url"
    opener = tmp_path / "open-browser"
    opener.write_text(f'#!/bin/sh\nprintf "%s" "$1" > {shlex.quote(str(opened))}\n')
    opener.chmod(0o755)
    # Its OAuth state goes to HOME; xdg-open, with no desktop, hands the URL to $BROWSER.
    environment = {**os.environ, "HOME": str(tmp_path), "BROWSER": str(opener), "DISPLAY": ""}
    with (tmp_path / "mcp-remote.log").open("w") as log, subprocess.Popen(
            [entry["command"], *entry["args"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
            env=environment, text=True, start_new_session=True) as mcp_remote:
        try:
            lines = LineReader(mcp_remote)
            send(mcp_remote, INITIALIZE)
            assert wait_until(opened.exists, 240, 0.2), (tmp_path / "mcp-remote.log").read_text()
            browser.get(opened.read_text())
            browse_through_sign_in(browser, "alice", lambda: "/oauth/callback" in browser.current_url)
            assert lines.next(120)["result"]["serverInfo"]["name"] == "nmap-mcp"
            send(mcp_remote, {"jsonrpc": "2.0", "method": "notifications/initialized"})
            send(mcp_remote, {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                              "params": {"name": "list_tasks", "arguments": {}}})
            listed = lines.next(120)
        finally:
            os.killpg(mcp_remote.pid, signal.SIGKILL)
    assert listed["id"] == 2 and listed["result"]["structuredContent"] == {"tasks": []}, listed
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert any(entry.get("token") == "alice@example.test" and entry.get("tool") == "list_tasks" for entry in audit)


INITIALIZE = {"jsonrpc": "2.0", "method": "initialize", "id": 1, "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "claude-ai", "version": "0.1.0"}}}


def send(process: subprocess.Popen[str], message: dict[str, object]) -> None:
    assert process.stdin is not None
    process.stdin.write(json.dumps(message) + "\n")
    process.stdin.flush()


class LineReader:
    """The JSON-RPC messages a stdio process writes, one per line, read by a thread of its own."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        assert process.stdout is not None
        stdout = process.stdout
        threading.Thread(target=lambda: [self._lines.put(line) for line in stdout], daemon=True).start()

    def next(self, timeout: float) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(self._lines.get(timeout=timeout))
        return message


async def test_a_team_role_sees_its_people_s_scans_and_no_one_else_s(
    signed_in_server: Serve, browser: webdriver.Chrome, listeners: Listeners
) -> None:
    """Role `blue` has team_tasks: erin and frank read each other's tasks (listed with their
    owner), only the owner cancels, and alice (scanners) still sees none of them."""
    server, _ = signed_in_server()
    [port] = listeners.open_free_top_ports(1)
    people = {}
    for login in ("erin", "frank", "alice"):
        browser.delete_all_cookies()
        people[login] = sign_in(browser, base_of(server), server.url, login).access_token
    erin, frank, alice = people["erin"], people["frank"], people["alice"]
    scanned = await scan_port(server, erin, port)
    task_id = (scanned.structured_content or {})["task_id"]
    listed = (await call_tool(server.url, frank, "list_tasks", {})).structured_content or {}
    assert [(t["task_id"], t["owner"]) for t in listed["tasks"]] == [(task_id, "erin@example.test")]
    result = (await call_tool(server.url, frank, "get_task_result", {"task_id": task_id})).structured_content or {}
    assert result["status"] == "completed" and result["owner"] == "erin@example.test"
    assert [p["port"] for h in result["result"]["hosts"] for p in h["ports"]] == [port]
    own = (await call_tool(server.url, erin, "get_task_status", {"task_id": task_id})).structured_content or {}
    assert own["owner"] is None, "her own task names no owner"
    cancelled = await call_tool(server.url, frank, "cancel_task", {"task_id": task_id})
    assert cancelled.is_error and cancelled.content[0].text.startswith("not_found")  # type: ignore[union-attr]
    assert (await call_tool(server.url, alice, "list_tasks", {})).structured_content == {"tasks": []}
    outsider = await call_tool(server.url, alice, "get_task_result", {"task_id": task_id})
    assert outsider.is_error and outsider.content[0].text.startswith("not_found")  # type: ignore[union-attr]


async def test_an_expired_sign_in_is_no_guess_at_an_api_key(signed_in_server: Serve) -> None:
    """With sign-in on, a refused JWT (expired, or from before a restart) gets 401 each time,
    so its client refreshes; refused API keys from the same address are still throttled."""
    server, _ = signed_in_server(failed_token_limit=1, failed_token_window_seconds=600)
    stale = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
    assert [post_tools_list(server, stale).status_code for _ in range(3)] == [401, 401, 401]
    assert [post_tools_list(server, "not-a-key-" + "x" * 30).status_code for _ in range(2)] == [401, 429]


async def test_a_person_approves_in_the_operator_page_audited_by_email_and_the_session_does_not_post_cross_origin(
    signed_in_server: Serve, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    """carol's role approves scans: she signs in to /ui, approves alice's held scan there, and
    the audit log names her; her session cookie, sent by a request of another origin, decides
    nothing."""
    tokens = {"alice": {"secret": SECRETS["alice"], "engagement": "lab"}}
    lab = {"scope": ["127.0.24.0/24"], "tokens": ["alice"], "approval": {"addresses_over": 2}}
    roles = {**ROLES, "auditors": {"groups": ["auditors"], "approve_scans": True}}
    server, _ = signed_in_server(tokens=tokens, engagements={"lab": lab}, roles=roles)
    held = [(await call_tool(server.url, SECRETS["alice"], "custom_scan", {"command": f"-Pn -p {port} 127.0.24.8/30"}))
            .structured_content for port in (1, 2)]
    assert [task["status"] for task in held] == ["awaiting_approval"] * 2
    browser.get(base_of(server) + "/ui")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda driver: driver.find_element(By.ID, "provider-sign-in").is_displayed())
    browser.find_element(By.CSS_SELECTOR, "#provider-sign-in a").click()
    browse_through_sign_in(browser, "carol", lambda: browser.find_element(By.ID, "viewer").text != "")
    first = held[0]["task_id"]
    wait.until(lambda driver: driver.find_elements(By.ID, f"approve-{first}"))
    browser.find_element(By.ID, f"reason-{first}").send_keys("on the change calendar")
    browser.find_element(By.ID, f"approve-{first}").click()
    wait.until(lambda driver: "You approved alice's custom" in driver.find_element(By.ID, "approvals-notice").text)

    session = browser.get_cookie(SESSION_COOKIE)
    assert session is not None
    second = f"{base_of(server)}/ui/api/approvals/{held[1]['task_id']}"
    body = {"decision": "approve", "reason": "forged"}
    async with httpx.AsyncClient(timeout=10, cookies={SESSION_COOKIE: session["value"]}) as http:
        forged = await http.post(second, json=body, headers={"Origin": f"http://127.0.0.1:{free_port()}"})
        assert forged.status_code == 403 and forged.json()["error"] == "forbidden"
        still = await call_tool(server.url, SECRETS["alice"], "get_task_status", {"task_id": held[1]["task_id"]})
        assert (still.structured_content or {})["status"] == "awaiting_approval"
        denied = await http.post(second, json={"decision": "deny", "reason": "not today"},
                                 headers={"Origin": base_of(server)})
        assert denied.status_code == 200 and denied.json()["decided_by"] == "carol@example.test", denied.text
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(entry["token"], entry["via"], entry["arguments"]["decision"]) for entry in audit
            if entry.get("tool") == "decide_approval" and entry["event"] == "accepted"] == [
        ("carol@example.test", "/ui", "approve"), ("carol@example.test", "/ui", "deny")]
