"""A full disk under the audit log or the task database, and a crash, through a real server
process: every line of the audit log stays whole JSON, and /healthz is 503 while the disk is
full and 200 again once it is freed. The disk is a real tmpfs, mounted by the test (as root)
and filled."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest

from tests.support import ALICE, LiveServer, StartServer, call_tool, error_text, fill, tmpfs, wait_until

pytestmark = pytest.mark.anyio
REFUSED = "unavailable: audit log not writable; the scan was not started"


def records(audit_log: Path) -> list[dict[str, object]]:
    """Every line of the log as JSON: a line that is not fails the test."""
    return [json.loads(line) for line in audit_log.read_text().splitlines()]


def health(server: LiveServer) -> tuple[int, str | None]:
    """/healthz's status code and reason."""
    answer = httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
    return answer.status_code, answer.json().get("reason")


async def healthy_again(server: LiveServer) -> bool:
    """Whether /healthz turns 200 within the audit log's retry interval and some."""
    return await asyncio.to_thread(wait_until, lambda: health(server) == (200, None), 20, 0.2)


async def test_a_torn_last_line_a_crash_left_is_cut_before_the_next_line(
    live_server: StartServer, tmp_path: Path
) -> None:
    audit_log = tmp_path / "audit.jsonl"
    before = [{"time": "2026-12-05T10:00:00.000+00:00", "event": "accepted", "call": "c1", "token": "alice",
               "tool": "list_tasks", "arguments": {}},
              {"time": "2026-12-05T10:00:00.002+00:00", "event": "done", "call": "c1", "token": "alice",
               "tool": "list_tasks", "verdict": "allowed", "reason": None, "task_id": None, "duration_ms": 2.0}]
    torn = '{"time":"2026-12-05T10:00:01.000+00:00","event":"acc'
    audit_log.write_text("".join(json.dumps(r) + "\n" for r in before) + torn)
    server = live_server(audit_log=str(audit_log))
    assert not (await call_tool(server.url, ALICE, "list_tasks", {})).is_error
    after = records(audit_log)
    assert after[:2] == before
    assert [(r["tool"], r["event"]) for r in after[2:]] == [("list_tasks", "accepted"), ("list_tasks", "done")]
    assert f"ended in a torn line: its {len(torn)} bytes were cut off" in server.log_text()


@pytest.mark.requires_root("mounting a tmpfs")
async def test_a_line_the_full_disk_cut_short_is_not_left_for_the_next_to_be_glued_to(
    live_server: StartServer,
) -> None:
    with tmpfs("2m") as disk:
        audit_log = disk / "audit.jsonl"
        server = live_server(audit_log=str(audit_log))
        assert not (await call_tool(server.url, ALICE, "list_tasks", {})).is_error
        assert audit_log.stat().st_size % os.statvfs(disk).f_bsize, "the log's last block has room left"
        filler = fill(disk)
        assert await asyncio.to_thread(health, server) == (503, "the audit log's disk is full")
        # Its `accepted` line (over 4 KiB: the arguments are kept up to 4096 characters) is
        # longer than the room left in the log's last block: the write is cut short there.
        refused = await call_tool(server.url, ALICE, "quick_scan", {"target": "127.0.0.1" + "1" * 5000})
        assert error_text(refused) == REFUSED
        filler.unlink()
        assert await healthy_again(server), await asyncio.to_thread(health, server)
        assert not (await call_tool(server.url, ALICE, "list_tasks", {})).is_error
        server.stop()
        after = records(audit_log)
    assert [r["tool"] for r in after if r["event"] == "accepted"] == ["list_tasks", "list_tasks"]
    assert [(r["tool"], r["event"]) for r in after[-2:]] == [("list_tasks", "accepted"), ("list_tasks", "done")]
    [resumed] = [r for r in after if r["event"] == "resumed"]
    assert resumed["unwritten"] in (1, 2), "the long `accepted` line, and `done` unless it fitted"


@pytest.mark.requires_root("mounting a tmpfs")
async def test_healthz_finds_the_audit_log_writable_again_without_a_tool_call(live_server: StartServer) -> None:
    """Nothing calls a tool once the disk is freed (a load balancer sends no calls to a 503):
    /healthz itself tries the log again, and the line it writes says what was lost."""
    with tmpfs("2m") as disk:
        audit_log = disk / "audit.jsonl"
        audit_log.touch()
        server = live_server(audit_log=str(audit_log))
        filler = fill(disk)
        refused = await call_tool(server.url, ALICE, "quick_scan", {"target": "127.0.0.1"})
        assert error_text(refused) == REFUSED
        filler.unlink()
        assert await healthy_again(server), await asyncio.to_thread(health, server)
        server.stop()
        after = records(audit_log)
    assert [(r["event"], r["unwritten"]) for r in after] == [("resumed", 2)], "its `accepted` and `done` lines"


@pytest.mark.requires_root("mounting a tmpfs")
async def test_healthz_is_503_while_the_task_databases_disk_is_full(live_server: StartServer) -> None:
    with tmpfs("16m") as disk:
        server = live_server(db_path=str(disk / "tasks.db"))
        filler = fill(disk)
        sick = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{server.port}/healthz")
        assert sick.status_code == 503 and sick.json()["reason"] == "the task database's disk is full"
        assert str(disk) not in sick.text
        filler.unlink()
        assert await asyncio.to_thread(health, server) == (200, None)
        ran = (await call_tool(server.url, ALICE, "quick_scan", {"target": "127.0.0.1"})).structured_content
        assert ran["status"] == "completed"
        server.stop()
