"""Approvals: scans an engagement says a person must approve first, decided by an approver
with decide_approval (and in /ui, tests/test_dashboard.py), denied when nobody decides in time,
every decision audited with who made it; real nmap on loopback."""

from __future__ import annotations

import asyncio
import json
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastmcp_tasks import call_tool_task
from mcp_types import ElicitResult

from approvals import EXPIRY_RECHECK_SECONDS, expire_forever
from argv_check import ArgvCheck, TaskRefused
from audit import AuditLog, Auditor
from config import Settings
from engagements import EngagementRules, approval_reasons
from models import ScanKind, TaskRecord, TaskStatus
from policy import Policy
from scanner import build_argv
from stores import Stores
from task_manager import ApprovalRequest
from tests.conftest import OpenClient, ToolClient
from tests.nodes import opened_stores, statements_run, wait_for
from tests.support import ROOT, SECRETS, LiveServer, answer_of, call, error_text, finished

pytestmark = pytest.mark.anyio
NET = "127.0.23.0/24"
NMAP = "/usr/bin/nmap"
CATALOG = {"http-title": frozenset({"default", "safe", "discovery"}), "ssl-enum-ciphers": frozenset({"intrusive"})}


def reasons(approval: dict[str, Any], options: list[str], addresses: int = 1, now: float | None = None,
            new: list[str] | None = None) -> list[str]:
    rules = EngagementRules(scope=[NET], timezone="UTC", approval=approval)
    return approval_reasons(rules, options, addresses, now or time.time(), lambda pick: CATALOG.get(pick, frozenset()),
                            new or [])


def test_each_approval_rule_names_what_it_matched() -> None:
    assert reasons({}, ["-sT", "-p", "80"], 300) == []
    assert reasons({"addresses_over": 256}, ["-sT"], 300) == ["it covers 300 addresses, more than 256"]
    assert reasons({"raw_packets": True}, ["-sS", "-sU", "-p", "53"]) == ["it sends raw packets (-sS, -sU)"]
    assert reasons({"raw_packets": True}, ["-sT"]) == []
    picked = ["-sT", "--script=(discovery or http-title) and (default or safe) and not (brute)"]
    assert reasons({"script_categories": ["discovery"]}, picked) == [
        "it runs scripts of the categories discovery (discovery, http-title)"]
    assert reasons({"script_categories": ["vuln"]}, picked) == []
    monday_noon, monday_night = 1_799_064_000.0, 1_799_096_400.0  # 2027-01-04 12:00 and 21:00 UTC
    office = {"business_hours": [{"days": ["mon", "tue", "wed", "thu", "fri"], "start": "08:00", "end": "18:00"}]}
    assert reasons(office, ["-sT"], now=monday_noon) == []
    assert reasons(office, ["-sT"], now=monday_night) == [
        "it runs outside business hours (mon,tue,wed,thu,fri 08:00-18:00, UTC)"]
    assert reasons({"new_networks": True}, ["-sT"], new=["127.0.23.0/24"]) == ["it is the first scan of 127.0.23.0/24"]


def approval_config(**approval: Any) -> dict[str, Any]:
    tokens = {"alice": {"secret": SECRETS["alice"], "engagement": "lab", "approve_scans": True},
              "bob": {"secret": SECRETS["bob"], "approve_scans": True},
              "carol": {"secret": "carol-secret-" + "c" * 24}}
    lab = {"scope": [NET], "tokens": ["alice", "carol"], "approval": approval}
    return {"tokens": tokens, "engagements": {"lab": lab}}


async def test_an_approver_approves_or_denies_and_the_task_runs_or_ends_denied(
        in_memory: OpenClient, tmp_path: Path) -> None:
    config = approval_config(addresses_over=2)
    async with in_memory(**config) as alice, in_memory("bob", **config) as bob, in_memory("carol", **config) as carol:
        small = await answer_of(alice, "custom_scan", command="-Pn -p 1 127.0.23.1", timeout=30)
        assert small["status"] == "completed"
        waiting = await answer_of(alice, "custom_scan", command="-Pn -p 1 127.0.23.0/30", timeout=30)
        assert waiting["status"] == "awaiting_approval", waiting
        assert waiting["message"].endswith("Why: it covers 4 addresses, more than 2.")
        other = await answer_of(alice, "custom_scan", command="-Pn -p 2 127.0.23.0/30", timeout=30)
        # carol has no approve_scans: the approvers' tools are neither listed nor callable for her.
        assert not {"list_approvals", "decide_approval"} & {tool.name for tool in await carol.list_tools()}
        assert error_text(await call(carol, "list_approvals", {})) == "forbidden: this token may not use list_approvals"
        [first, second] = (await answer_of(bob, "list_approvals"))["approvals"]
        assert first["task_id"] == waiting["task_id"] and second["task_id"] == other["task_id"]
        assert first["requested_by"] == "alice" and first["engagement"] == "lab" and first["reasons"] == [
            "it covers 4 addresses, more than 2"]
        assert first["argv"][:4] == ["-sT", "-Pn", "-p", "1"] and first["argv"][-1] == "127.0.23.0/30"
        own = await call(alice, "decide_approval", {"task_id": waiting["task_id"], "decision": "approve",
                                                    "reason": "mine"})
        assert error_text(own) == "forbidden: nobody approves or denies their own scan; another approver decides"
        approved = await answer_of(bob, "decide_approval", task_id=waiting["task_id"], decision="approve",
                                   reason="in the plan for today")
        assert approved["decision"] == "approved" and approved["decided_by"] == "bob"
        denied = await answer_of(bob, "decide_approval", task_id=other["task_id"], decision="deny",
                                 reason="port 2 is out of the plan")
        assert denied["decision"] == "denied"
        again = await call(bob, "decide_approval", {"task_id": other["task_id"], "decision": "approve", "reason": "x"})
        assert error_text(again) == "already_decided: task " + other["task_id"] + " was denied already by bob"
        ran = await finished(alice, waiting["task_id"])
        assert ran["status"] == "completed" and len(ran["result"]["hosts"]) == 4
        refused = await answer_of(alice, "get_task_status", task_id=other["task_id"])
        assert refused["status"] == "denied" and refused["error"] == "denied by bob: port 2 is out of the plan"
        assert (await answer_of(bob, "list_approvals"))["approvals"] == []
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    decisions = [(line["token"], line["arguments"]) for line in lines
                 if line.get("tool") == "decide_approval" and line["event"] == "accepted"]
    assert ("bob", {"task_id": waiting["task_id"], "decision": "approve", "reason": "in the plan for today"}) \
        in decisions


async def test_an_approval_nobody_gives_in_time_is_denied(in_memory: OpenClient, tmp_path: Path) -> None:
    """The expiry loop, with nothing pending, sleeps a minute (EXPIRY_RECHECK_SECONDS): the
    request wakes it, and it sleeps again until the request is due."""
    config = approval_config(addresses_over=2, expires_after_seconds=5)
    async with in_memory(**config) as alice:
        waiting = await answer_of(alice, "custom_scan", command="-Pn -p 1 127.0.23.0/30", timeout=30)
        deadline = time.monotonic() + EXPIRY_RECHECK_SECONDS / 3
        while (shown := await answer_of(alice, "get_task_status", task_id=waiting["task_id"]))["status"] != "denied":
            assert time.monotonic() < deadline and shown["status"] == "awaiting_approval", shown
            await anyio.sleep(0.2)
    assert shown["error"] == "no approver decided within 5 s"
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [line["arguments"] for line in lines if line.get("tool") == "expire_approval"
            and line["event"] == "accepted"] == [{"task_id": waiting["task_id"]}]


async def test_a_worker_runs_no_task_its_engagement_holds_for_approval(tmp_path: Path) -> None:
    """The database is no trust boundary: a row moved to queued past its approval (or written
    without one) is refused by the worker that claims it, before nmap starts."""
    settings = Settings(tokens={"alice": {"secret": SECRETS["alice"]}}, allow_loopback=True)
    lab = EngagementRules(scope=[NET], tokens=["alice"], approval={"addresses_over": 2})
    argv = build_argv(NMAP, ["-sT", "-p", "1", "--max-rate", "50000"], ["127.0.23.0/30"], ipv6=False, privileged=False)
    async with opened_stores(f"sqlite:///{tmp_path / 'tasks.db'}", max_queued=10) as stores:
        await stores.engagements.load_config({"lab": lab})
        check = ArgvCheck.of_worker(NMAP, Policy(settings, NMAP), privileged=False, pool="default",
                                    engagements=stores.engagements, approvals=stores.approvals)
        unasked = replace(await queued_task(stores, argv), engagement="lab")
        with pytest.raises(TaskRefused, match=r"wants a person's yes first \(it covers 4 addresses, more than 2\)"):
            await check.argv_to_run(unasked)
        asked = await stores.tasks.submit("alice", ScanKind.CUSTOM, "127.0.23.0/30", argv, 60, engagement="lab",
                                          approval=ApprovalRequest("lab", ["it covers 4 addresses"], 60))
        assert asked.record.status is TaskStatus.AWAITING_APPROVAL
        with pytest.raises(TaskRefused, match="its approval is still pending"):
            await check.argv_to_run(asked.record)
        await stores.approvals.decide(asked.record.id, "bob", "approved", "fine")
        assert await check.argv_to_run(asked.record) == argv


async def queued_task(stores: Stores, argv: list[str]) -> TaskRecord:
    return (await stores.tasks.submit("alice", ScanKind.CUSTOM, argv[-1], argv, 60)).record


async def test_an_engagement_s_export_holds_its_rules_its_tasks_and_their_approvals(
        in_memory: OpenClient, tmp_path: Path) -> None:
    config = approval_config(addresses_over=2)
    async with in_memory(**config) as alice, in_memory("bob", **config) as bob:
        plain = await answer_of(alice, "custom_scan", command="-Pn -p 1 127.0.23.1", timeout=30)
        held = await answer_of(alice, "custom_scan", command="-Pn -p 1 127.0.23.0/30", timeout=30)
        await answer_of(bob, "decide_approval", task_id=held["task_id"], decision="approve", reason="planned")
        await finished(alice, held["task_id"])
        evidence = await answer_of(alice, "get_task_evidence", task_id=held["task_id"])
    assert evidence["engagement"] == "lab"
    assert evidence["approval"] | {"decided_at": None} == {
        "decision": "approved", "decided_by": "bob", "decided_at": None, "decision_reason": "planned",
        "reasons": ["it covers 4 addresses, more than 2"], "justification": None}
    out = tmp_path / "lab.tar.gz"
    exported = await anyio.run_process([sys.executable, str(ROOT / "server.py"), "-c",
                                        str(tmp_path / "in-memory-0.json"), "--export-evidence", str(out),
                                        "--engagement", "lab"], check=False)
    assert exported.returncode == 0, exported.stderr.decode()
    with tarfile.open(out, "r:gz") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    manifest = json.loads(files["manifest.json"])
    assert manifest["filter"] == {"engagement": "lab"}
    assert manifest["engagement"]["rules"]["approval"] == {"addresses_over": 2}
    assert [task["task_id"] for task in manifest["tasks"]] == [plain["task_id"], held["task_id"]]
    assert manifest["tasks"][1]["approval"]["decided_by"] == "bob"
    audited = [json.loads(line) for line in files["audit.jsonl"].splitlines()]
    assert {(line["tool"], line["token"]) for line in audited if line["event"] == "accepted"} == {
        ("custom_scan", "alice"), ("decide_approval", "bob")}


async def test_plan_scan_names_the_engagement_and_whether_a_person_must_approve(in_memory: OpenClient) -> None:
    async with in_memory(**approval_config(addresses_over=2)) as alice:
        held = await answer_of(alice, "plan_scan", tool="custom_scan", arguments={"command": "-Pn -p 1 127.0.23.0/30"})
        plain = await answer_of(alice, "plan_scan", tool="quick_scan", arguments={"target": "127.0.23.1"})
        outside = await answer_of(alice, "plan_scan", tool="quick_scan", arguments={"target": "127.0.0.1"})
        assert (await answer_of(alice, "list_tasks"))["tasks"] == []
    assert held["verdict"] == "allowed" and held["engagement"] == "lab"
    assert held["approval_needed"] == ["it covers 4 addresses, more than 2"] and held["window_closes_at"] is None
    assert plain["verdict"] == "allowed" and plain["engagement"] == "lab" and plain.get("approval_needed") is None
    assert outside["verdict"] == "refused" and outside["code"] == "outside_scope"


class Requester:
    """A person at a 2026-07-28 client that shows forms: what the server asked, and their answer."""

    def __init__(self, answer: dict[str, Any] | None) -> None:
        self.answer = answer
        self.asked: list[str] = []

    async def __call__(self, message: str, _response_type: Any, _params: Any, _context: Any) -> Any:
        self.asked.append(message)
        if self.answer is None:
            return ElicitResult(action="decline")
        return self.answer


async def test_a_2026_07_28_client_is_asked_for_its_reason_in_the_call_s_own_answer(in_memory: OpenClient) -> None:
    """The scan tool answers input_required (multi round-trip); the client's retry, carrying the
    person's reason, queues nothing new: the reason reaches the approvers. A declined form
    withdraws the scan."""
    config = approval_config(addresses_over=2)
    giving, declining = Requester({"justification": "quarterly sweep, ticket SEC-1"}), Requester(None)
    async with in_memory(**config, mode="2026-07-28", elicitation=giving) as alice, \
            in_memory(**config, mode="2026-07-28", elicitation=declining) as alice_again, \
            in_memory("bob", **config) as bob:
        kept = await answer_of(alice, "custom_scan", command="-Pn -p 1 127.0.23.0/30", timeout=30)
        withdrawn = await answer_of(alice_again, "custom_scan", command="-Pn -p 2 127.0.23.0/30", timeout=30)
        [pending] = (await answer_of(bob, "list_approvals"))["approvals"]
        tasks = (await answer_of(alice, "list_tasks"))["tasks"]
    assert len(giving.asked) == len(declining.asked) == 1
    assert "it covers 4 addresses, more than 2" in giving.asked[0]
    assert giving.asked[0].endswith("or decline to withdraw the scan.")
    assert kept["status"] == "awaiting_approval" and kept["message"].startswith("The approvers have your reason.")
    assert pending["task_id"] == kept["task_id"] and pending["justification"] == "quarterly sweep, ticket SEC-1"
    assert withdrawn["status"] == "cancelled" and withdrawn["message"] == "You withdrew the scan."
    assert sorted(task["status"] for task in tasks) == ["awaiting_approval", "cancelled"], "no scan queued twice"


async def test_a_tasks_client_sees_its_task_input_required_then_working_then_completed(
        in_memory: OpenClient) -> None:
    config = approval_config(addresses_over=2)
    person = Requester({"justification": "needed for the audit"})
    async with in_memory(**config, mode="2026-07-28", tasks=True, elicitation=person) as alice, \
            in_memory("bob", **config) as bob:
        task = await call_tool_task(alice, "custom_scan", {"command": "-Pn -p 1 127.0.23.0/30"})
        assert task.create_result.status == "input_required"
        held = await task.status()
        assert held.status == "input_required" and "it covers 4 addresses" in (held.status_message or "")
        assert set(held.input_requests or {}) == {"approval"}
        # result() answers the form (tasks/update), then polls until the task ends.
        driving = asyncio.create_task(task.result())
        deadline = time.monotonic() + 30
        while not (pending := (await answer_of(bob, "list_approvals"))["approvals"])[0].get("justification"):
            assert time.monotonic() < deadline and not driving.done()
            await anyio.sleep(0.1)
        assert pending[0]["justification"] == "needed for the audit" and len(person.asked) == 1
        waiting = await task.status()
        assert waiting.status == "working"
        assert waiting.status_message == "waiting for an approver to approve or deny the scan"
        await answer_of(bob, "decide_approval", task_id=task.task_id, decision="approve", reason="ok")
        result = await driving
    assert result.structured_content is not None and result.structured_content["status"] == "completed"


@pytest.mark.server
async def test_the_reason_round_trip_over_http_with_a_2026_07_28_client(
        live_server: Callable[..., LiveServer]) -> None:
    """The same round trip through a real server process: the sealed request_state crosses
    the wire and back, and the retry reaches the held task."""
    server = live_server(**approval_config(addresses_over=2))
    person = Requester({"justification": "over HTTP"})
    # ToolClient: without MCP Tasks (which this module's import of fastmcp_tasks would turn on).
    async with ToolClient(server.url, auth=SECRETS["alice"], mode="2026-07-28", elicitation_handler=person) as alice:
        kept = (await alice.call_tool("custom_scan", {"command": "-Pn -p 1 127.0.23.0/30"})).structured_content
    async with ToolClient(server.url, auth=SECRETS["bob"]) as bob:
        [pending] = (await bob.call_tool("list_approvals", {})).structured_content["approvals"]
    assert kept is not None and kept["status"] == "awaiting_approval" and len(person.asked) == 1
    assert pending["task_id"] == kept["task_id"] and pending["justification"] == "over HTTP"


async def test_retention_deletes_a_finished_task_s_approval_with_it(tmp_path: Path) -> None:
    argv = build_argv(NMAP, ["-sT", "-p", "1", "--max-rate", "50000"], ["127.0.23.1"], ipv6=False, privileged=False)
    async with opened_stores(f"sqlite:///{tmp_path / 'tasks.db'}", max_queued=10) as stores:
        held = await stores.tasks.submit("alice", ScanKind.CUSTOM, "127.0.23.1", argv, 60, engagement="lab",
                                         approval=ApprovalRequest("lab", ["a reason"], 60))
        await stores.approvals.decide(held.record.id, "bob", "denied", "no")
        assert await stores.approvals.of_task(held.record.id) is not None
        assert await stores.tasks.purge(time.time() + 1) == 1
        assert await stores.approvals.of_task(held.record.id) is None


async def test_a_new_request_wakes_the_expiry_loop_of_its_own_and_of_other_processes(
    database_url: str, tmp_path: Path
) -> None:
    """Each process's expiry loop sleeps until the next pending approval is due, a minute when
    none is (it polled every 5 s): a request, made in its process or in another, wakes it."""
    argv = build_argv(NMAP, ["-sT", "-p", "1", "--max-rate", "50000"], ["127.0.23.1"], ipv6=False, privileged=False)
    auditor = Auditor(AuditLog(tmp_path / "audit.jsonl"), on_verdict=lambda _tool, _verdict: None)
    async with opened_stores(database_url, max_queued=10) as here, opened_stores(database_url, max_queued=10) as there:
        with statements_run(here) as seen:
            expiry = asyncio.create_task(expire_forever(here.approvals, auditor))
            try:
                assert await wait_for(lambda: any("approvals.expires_at" in sql for sql, _ in seen))
                for stores in (here, there):
                    asked = time.monotonic()
                    held = await stores.tasks.submit("alice", ScanKind.CUSTOM, "127.0.23.1", argv, 60,
                                                     engagement="lab", approval=ApprovalRequest("lab", ["why"], 1))
                    record = await stores.tasks.wait(held.record.id, "alice", timeout_s=EXPIRY_RECHECK_SECONDS / 4)
                    assert record.status is TaskStatus.DENIED, record
                    assert time.monotonic() - asked < EXPIRY_RECHECK_SECONDS / 4
            finally:
                expiry.cancel()
                await asyncio.gather(expiry, return_exceptions=True)
