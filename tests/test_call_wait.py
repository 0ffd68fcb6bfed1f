"""A scan call answers before common clients give up (they stop waiting after 60 s): the wait is
capped by max_call_wait_seconds whatever `timeout` asks, and the answer then names the task
that goes on. Through in-memory clients of create_server(...) with real nmap on loopback."""

from __future__ import annotations

import time

import pytest

from tests.conftest import OpenClient
from tests.support import Listeners, answer_of, finished, free_port

pytestmark = pytest.mark.anyio
HOST = "127.62.21.2"
CAP_S = 2
# A call answers within the cap plus this (the tool call's own work, on a busy machine).
SLACK_S = 5


@pytest.mark.slow("a T2 scan of 30 ports, about 13 s")
async def test_a_long_timeout_is_capped_and_the_answer_says_how_to_fetch_the_scan(
    in_memory: OpenClient, listeners: Listeners
) -> None:
    port = free_port(HOST)
    assert listeners.open(port, HOST)
    # T2 waits 0.4 s between probes: 30 ports take about 13 s, far past the 2 s cap.
    async with in_memory(max_call_wait_seconds=CAP_S) as alice:
        started = time.monotonic()
        first = await answer_of(alice, "scan", targets=HOST, ports=f"{port}-{port + 29}", timing="T2",
                                timeout=300)
        waited_s = time.monotonic() - started
        assert CAP_S <= waited_s < CAP_S + SLACK_S, f"answered after {waited_s:.1f} s"
        assert first["status"] == "running", first
        assert "instead of the 300 s asked" in first["message"]
        assert f"get_task_result with task_id '{first['task_id']}'" in first["message"]
        final = await finished(alice, first["task_id"], timeout=120)
    assert final["status"] == "completed"
    [host] = final["result"]["hosts"]
    assert [p["port"] for p in host["ports"] if p["state"] == "open"] == [port]


async def test_a_wait_within_the_cap_is_not_cut(in_memory: OpenClient, listeners: Listeners) -> None:
    port = free_port(HOST)
    assert listeners.open(port, HOST)
    async with in_memory(max_call_wait_seconds=CAP_S) as alice:
        done = await answer_of(alice, "custom_scan", command=f"-p {port} {HOST}", timeout=600)
    assert done["status"] == "completed" and done["message"] is None
