"""full_scan in two phases through in-memory clients of create_server(...) (the in_memory
fixture): the open ports arrive when port discovery ends, long before version detection of a
silent service does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from tests.conftest import OpenClient
from tests.support import NmapWrapper, SilentServer, answer_of, call, eventually, finished, running_task

pytestmark = pytest.mark.anyio


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer("127.0.0.3")
    yield server
    server.stop()


@pytest.mark.slow("version detection outlasting a call's shortest wait, 5 s")
async def test_open_ports_come_back_when_discovery_ends(in_memory: OpenClient, silent: SilentServer) -> None:
    async with in_memory(version_detection_seconds=8) as alice:
        started = time.monotonic()
        first = await answer_of(alice, "full_scan", target="127.0.0.3", timeout=5)
        assert time.monotonic() - started < 8
        assert first["status"] == "running" and first["result"]["partial"] is True
        assert first["progress"]["phase"].startswith("version detection (2 of 2)")
        [host] = first["result"]["hosts"]
        assert any(p["port"] == silent.port and p["state"] == "open" for p in host["ports"])
        final = await finished(alice, first["task_id"], timeout=60)
        xml = await answer_of(alice, "get_task_result", task_id=first["task_id"], format="xml")
    assert final["status"] == "completed" and final["result"]["partial"] is False
    assert any("version detection did not finish" in w for w in final["result"]["warnings"]), "bounded to 8 s"
    [host] = final["result"]["hosts"]
    assert any(p["port"] == silent.port and p["state"] == "open" for p in host["ports"])
    assert xml["content"].count("<nmaprun ") == 2, "both phases' reports are kept"


async def test_cancel_stops_the_version_phase(
    in_memory: OpenClient, silent: SilentServer, nmap_wrapper: NmapWrapper
) -> None:
    async with in_memory(version_detection_seconds=120) as alice:
        waiting = asyncio.create_task(call(alice, "full_scan", {"target": "127.0.0.3", "timeout": 60}))
        task_id = await running_task(alice, nmap_wrapper)

        async def phase() -> str:
            progress = (await answer_of(alice, "get_task_status", task_id=task_id))["progress"]
            return progress["phase"] if progress else ""

        deadline = time.monotonic() + 30
        while not (await phase()).startswith("version detection (2 of 2)"):
            assert time.monotonic() < deadline, "the version phase did not start"
            await asyncio.sleep(0.1)
        # The phase is named as its nmap is started: the start is recorded a moment later.
        assert await eventually(lambda: len(nmap_wrapper.pids()) == 2, 10), "discovery, then version detection"
        cancelled = await answer_of(alice, "cancel_task", task_id=task_id)
        assert cancelled["status"] == "cancelled"
        assert await eventually(lambda: nmap_wrapper.alive() == [], 5)
        kept = await answer_of(alice, "get_task_result", task_id=task_id)
        await waiting
    assert any(p["port"] == silent.port for h in kept["result"]["hosts"] for p in h["ports"])
    assert kept["result"]["partial"] is True and kept["progress"] is None
