"""The HTTP edge against the penetration test of issue 19: deeply nested JSON, guessed tokens,
secrets under other query parameter names, secrets in DEBUG logs, and the JSON-RPC codes of a
caller's mistakes. The attacks run against real server processes over real HTTP (clients on
addresses of 127.43.0.0/16 where the address matters); the throttle, the redaction and the
nesting walk are also tested alone."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from http_edge import MAX_JSON_DEPTH, nests_deeper, redact_url_secrets, secret_name
from logs import JsonLines, without_url_secrets
from tests.support import ALICE, BOB, MCP_HEADERS, SECRETS, LiveServer, StartServer, call_tool, free_port
from throttle import MAX_ADDRESSES, FailedTokenThrottle, client_address

pytestmark = pytest.mark.anyio
WRONG = "wrong-secret-" + "w" * 30
METRICS_SECRET = "metrics-secret-" + "m" * 30
ATTACKER, BYSTANDER = "127.43.0.2", "127.43.0.3"
TOO_DEEP = f"Parse error: the request body nests deeper than {MAX_JSON_DEPTH} levels"


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def from_address(address: str) -> httpx.Client:
    """An HTTP client whose connections come from `address` (a loopback address of this test's range)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30)


def rpc(server: LiveServer, method: str, params: dict[str, Any], token: str = ALICE) -> dict[str, Any]:
    """One JSON-RPC request as a single POST; the JSON-RPC message that answers it."""
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    answer = httpx.post(server.url, json=body, headers=MCP_HEADERS | {"Authorization": f"Bearer {token}"}, timeout=60)
    assert answer.status_code == 200, answer.text
    data = [line[5:] for line in answer.text.splitlines() if line.startswith("data:")]
    message: dict[str, Any] = json.loads(data[-1] if data else answer.text)
    return message


def deep_call(levels: int) -> bytes:
    """A tools/call whose `target` argument is nested `levels` arrays deep."""
    return (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "quick_scan", '
            b'"arguments": {"target": ' + b"[" * levels + b"]" * levels + b"}}}")


def test_deeply_nested_json_is_a_short_400_parse_error_and_no_traceback(live_server: StartServer) -> None:
    server = live_server()
    headers = MCP_HEADERS | {"Authorization": f"Bearer {ALICE}"}
    bodies = [b"[" * 100_000, b'{"a": ' * 100_000, b"[" * 100_000 + b"]" * 100_000,
              deep_call(MAX_JSON_DEPTH)]
    for body in bodies:
        answer = httpx.post(server.url, content=body, headers=headers, timeout=30)
        assert answer.status_code == 400, (body[:40], answer.status_code, answer.text[:200])
        assert answer.json() == {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": TOO_DEEP}}
    # A body of ordinary depth still reaches the tool, which says what is wrong with it.
    shallow = httpx.post(server.url, content=deep_call(1), headers=headers, timeout=30)
    assert shallow.status_code == 200 and "invalid_argument: target must be a string" in shallow.text
    server.stop()
    log = server.log_text()
    assert '"POST /mcp HTTP/1.1" 400' in log
    assert "Traceback" not in log and "RecursionError" not in log and '" 500' not in log


def test_refused_tokens_are_throttled_per_address_and_valid_tokens_still_work(live_server: StartServer) -> None:
    server = live_server(failed_token_limit=3, failed_token_window_seconds=600, metrics_token=METRICS_SECRET)
    metrics = f"http://127.0.0.1:{server.port}/metrics"
    wrong = MCP_HEADERS | {"Authorization": f"Bearer {WRONG}"}
    with from_address(ATTACKER) as attacker, from_address(BYSTANDER) as bystander:
        def guess(client: httpx.Client, **headers: str) -> httpx.Response:
            return client.post(server.url, json={}, headers=wrong | headers)

        assert [guess(attacker).status_code for _ in range(3)] == [401, 401, 401]
        throttled = guess(attacker)
        assert throttled.status_code == 429
        assert 1 <= int(throttled.headers["retry-after"]) <= 600
        assert throttled.json()["error"] == "too_many_requests"
        assert "retry in" in throttled.json()["error_description"]
        # A forwarded address from a client that is not a trusted proxy changes nothing.
        assert guess(attacker, **{"X-Forwarded-For": "10.9.9.9"}).status_code == 429
        assert attacker.get(metrics, headers={"Authorization": f"Bearer {WRONG}"}).status_code == 429
        valid = attacker.post(server.url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                              headers=MCP_HEADERS | {"Authorization": f"Bearer {ALICE}"})
        assert valid.status_code == 200 and "quick_scan" in valid.text, "a valid token works from a throttled address"
        assert attacker.get(metrics, headers={"Authorization": f"Bearer {METRICS_SECRET}"}).status_code == 200
        assert guess(bystander).status_code == 401, "another address is not throttled"
        page = attacker.get(metrics, headers={"Authorization": f"Bearer {METRICS_SECRET}"}).text
    assert 'nmap_mcp_auth_throttled_total{endpoint="mcp"} 2.0' in page
    assert 'nmap_mcp_auth_throttled_total{endpoint="metrics"} 1.0' in page
    assert 'nmap_mcp_auth_failures_total{endpoint="mcp",reason="wrong_token"} 6.0' in page


def test_a_caller_s_mistakes_are_invalid_params_without_a_traceback(live_server: StartServer) -> None:
    """-32602 for prompts/get with a missing or unknown argument, for tools/call params that
    are not a call, and for resources/read of a task that is not the caller's or does not
    exist (the same words for both). Arguments that break a tool's schema stay a tool error
    the model can act on (isError, invalid_argument), as the MCP specification asks."""
    server = live_server()
    created = rpc(server, "tools/call", {"name": "quick_scan", "arguments": {"target": "127.0.0.1", "timeout": 5}})
    task_id = created["result"]["structuredContent"]["task_id"]
    assert rpc(server, "resources/read", {"uri": f"nmap://tasks/{task_id}"})["result"]["contents"]
    other = rpc(server, "resources/read", {"uri": f"nmap://tasks/{task_id}"}, token=BOB)
    missing_id = "00000000-0000-4000-8000-000000000000"
    missing = rpc(server, "resources/read", {"uri": f"nmap://tasks/{missing_id}"}, token=BOB)
    assert other["error"] == {"code": -32602, "message": f"not_found: no task '{task_id}'"}
    assert missing["error"] == {"code": -32602, "message": f"not_found: no task '{missing_id}'"}
    no_network = rpc(server, "prompts/get", {"name": "assess_network", "arguments": {}})
    assert no_network["error"] == {"code": -32602, "message": (
        "Invalid params: prompt assess_network needs the argument network (it takes network)")}
    unknown = rpc(server, "prompts/get", {"name": "what_changed", "arguments": {"network": "10.0.0.0/24", "x": "1"}})
    assert unknown["error"] == {"code": -32602, "message": (
        "Invalid params: prompt what_changed takes network, since; 'x' is not one of its arguments")}
    assert "result" in rpc(server, "prompts/get", {"name": "what_changed", "arguments": {"network": "10.0.0.0/24"}})
    for params in ({"name": "list_tasks", "arguments": "all"}, {"name": "list_tasks", "arguments": [1]},
                   {"arguments": {}}):
        assert rpc(server, "tools/call", params)["error"]["code"] == -32602, params
    schema = rpc(server, "tools/call", {"name": "list_tasks", "arguments": {"limit": "many"}})["result"]
    assert schema["isError"] and schema["content"][0]["text"].startswith("invalid_argument: limit must be")
    server.stop()
    log = server.log_text()
    assert "Traceback" not in log and "Error reading resource" not in log and "Error rendering prompt" not in log


async def test_no_secret_reaches_the_log_at_debug(live_server: StartServer) -> None:
    """The server at DEBUG, FastMCP, the MCP SDK, uvicorn and httpx included: tokens in
    headers and URLs (under any secret-looking name), a wrong one, and a schedule whose webhook
    URL holds a signature and whose answer holds the webhook's secret."""
    hook = f"http://127.43.0.4:{free_port('127.43.0.4')}/hook"
    server = live_server(webhook_allowed_urls=[hook], webhook_allowed_addresses=["127.43.0.4"], min_schedule_seconds=60)
    for via in ("header", "query"):
        assert not (await call_tool(server.url, ALICE, "list_tasks", {}, via=via)).is_error
    signature = "webhook-signature-" + "s" * 20
    created = await call_tool(server.url, BOB, "schedule_scan", {
        "kind": "quick", "target": "127.0.0.1", "every": "1h", "webhook_url": f"{hook}?sig={signature}&team=red"})
    webhook_secret = created.structured_content["webhook_secret"]
    async with httpx.AsyncClient(headers=MCP_HEADERS, timeout=30) as http:
        for name in ("api_key", "API-KEY", "auth", "key", "password", "secret", "sig", "signature", "Client_Secret"):
            assert (await http.post(f"{server.url}?{name}={ALICE}&keep=1", json={})).status_code == 401, name
        listed = await http.post(f"{server.url}?Access-Token={BOB}", json={"jsonrpc": "2.0", "id": 1,
                                                                           "method": "tools/list"})
        assert listed.status_code == 200, "a token under a spelling of access_token is taken"
        assert (await http.post(server.url, json={}, headers={"Authorization": f"Bearer {WRONG}"})).status_code == 401
    server.stop()
    log = server.log_text()
    for logger in ("fastmcp.server", "mcp.server", "mcp.shared"):
        assert f"DEBUG {logger}" in log, f"{logger} must log at DEBUG in this test"
    assert 'POST /mcp?keep=1 HTTP/1.1" 401' in log, "only the secret-looking parameters are removed"
    assert "team=red" in log, "the schedule's arguments were logged, the signature left out"
    audit = (server.config_path.parent / "audit.jsonl").read_text()
    assert "sig=***&team=red" in audit
    for secret in (*SECRETS.values(), WRONG, signature, webhook_secret):
        assert secret not in log and secret not in audit


def test_the_throttle_allows_a_burst_then_one_refusal_per_interval() -> None:
    clock = Clock()
    throttle = FailedTokenThrottle(limit=10, window_s=60, clock=clock)
    assert [throttle.refused("10.0.0.1") for _ in range(10)] == [None] * 10
    assert throttle.refused("10.0.0.1") == 6
    assert throttle.refused("10.0.0.2") is None, "each address has its own count"
    clock.now += 5
    assert throttle.refused("10.0.0.1") == 1, "a throttled refusal does not add to the wait"
    clock.now += 1
    assert throttle.refused("10.0.0.1") is None
    assert throttle.refused("10.0.0.1") == 6
    clock.now += 60
    assert [throttle.refused("10.0.0.1") for _ in range(10)] == [None] * 10


def test_a_first_refusal_is_never_throttled_whatever_the_clock_reads() -> None:
    """At this clock reading (now + 600) - now is a little more than 600 in floating point,
    which once answered an address's very first refused token with 429 (seen in a fresh root)."""
    clock = Clock()
    clock.now = 8099.689850785685
    throttle = FailedTokenThrottle(limit=1, window_s=600, clock=clock)
    assert [throttle.refused("10.0.0.1") for _ in range(2)] == [None, 600]


def test_the_throttle_keeps_a_bounded_number_of_addresses() -> None:
    throttle = FailedTokenThrottle(limit=1, window_s=60, clock=Clock())
    assert throttle.refused("10.0.0.1") is None and throttle.refused("10.0.0.1") == 60
    for n in range(MAX_ADDRESSES + 500):
        throttle.refused(f"fd00::{n:x}/128")
    assert len(throttle) == MAX_ADDRESSES
    assert throttle.refused("10.0.0.1") is None, "the least recently refused address was dropped first"


@pytest.mark.parametrize(("client", "counted_as"), [
    (("127.43.0.2", 5000), "127.43.0.2"),
    (("2001:db8:1:2:aaaa::1", 5000), "2001:db8:1:2::/64"),
    (("2001:db8:1:2:bbbb::9", 5000), "2001:db8:1:2::/64"),
    (("::ffff:10.1.2.3", 5000), "10.1.2.3"),
    (None, ""),
])
def test_an_ipv6_client_counts_by_its_64(client: tuple[str, int] | None, counted_as: str) -> None:
    assert client_address({"type": "http", "client": client}) == counted_as


@pytest.mark.parametrize("name", ["token", "TOKEN", "access_token", "Access-Token", "api_key", "apikey", "API-KEY",
                                  "key", "auth", "password", "secret", "sig", "signature", "client_secret",
                                  "x-auth-token", "refresh_token", "pwd"])
def test_secret_looking_names(name: str) -> None:
    assert secret_name(name) is not None


@pytest.mark.parametrize("name", ["keep", "network", "owner", "a", "b", "status", "limit", "monkey", "keys"])
def test_ordinary_names(name: str) -> None:
    assert secret_name(name) is None


def test_redaction_of_urls_in_free_text() -> None:
    line = ('HTTP Request: POST http://hooks.example/x?sig=abc123&team=red "HTTP/1.1 200 OK"; '
            "{'webhook_url': 'https://h.example/a;token=t0k/b?API-KEY=k3y&b=2'} "
            '{"url": "https://h.example/?Client_Secret=s3c&page=2", "n": 1}')
    # A value ends at the next separator, space or quote: a '?' or '/' in it is part of it.
    assert redact_url_secrets(line) == (
        'HTTP Request: POST http://hooks.example/x?sig=***&team=red "HTTP/1.1 200 OK"; '
        "{'webhook_url': 'https://h.example/a;token=***&b=2'} "
        '{"url": "https://h.example/?Client_Secret=***&page=2", "n": 1}')


def test_redacted_json_stays_json() -> None:
    arguments = {"webhook_url": 'https://h.example/x?sig=abc\\"def&n=1', "note": "a?key=1 b"}
    redacted = json.loads(redact_url_secrets(json.dumps(arguments)))
    assert redacted == {"webhook_url": 'https://h.example/x?sig=***\\"def&n=1', "note": "a?key=*** b"}


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing JSON lines, through the redaction filter, into a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonLines(["levelname", "name", "message"]))
    handler.addFilter(without_url_secrets)
    logger = logging.getLogger("tests.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    yield logger, buffer
    logger.removeHandler(handler)


def test_log_records_lose_url_secrets_in_message_and_traceback(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buffer = captured
    logger.warning("posting to %s", "https://h.example/x?password=hunter2hunter2&n=1")
    try:
        raise ValueError("bad answer from https://h.example/x?api_key=k3yk3yk3y")
    except ValueError:
        logger.exception("the webhook failed")
    first, second = (json.loads(line) for line in buffer.getvalue().splitlines())
    assert first["message"] == "posting to https://h.example/x?password=***&n=1"
    assert second["message"] == "the webhook failed" and "api_key=***" in second["exc_info"]
    assert "hunter2" not in buffer.getvalue() and "k3yk3y" not in buffer.getvalue()


def test_nesting_is_measured_without_recursion() -> None:
    assert not nests_deeper(json.loads("[" * 64 + "]" * 64), 64)
    assert nests_deeper(json.loads("[" * 65 + "]" * 65), 64)
    assert nests_deeper({"a": [{"b": {}}]}, 3) and not nests_deeper({"a": [{"b": 1}]}, 3)
    assert not nests_deeper("text", 0)
