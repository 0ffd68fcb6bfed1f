"""full_scan in two phases through the official client and a real server: the open ports
arrive when port discovery ends, long before version detection of a silent service does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from tests.support import ALICE, NmapWrapper, SilentServer, StartServer, call_tool, wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer("127.0.0.3")
    yield server
    server.stop()


async def test_open_ports_come_back_when_discovery_ends(live_server: StartServer, silent: SilentServer) -> None:
    server = live_server(version_detection_seconds=8)
    started = time.monotonic()
    first = (await call_tool(server.url, ALICE, "full_scan", {"target": "127.0.0.3", "timeout": 5})).structured_content
    assert time.monotonic() - started < 8
    assert first["status"] == "running" and first["result"]["partial"] is True
    assert first["progress"]["phase"].startswith("version detection (2 of 2)")
    [host] = first["result"]["hosts"]
    assert any(p["port"] == silent.port and p["state"] == "open" for p in host["ports"])
    final = first
    while final["status"] == "running" and time.monotonic() - started < 60:
        await asyncio.sleep(0.5)
        final = (await call_tool(server.url, ALICE, "get_task_result", {"task_id": first["task_id"]})
                 ).structured_content
    assert final["status"] == "completed" and final["result"]["partial"] is False
    assert any("version detection did not finish" in w for w in final["result"]["warnings"]), "bounded to 8 s"
    [host] = final["result"]["hosts"]
    assert any(p["port"] == silent.port and p["state"] == "open" for p in host["ports"])
    xml = (await call_tool(server.url, ALICE, "get_task_result", {"task_id": first["task_id"], "format": "xml"})
           ).structured_content
    assert xml["content"].count("<nmaprun ") == 2, "both phases' reports are kept"


async def test_cancel_stops_the_version_phase(
    live_server: StartServer, silent: SilentServer, nmap_wrapper: NmapWrapper
) -> None:
    server = live_server(version_detection_seconds=120)
    first = (await call_tool(server.url, ALICE, "full_scan", {"target": "127.0.0.3", "timeout": 5})).structured_content
    assert first["progress"]["phase"].startswith("version detection (2 of 2)")
    assert len(nmap_wrapper.pids()) == 2, "discovery, then version detection"
    cancelled = (await call_tool(server.url, ALICE, "cancel_task", {"task_id": first["task_id"]})).structured_content
    assert cancelled["status"] == "cancelled"
    assert await asyncio.to_thread(wait_until, lambda: nmap_wrapper.alive() == [], 5)
    kept = (await call_tool(server.url, ALICE, "get_task_result", {"task_id": first["task_id"]})).structured_content
    assert any(p["port"] == silent.port for h in kept["result"]["hosts"] for p in h["ports"])
