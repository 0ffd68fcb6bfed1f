"""Check a running nmap-mcp server: auth in every style, then a real scan.

    python test_client.py TOKEN [--url http://127.0.0.1:3004/mcp] [--target 127.0.0.1]

Prints one PASS/FAIL line per check and exits non-zero if any check failed. The token is
never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

Check = Callable[[], Awaitable[str]]
_INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "nmap-mcp-test-client", "version": "1"},
    },
}
_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
# The statuses of a refused token, in words.
REFUSALS = {401: "token not accepted", 429: "throttled"}


class CheckFailed(Exception):
    """A check saw something other than what a healthy server does."""


async def call_tool(url: str, headers: dict[str, str], mode: str, name: str, args: dict[str, Any]) -> Any:
    """Call one tool with the official MCP client; return its structured content."""
    async with (refusals_explained(url, headers), httpx2.AsyncClient(headers=headers, timeout=120) as http,
                Client(streamable_http_client(url, http_client=http), mode=mode) as client):
        result = await client.call_tool(name, args)
    if result.is_error:
        text = result.content[0].text if result.content else "no message"  # type: ignore[union-attr]
        raise CheckFailed(f"{name} returned an error: {text}")
    return result.structured_content


async def list_tool_names(url: str, headers: dict[str, str], mode: str) -> list[str]:
    async with (refusals_explained(url, headers), httpx2.AsyncClient(headers=headers, timeout=30) as http,
                Client(streamable_http_client(url, http_client=http), mode=mode) as client):
        return [tool.name for tool in (await client.list_tools()).tools]


@contextlib.asynccontextmanager
async def refusals_explained(url: str, headers: dict[str, str]) -> AsyncIterator[None]:
    """The MCP client reports any HTTP refusal as a generic error: when a call fails, ask
    the server over plain HTTP whether it refused the token (401, or 429 once this address
    sent too many refused tokens), and say so."""
    try:
        yield
    except Exception as e:
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.post(url, json=_INITIALIZE, headers=_HEADERS | headers)
        if response.status_code in REFUSALS:
            reason = response.json().get("error_description", "") if response.content else ""
            raise CheckFailed(f"HTTP {response.status_code}, {REFUSALS[response.status_code]}: {reason}") from e
        raise


async def expect_refused(url: str, headers: dict[str, str]) -> str:
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(url, json=_INITIALIZE, headers=_HEADERS | headers)
    if response.status_code == 429 and "retry-after" in response.headers:
        return f"refused with 429: {response.json().get('error_description', '')}"
    if response.status_code != 401:
        raise CheckFailed(f"expected 401, got {response.status_code}")
    if not response.headers.get("www-authenticate", "").startswith("Bearer"):
        raise CheckFailed("401 without a 'WWW-Authenticate: Bearer' header")
    return "refused with 401"


def build_checks(url: str, token: str, target: str) -> list[tuple[str, Check]]:
    bearer = {"Authorization": f"Bearer {token}"}
    query_url = f"{url}?token={token}"
    state: dict[str, str] = {}

    async def url_token() -> str:
        names = await list_tool_names(query_url, {}, "legacy")
        if "quick_scan" not in names:
            raise CheckFailed(f"quick_scan missing from tools/list: {names}")
        return f"{len(names)} tools listed (2025-11-25 handshake)"

    async def bearer_header() -> str:
        names = await list_tool_names(url, bearer, "auto")
        if "quick_scan" not in names:
            raise CheckFailed(f"quick_scan missing from tools/list: {names}")
        return f"{len(names)} tools listed (2026-07-28 era)"

    async def quick_scan() -> str:
        answer = await call_tool(url, bearer, "auto", "quick_scan", {"target": target})
        state["task_id"] = answer["task_id"]
        if answer["status"] not in ("completed", "queued", "running"):
            raise CheckFailed(f"scan ended {answer['status']}: {answer.get('error')}")
        hosts = (answer.get("result") or {}).get("hosts", [])
        return f"status {answer['status']}, {len(hosts)} host(s) up"

    async def task_status() -> str:
        if "task_id" not in state:
            raise CheckFailed("no task id: the quick_scan check failed")
        answer = await call_tool(url, bearer, "auto", "get_task_status", {"task_id": state["task_id"]})
        return f"task {answer['task_id']} is {answer['status']}"

    return [
        ("url_token", url_token),
        ("bearer_header", bearer_header),
        ("no_token", lambda: expect_refused(url, {})),
        ("wrong_token", lambda: expect_refused(url, {"Authorization": "Bearer wrong-" + token[:4] + "x" * 20})),
        ("wrong_url_token", lambda: expect_refused(f"{url}?token=wrong-token-0123456789", {})),
        ("quick_scan", quick_scan),
        ("get_task_status", task_status),
    ]


async def run_checks(checks: list[tuple[str, Check]]) -> int:
    failures = 0
    for name, check in checks:
        try:
            detail = await check()
        except Exception as e:  # noqa: BLE001 - any failure of a check is reported, never raised
            failures += 1
            print(f"FAIL {name}: {describe(e)}", flush=True)
        else:
            print(f"PASS {name}: {detail}", flush=True)
    print(f"{len(checks) - failures} passed, {failures} failed")
    return failures


def describe(error: BaseException) -> str:
    """A one-line reason; unwraps the exception groups that anyio raises."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return str(error) if isinstance(error, CheckFailed) else f"{type(error).__name__}: {error}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a running nmap-mcp server")
    parser.add_argument("token", help="an API token configured on the server")
    parser.add_argument("--url", default="http://127.0.0.1:3004/mcp", help="the server's MCP endpoint")
    parser.add_argument("--target", default="127.0.0.1", help="what quick_scan scans (default 127.0.0.1)")
    args = parser.parse_args(argv)
    failures = asyncio.run(run_checks(build_checks(args.url, args.token, args.target)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
