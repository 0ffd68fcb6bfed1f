"""A full scan's progress on real nmap is one scale that never goes down: port discovery, then a
slow version phase (silent services nmap waits on), as the MCP progress notifications of the
waiting call and get_task_status show it. Through an in-memory client of create_server(...)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import pytest

from tests.conftest import OpenClient
from tests.support import SilentServer, answer_of

pytestmark = pytest.mark.anyio
HOST = "127.62.21.4"


@pytest.fixture
def silent_ports() -> Iterator[list[int]]:
    servers = [SilentServer(HOST) for _ in range(3)]
    yield [server.port for server in servers]
    for server in servers:
        server.stop()


@pytest.mark.slow("a version phase bounded to 10 s")
async def test_a_full_scan_s_progress_never_goes_down_and_moves_through_version_detection(
    in_memory: OpenClient, silent_ports: list[int]
) -> None:
    notified: list[tuple[float, str]] = []
    statuses: list[dict[str, object]] = []

    async def record(progress: float, total: float | None, message: str | None) -> None:
        assert total == 100
        notified.append((progress, message or ""))

    async with in_memory(version_detection_seconds=10) as alice:
        call_made = asyncio.create_task(alice.call_tool("full_scan", {"target": HOST, "timeout": 60},
                                                        progress_handler=record, raise_on_error=False))
        while not call_made.done():
            if listed := (await answer_of(alice, "list_tasks", status="running"))["tasks"]:
                task = await answer_of(alice, "get_task_status", task_id=listed[0]["task_id"])
                if task["progress"]:
                    statuses.append(task["progress"])
            await asyncio.sleep(0.2)
        done = (await call_made).structured_content
    assert done is not None and done["status"] == "completed", done
    found = {p["port"] for h in done["result"]["hosts"] for p in h["ports"] if p["state"] == "open"}
    assert set(silent_ports) <= found

    sent = [progress for progress, _ in notified]
    assert sent == sorted(set(sent)), f"each notification's progress must increase: {sent}"
    shown = [float(status["percent"]) for status in statuses]  # type: ignore[arg-type]
    assert shown == sorted(shown), f"get_task_status went down: {shown}"
    versions = [(progress, message) for progress, message in notified if message.startswith("version detection")]
    assert len(versions) >= 3, f"the version phase is stuck: {notified}"
    assert all(70 <= progress <= 100 for progress, _ in versions)
    assert all(re.search(r"about \d+ s left", message) for _, message in versions), versions
    in_versions = [s for s in statuses if str(s["phase"]).startswith("version detection")]
    assert in_versions and all(s["remaining_s"] is not None for s in in_versions)
