"""Schedules: scans run again and again, their changes diffed and sent to a signed webhook.

The parsing of `every` is pure. The rest runs real processes' parts (server.Runtime: stores,
worker, scan service, scheduler) on real SQLite and PostgreSQL, with real nmap scanning
loopback and webhook receivers the tests run on 127.41.0.0/16 (tests/receivers.py; the webhook
rules and the sender have tests of their own in test_webhooks.py); the exactly-once test runs
two `server.py` processes on one PostgreSQL database.

Scans target a random address of 127.0.0.0/8 rather than 127.0.0.1: on this shared machine
other tests open ports on 127.0.0.1 at any moment, which a quick scan would report as changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import random
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastmcp import Client
from sqlalchemy import Row, event, insert, select

from config import Settings
from db import create_db_engine
from models import ScanDiff, ScanKind, leases, schedule_runs, tasks
from schedule_store import ScheduleNotFound, TooManySchedules
from schedules import ScheduleError, parse_every
from server import Role, Runtime, create_server
from tests.conftest import OpenClient
from tests.nodes import opened_stores
from tests.receivers import STREAM, NameTable, WebhookReceiver, receiver_address
from tests.support import (
    ALICE,
    OWN_USER,
    SECRETS,
    START_UP_SECONDS,
    Listeners,
    NmapWrapper,
    ServiceProcess,
    answer_of,
    call,
    call_tool,
    error_text,
    free_port,
    postgres_socket_url,
    raw_tool_call,
    scratch_database,
    server_argv,
    top_ports,
    wait_until,
    write_config,
)
from webhooks import DELIVERY_HEADER, RESPONSE_BYTES, SIGNATURE_HEADER

pytestmark = pytest.mark.anyio
INTERVAL = 2
# A webhook receiver's name, resolved by the test's own NameTable (tests/receivers.py).
NAME = "hooks.test"
StartRuntime = Callable[..., Awaitable[Runtime]]


def loopback_address() -> str:
    return f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(1, 254)}"


def open_top_port(listeners: Listeners, address: str) -> int:
    """Listen on one of nmap's top 100 ports (1024-32767) on `address`: a quick scan finds it."""
    return next(p for p in top_ports(100) if 1024 <= p < 32768 and listeners.open(p, address))


# ---- pure: every ---------------------------------------------------------------------------


def test_every_takes_intervals_and_five_field_cron_expressions() -> None:
    assert [parse_every(text).seconds for text in ("90s", "15m", "1h", "1d")] == [90, 900, 3600, 86_400]
    assert parse_every(" */10  * * * * ").text == "*/10 * * * *" and parse_every("*/10 * * * *").seconds is None
    for text, why in [("90", "an interval"), ("1w", "an interval"), ("0s", "an interval"),
                      ("* * * * * *", "5 fields"), ("61 * * * *", "bad minute"), ("0 0 30 2 *", "bad day-of-month")]:
        with pytest.raises(ScheduleError, match=why):
            parse_every(text)


def test_next_runs_keep_the_grid_and_missed_ones_collapse_into_one() -> None:
    every = parse_every("90s")
    assert every.next_after(1000.0, 1000.0) == 1090.0
    # Down from 1100 to 2000: the next run is the first slot after now, not each missed one.
    assert every.next_after(1000.0, 2000.0) == 2080.0
    cron = parse_every("0 3 * * *")
    noon = datetime(2026, 12, 1, 12, 0, tzinfo=UTC).timestamp()
    assert cron.next_after(0.0, noon) == datetime(2026, 12, 2, 3, 0, tzinfo=UTC).timestamp()
    assert cron.shortest_gap(noon) == 86_400
    assert parse_every("*/5 * * * *").shortest_gap(noon) == 300
    assert parse_every("0,1 */6 * * *").shortest_gap(noon) == 60


# ---- a webhook receiver and the runtime parts of one process --------------------------------


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    started = WebhookReceiver(statuses={"/hooks/flaky": [500, 500, 200], "/hooks/moved": [302]})
    yield started
    started.stop()


def allowing(receiver: WebhookReceiver, prefix: str) -> dict[str, list[str]]:
    """The settings that let webhooks reach `receiver` under `prefix`: its loopback address must be listed."""
    return {"webhook_allowed_urls": [receiver.url(prefix)], "webhook_allowed_addresses": [receiver.host]}


def settings_for(database_url: str, nmap: NmapWrapper, tmp_path: Path, **overrides: object) -> Settings:
    """Loopback only (no other network is allowed at all), short leases and intervals."""
    values: dict[str, Any] = {
        "tokens": {name: {"secret": secret} for name, secret in SECRETS.items()}, "allow_loopback": True,
        "allowed_targets": [], "database_url": database_url, "nmap_path": str(nmap.path), "lease_seconds": 2,
        "min_schedule_seconds": 1, "audit_log": str(tmp_path / "audit.jsonl"), **OWN_USER,
    }
    return Settings(**values | overrides)


@pytest.fixture
async def start_runtime(
    database_url: str, nmap_wrapper: NmapWrapper, tmp_path: Path
) -> AsyncIterator[StartRuntime]:
    """Start the parts of one process of the service (like `server.py`, without HTTP)."""
    started: list[Runtime] = []

    async def start(**overrides: object) -> Runtime:
        runtime = Runtime(settings_for(database_url, nmap_wrapper, tmp_path, **overrides), str(nmap_wrapper.path),
                          Role.ALL)
        await runtime.start()
        started.append(runtime)
        return runtime

    yield start
    for runtime in started:
        await runtime.stop()


def runs(database_url: str, schedule_id: str) -> list[Row[Any]]:
    """The schedule's runs, by due time, read straight from the database."""
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(schedule_runs).where(schedule_runs.c.schedule_id == schedule_id)
                                     .order_by(schedule_runs.c.due_at)).all())
    finally:
        engine.dispose()


def settled(database_url: str, schedule_id: str) -> list[Row[Any]]:
    return [run for run in runs(database_url, schedule_id) if run.status in ("done", "failed")]


async def until(probe: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 30) -> Any:
    """Call `probe` (awaiting it when it is a coroutine) until `done` holds for its answer."""
    deadline = time.monotonic() + timeout
    while True:
        answer = probe()
        if asyncio.iscoroutine(answer):
            answer = await answer
        if done(answer):
            return answer
        assert time.monotonic() < deadline, f"still {answer!r} after {timeout} s"
        await asyncio.sleep(0.1)


def signed(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """How a receiver verifies a delivery (docs/schedules.md shows the same)."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers[SIGNATURE_HEADER])


# ---- behaviour on SQLite and PostgreSQL ----------------------------------------------------


@pytest.mark.slow("a schedule's runs, 2 s apart, until a change and after it")
async def test_a_quick_schedule_sends_a_port_opened_between_runs_to_its_webhook_and_nothing_else(
    start_runtime: StartRuntime, receiver: WebhookReceiver, listeners: Listeners, database_url: str,
    nmap_wrapper: NmapWrapper,
) -> None:
    runtime = await start_runtime(**allowing(receiver, "/hooks"))
    address = loopback_address()
    created = await runtime.schedules.create("alice", ScanKind.QUICK, address, None, f"{INTERVAL}s",
                                             receiver.url("/hooks/nmap?key=k1"))
    assert created.webhook_secret is not None and created.next_run_at <= time.time()
    schedule_id = created.schedule_id
    quiet = await until(lambda: settled(database_url, schedule_id), lambda done: len(done) >= 2)
    assert [run.status for run in quiet] == ["done", "done"] and all(run.diff is None for run in quiet)
    assert receiver.requests == [], "no change, nothing sent"
    assert (await runtime.schedules.list_schedules("alice")).schedules[0].last_change is None

    port = open_top_port(listeners, address)
    opened_at = time.time()
    [change] = await until(lambda: [r for r in settled(database_url, schedule_id) if r.diff],
                           lambda found: len(found) >= 1)
    assert change.due_at >= opened_at - INTERVAL
    [(headers, body)] = await until(lambda: receiver.posts("/hooks/nmap?key=k1"), lambda posts: len(posts) >= 1, 10)
    assert signed(created.webhook_secret, headers, body) and headers[DELIVERY_HEADER] == change.id
    sent = json.loads(body)
    assert (sent["schedule_id"], sent["task_id"], sent["target"]) == (schedule_id, change.task_id, address)
    assert sent["previous_task_id"] == change.previous_task_id and sent["previous_task_id"] is not None
    assert [(p["address"], p["port"], p["before"]) for p in sent["diff"]["ports_opened"]] == [(address, port, "")]
    assert sent["diff"]["ports_closed"] == [] == sent["diff"]["hosts_came_up"]
    # The receiver has the POST before the sender has its answer, and records it sent.
    await until(lambda: [run.webhook_status for run in runs(database_url, schedule_id) if run.id == change.id],
                lambda statuses: statuses == ["sent"])

    [info] = (await runtime.schedules.list_schedules("alice")).schedules
    assert info.target == address and info.every == "2s" and info.webhook == receiver.url("/hooks/nmap") + "?…"
    assert info.last_change is not None and info.last_change.webhook == "sent"
    assert [(p.port, p.after.split()[0]) for p in info.last_change.diff.ports_opened] == [(port, "open")]
    assert info.last_run is not None and info.last_run.task_id is not None and info.next_run_at > info.last_run.due_at
    assert info.last_run.status in ("queued", "running", "completed")
    await until(lambda: settled(database_url, schedule_id), lambda done: len(done) >= len(quiet) + 3)
    assert len(receiver.requests) == 1, "the runs after the change found none"

    assert (await runtime.schedules.list_schedules("bob")).schedules == []
    for owner, schedule in (("bob", schedule_id), ("alice", "00000000-0000-4000-8000-000000000000")):
        with pytest.raises(ScheduleNotFound, match="no schedule"):
            await runtime.schedules.delete(owner, schedule)
    await runtime.schedules.delete("alice", schedule_id)
    scanned = len(nmap_wrapper.pids())
    await asyncio.sleep(2 * INTERVAL + 1)
    assert len(nmap_wrapper.pids()) == scanned and runs(database_url, schedule_id) == []
    assert (await runtime.schedules.list_schedules("alice")).schedules == [] and len(receiver.requests) == 1
    tasks_of_alice = (await runtime.service.list_tasks("alice", None, 100)).tasks
    assert len(tasks_of_alice) == len(nmap_wrapper.pids()), "each run was one normal task of its owner, scanned once"
    audited = [json.loads(line) for line in Path(runtime.audit_log.path).read_text().splitlines()]
    queued = {entry["task_id"] for entry in audited if entry["tool"] == "schedule_run" and entry["event"] == "queued"}
    assert queued == {task.task_id for task in tasks_of_alice}, "every run's scan is in the audit log"
    assert all(entry["token"] == "alice" for entry in audited if entry["tool"] == "schedule_run")


@pytest.mark.slow("a webhook's retries, backing off")
async def test_webhooks_are_retried_with_backoff_never_follow_a_redirect_and_record_a_failure(
    start_runtime: StartRuntime, receiver: WebhookReceiver, listeners: Listeners, database_url: str,
) -> None:
    runtime = await start_runtime(**allowing(receiver, "/hooks/"))
    runtime.scheduler.backoff_seconds = 0.2
    address = loopback_address()
    # Two owners, so that the two schedules' scans of one host never update one inventory row at once.
    flaky, moved = [await runtime.schedules.create(owner, ScanKind.QUICK, address, None, f"{INTERVAL}s",
                                                   receiver.url(path))
                    for owner, path in (("alice", "/hooks/flaky"), ("bob", "/hooks/moved"))]
    for created in (flaky, moved):
        await until(lambda c=created: settled(database_url, c.schedule_id), lambda done: len(done) >= 1)
    open_top_port(listeners, address)

    async def webhook_states() -> list[str | None]:
        listing = [info for owner in ("alice", "bob")
                   for info in (await runtime.schedules.list_schedules(owner)).schedules]
        return [info.last_change.webhook if info.last_change else None for info in listing]

    assert await until(webhook_states, lambda states: states == ["sent", "failed"], 40) == ["sent", "failed"]
    [failed] = (await runtime.schedules.list_schedules("bob")).schedules
    assert failed.last_change is not None
    assert failed.last_change.webhook_error == "the receiver answered 302, a redirect (not followed) (after 4 attempts)"
    attempts = receiver.posts("/hooks/flaky")
    assert len(attempts) == 3 and len({body for _, body in attempts}) == 1, "every attempt sends the same body"
    assert len({headers[DELIVERY_HEADER] for headers, _ in attempts}) == 1
    assert flaky.webhook_secret is not None and all(signed(flaky.webhook_secret, h, b) for h, b in attempts)
    assert len(receiver.posts("/hooks/moved")) == 4 and receiver.posts("/elsewhere") == []


# ---- where each attempt goes: decided again when it is sent -----------------------------------


async def schedule_with_webhook(runtime: Runtime, url: str) -> tuple[str, str]:
    """A schedule of alice's with a webhook to `url`, stored as schedule_scan stores one (its
    first run an hour away): its id and its webhook secret."""
    now, schedule_id, secret = time.time(), str(uuid.uuid4()), secrets.token_urlsafe(32)
    await runtime.stores.schedules.create({
        "id": schedule_id, "owner": "alice", "kind": "quick", "spec": loopback_address(), "every": "1h",
        "created_at": now, "next_run_at": now + 3600, "webhook_url": url, "webhook_secret": secret}, None)
    return schedule_id, secret


def change_due(database_url: str, schedule_id: str) -> str:
    """A run of the schedule that found a change, due to be sent: the row settling a run leaves."""
    now, run_id = time.time(), str(uuid.uuid4())
    diff = ScanDiff(task_a="a", task_b="b", hosts_came_up=["127.41.0.1"], hosts_went_down=[], ports_opened=[],
                    ports_closed=[], services_changed=[], unchanged_open_ports=0)
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(schedule_runs).values(
                id=run_id, schedule_id=schedule_id, due_at=now, status="done", finished_at=now,
                diff=diff.model_dump_json(), webhook_status="pending", webhook_attempts=0, webhook_next_at=now))
    finally:
        engine.dispose()
    return run_id


async def delivery_of(database_url: str, schedule_id: str, run_id: str) -> Row[Any]:
    """The run once its webhook is no longer pending."""
    found = await until(lambda: [run for run in runs(database_url, schedule_id) if run.id == run_id],
                        lambda rows: rows[0].webhook_status != "pending", 20)
    return found[0]


async def test_an_allowed_name_pointed_at_another_address_after_the_schedule_was_saved_gets_nothing(
    start_runtime: StartRuntime, receiver: WebhookReceiver, database_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: the allowlist checked the name only, so the signed POST followed the name to
    wherever it pointed at send time. Now each attempt resolves the name once, checks every
    address, and connects to the checked one."""
    internal = WebhookReceiver()
    try:
        names = NameTable()
        names.point(NAME, receiver.host)
        runtime = await start_runtime(webhook_allowed_urls=[receiver.url("/hooks", NAME)],
                                      webhook_allowed_addresses=[receiver.host])
        runtime.scheduler.sender = replace(runtime.scheduler.sender, resolve=names.resolve)
        schedule_id, secret = await schedule_with_webhook(runtime, receiver.url("/hooks/nmap", NAME))
        sent = await delivery_of(database_url, schedule_id, change_due(database_url, schedule_id))
        assert (sent.webhook_status, sent.webhook_error) == ("sent", None) and len(receiver.posts("/hooks/nmap")) == 1

        names.point(NAME, internal.host)
        refused = await delivery_of(database_url, schedule_id, change_due(database_url, schedule_id))
        assert refused.webhook_status == "failed" and refused.webhook_attempts == 1, "refused, not retried"
        assert refused.webhook_error == (f"not sent: {NAME} resolves to {internal.host}, which is a loopback address "
                                         "not listed in webhook_allowed_addresses")
        assert internal.requests == [] and len(receiver.requests) == 1
        [info] = (await runtime.schedules.list_schedules("alice")).schedules
        assert info.last_change is not None and info.last_change.webhook == "failed"
        assert refused.webhook_error in caplog.text and secret not in caplog.text
    finally:
        internal.stop()


async def test_a_receiver_streaming_without_end_is_recorded_failed_not_sent(
    start_runtime: StartRuntime, receiver: WebhookReceiver, database_url: str,
) -> None:
    """Before: a 2xx answer was read whole, for as long as it streamed, and recorded sent."""
    runtime = await start_runtime(**allowing(receiver, "/hostile/"))
    runtime.scheduler.backoff_seconds = 0.05
    schedule_id, _ = await schedule_with_webhook(runtime, receiver.url(STREAM))
    failed = await delivery_of(database_url, schedule_id, change_due(database_url, schedule_id))
    assert failed.webhook_status == "failed" and failed.webhook_attempts == 4
    assert failed.webhook_error == f"the receiver's answer was longer than {RESPONSE_BYTES} bytes (after 4 attempts)"


@pytest.mark.server
async def test_the_one_time_webhook_secret_never_reaches_a_debug_log(
    tmp_path: Path, nmap_wrapper: NmapWrapper, receiver: WebhookReceiver,
) -> None:
    """Before: at DEBUG, sse_starlette logged every event it streamed, and so schedule_scan's
    answer with the webhook_secret in it (a client of the 2025-11-25 protocol gets it as SSE)."""
    host = receiver_address()
    config = write_config(tmp_path / "c.json", host=host, port=free_port(host), nmap_path=str(nmap_wrapper.path),
                          audit_log=str(tmp_path / "audit.jsonl"), **allowing(receiver, "/hooks"))
    process = ServiceProcess(server_argv(config), tmp_path / "server.log").start()
    try:
        assert wait_until(lambda: "listening on" in process.log_text(), START_UP_SECONDS), process.log_text()
        url = f"http://{host}:{json.loads(config.read_text())['port']}/mcp"
        arguments = {"kind": "quick", "target": loopback_address(), "every": "1h",
                     "webhook_url": receiver.url("/hooks/n?key=k9")}
        created = await raw_tool_call(url, ALICE, "schedule_scan", arguments)
        secret = created["structuredContent"]["webhook_secret"]
        assert len(secret) >= 43
    finally:
        process.stop()
    log = process.log_text()
    assert "DEBUG" in log and "POST /mcp" in log, "the log is the real, verbose one"
    assert secret not in log and "k9" not in log


@pytest.mark.slow("runs on a 2 s grid, before and after a gap")
async def test_a_run_missed_while_no_process_ran_is_run_once_then_the_grid_goes_on(
    start_runtime: StartRuntime, database_url: str, nmap_wrapper: NmapWrapper,
) -> None:
    first = await start_runtime()
    created = await first.schedules.create("alice", ScanKind.QUICK, loopback_address(), None, f"{INTERVAL}s", None)
    await until(lambda: settled(database_url, created.schedule_id), lambda done: len(done) >= 2)
    # Its scheduler stops first thing: nothing it fires after this moment is due after it, while
    # the rest of the stop (the worker's grace period) may take seconds on a busy machine.
    stopped_at = time.time()
    await first.stop()
    await asyncio.sleep(stopped_at + 3.5 * INTERVAL - time.time())
    restarted_at = time.time()
    second = await start_runtime()
    before = len(runs(database_url, created.schedule_id))
    done = await until(lambda: settled(database_url, created.schedule_id), lambda done: len(done) >= before + 2)
    due = [run.due_at for run in runs(database_url, created.schedule_id)]
    missed = [at for at in due if stopped_at <= at < restarted_at]
    assert len(missed) == 1, f"one run for the {3.5 * INTERVAL:.0f} s nothing ran, not one per slot: {due}"
    assert all(at >= restarted_at for at in due if at > missed[0]), due
    assert all(abs((at - created.next_run_at) / INTERVAL - round((at - created.next_run_at) / INTERVAL)) < 1e-6
               for at in due), "due times stay on the schedule's grid"
    assert all(run.status == "done" for run in done)
    assert len({run.task_id for run in done}) == len(done) and len(nmap_wrapper.pids()) >= len(done)
    assert (await second.schedules.list_schedules("alice")).schedules[0].last_run is not None


async def test_the_scheduler_lease_is_held_by_one_process_and_fences_its_runs(database_url: str) -> None:
    async with (opened_stores(database_url, max_queued=10) as first,
                opened_stores(database_url, max_queued=10) as second):
        one, two = first.schedules, second.schedules
        assert await one.hold_lease("scheduler", "one", "one", 1.0)
        assert not await two.hold_lease("scheduler", "two", "two", 1.0)
        assert await one.hold_lease("scheduler", "one", "one", 1.0), "the holder renews"
        await asyncio.sleep(1.1)
        assert await two.hold_lease("scheduler", "two", "two", 5.0), "an expired lease is taken over"
        now = time.time()
        await one.create({"id": "s1", "owner": "alice", "kind": "quick", "spec": "127.0.0.1", "every": "1h",
                                   "created_at": now, "next_run_at": now, "webhook_url": None, "webhook_secret": None},
                         None)
        [due] = (await two.work(time.time())).due
        assert await one.claim_run(due, now + 3600, "scheduler", "one") is None, "a lost lease fires nothing"
        assert await two.claim_run(due, now + 3600, "scheduler", "two") is not None
        assert await two.claim_run(due, now + 3600, "scheduler", "two") is None, "a due time fires once"
        assert (await one.work(time.time())).due == []


# ---- what the tools refuse at creation (in memory, over the MCP protocol) -------------------


async def test_a_schedule_is_refused_at_creation_as_its_scan_tool_would_refuse_it(
    nmap_wrapper: NmapWrapper, tmp_path: Path,
) -> None:
    allowed, unlisted = "http://127.41.0.9:9/hooks", "http://127.41.0.10:9/hooks"
    tokens = {"alice": {"secret": SECRETS["alice"], "tools": ["quick_scan", "schedule_scan", "list_schedules"]}}
    settings = settings_for(f"sqlite:///{tmp_path / 'tasks.db'}", nmap_wrapper, tmp_path, tokens=tokens,
                            stdio_caller="alice", min_schedule_seconds=120, denied_targets=["127.0.0.9/32"],
                            webhook_allowed_urls=[allowed, unlisted], webhook_allowed_addresses=["127.41.0.9"])
    mcp, _runtime = create_server(settings, str(nmap_wrapper.path), role=Role.STDIO)
    refusals = [
        ({"kind": "quick", "target": "127.0.0.1/33"}, "invalid_target: "),
        ({"kind": "quick", "target": "127.0.0.9"},
         "invalid_target: '127.0.0.9' reaches 127.0.0.9/32, which this server's policy denies"),
        ({"kind": "full", "target": "127.0.0.1"}, "forbidden: this token may not use full_scan"),
        ({"kind": "custom", "command": "-p 80 127.0.0.1"}, "forbidden: this token may not use custom_scan"),
        ({"kind": "quick"}, "invalid_schedule: a quick schedule takes `target`"),
        ({"kind": "quick", "target": "127.0.0.1", "every": "90s"},
         "invalid_schedule: 'every' '90s' runs 90 s apart; this server runs a schedule at most every 120 s"),
        ({"kind": "quick", "target": "127.0.0.1", "every": "0,1 */6 * * *"},
         "invalid_schedule: 'every' '0,1 */6 * * *' runs 60 s apart"),
        ({"kind": "quick", "target": "127.0.0.1", "every": "every hour"}, "invalid_schedule: 'every' must be"),
        *(({"kind": "quick", "target": "127.0.0.1", "webhook_url": url}, "invalid_webhook: ") for url in (
            allowed + "evil", "http://127.41.0.9:10/hooks", "http://127.41.0.9:9.evil.com/hooks",
            "https://127.41.0.9:9/hooks")),
        *(({"kind": "quick", "target": "127.0.0.1", "webhook_url": allowed + path},
           f"invalid_webhook: a webhook URL's path may not hold {why}") for path, why in (
            ("/../admin", "'.' or '..' segments"), ("/..;/admin", "';' parameters (such as '..;')"),
            ("/%252e%252e/admin", "percent-encoded characters (such as %2e or %252e)"))),
        ({"kind": "quick", "target": "127.0.0.1", "webhook_url": unlisted + "/nmap"},
         "invalid_webhook: 127.41.0.10 is a loopback address not listed in webhook_allowed_addresses"),
    ]
    async with Client(mcp) as client:
        for arguments, refusal in refusals:
            result = await client.call_tool("schedule_scan", {"every": "1h"} | arguments, raise_on_error=False)
            assert result.is_error and result.content[0].text.startswith(refusal), (arguments, result.content)
        accepted = await client.call_tool("schedule_scan", {"kind": "quick", "target": "127.0.0.1",
                                                            "every": "*/5 * * * *", "webhook_url": allowed + "/nmap"})
        listing = await client.call_tool("list_schedules", {})
    created = accepted.structured_content
    assert created["next_run_at"] > time.time() and len(created["webhook_secret"]) >= 43
    [only] = listing.structured_content["schedules"]
    assert only["schedule_id"] == created["schedule_id"] and only["every"] == "*/5 * * * *" and only["last_run"] is None
    assert "webhook_secret" not in json.dumps(listing.structured_content)
    assert nmap_wrapper.pids() == [], "nothing was scanned: the cron schedule's first run is minutes away"


async def test_a_token_has_at_most_its_limit_of_schedules_and_list_schedules_pages_them(
    in_memory: OpenClient,
) -> None:
    tokens = {"alice": {"secret": SECRETS["alice"]}, "bob": {"secret": SECRETS["bob"], "limits": {"schedules": 3}}}
    nightly = {"kind": "quick", "every": "0 3 * * *"}  # no run during the test
    async with in_memory("bob", tokens=tokens) as bob, in_memory("alice", tokens=tokens) as alice:
        created = [(await answer_of(bob, "schedule_scan", target=f"127.0.0.{n}", **nightly))["schedule_id"]
                   for n in range(1, 4)]
        refused = await call(bob, "schedule_scan", {"target": "127.0.0.4", **nightly})
        limits = {entry["name"]: entry for entry in (await answer_of(bob, "get_limits"))["limits"]}
        pages = [await answer_of(bob, "list_schedules", limit=2, offset=offset) for offset in (0, 2)]
        await answer_of(bob, "delete_schedule", schedule_id=created[0])
        assert not (await call(bob, "schedule_scan", {"target": "127.0.0.4", **nightly})).is_error
        alices = {entry["name"]: entry for entry in (await answer_of(alice, "get_limits"))["limits"]}
    assert error_text(refused) == (
        "rate_limited: token 'bob' may have 3 schedules and has 3 (the server's limits.schedules); delete one with "
        "delete_schedule (list_schedules shows them) before adding another")
    assert limits["schedules"] == {"name": "schedules", "limit": 3, "used": 3, "window": "schedules existing now"}
    assert (alices["schedules"]["limit"], alices["schedules"]["used"]) == (50, 0)
    assert [[s["schedule_id"] for s in page["schedules"]] for page in pages] == [created[:2], created[2:]]
    assert [page["page"]["next_offset"] for page in pages] == [2, None] and pages[0]["page"]["total"] == 3
    assert pages[0]["message"] == "3 schedules; pass offset 2 for the next ones."


async def test_the_schedule_limit_holds_for_creations_at_once_from_two_processes(database_url: str) -> None:
    async with (opened_stores(database_url, max_queued=10) as first,
                opened_stores(database_url, max_queued=10) as second):
        now = time.time()

        async def create(n: int) -> bool:
            store = (first, second)[n % 2].schedules
            try:
                await store.create({"id": f"s{n}", "owner": "alice", "kind": "quick", "spec": "127.0.0.1",
                                    "every": "1h", "created_at": now, "next_run_at": now + 3600, "webhook_url": None,
                                    "webhook_secret": None}, 3)
            except TooManySchedules:
                return False
            return True

        made = await asyncio.gather(*(create(n) for n in range(10)))
        assert sum(made) == 3 and await first.schedules.count("alice") == 3


# ---- exactly once across two processes on one PostgreSQL database ---------------------------


@pytest.mark.server
@pytest.mark.postgres
async def test_two_processes_on_one_postgresql_database_run_each_due_time_once_even_when_the_holder_dies(
    tmp_path: Path, nmap_wrapper: NmapWrapper,
) -> None:
    with scratch_database() as name:
        url = postgres_socket_url(name)
        processes = []
        try:
            for index in range(2):
                config = write_config(tmp_path / f"p{index}.json", database_url=url, nmap_path=str(nmap_wrapper.path),
                                      audit_log=str(tmp_path / f"p{index}.audit"), lease_seconds=2,
                                      min_schedule_seconds=1, allowed_targets=[], log_level="INFO",
                                      worker_name=f"p{index}")
                process = ServiceProcess(server_argv(config), tmp_path / f"p{index}.log").start()
                port = json.loads(config.read_text())["port"]
                processes.append((process, f"http://127.0.0.1:{port}/mcp"))
                assert wait_until(lambda p=process: "listening on" in p.log_text(), START_UP_SECONDS), \
                    process.log_text()
            result = await call_tool(processes[0][1], ALICE, "schedule_scan",
                                     {"kind": "quick", "target": loopback_address(), "every": f"{INTERVAL}s"})
            assert not result.is_error, error_text(result)
            schedule_id = result.structured_content["schedule_id"]
            await until(lambda: settled(url, schedule_id), lambda done: len(done) >= 4, 40)
            holder = await until(lambda: lease_holder(url), lambda held: held is not None)
            victim = next(p for p, _ in processes if f"pid {p.pid}" in holder)
            survivor, survivor_url = next((p, u) for p, u in processes if p is not victim)
            assert "now holds the scheduler lease" not in survivor.log_text(), "one holder at a time"
            victim.kill()
            killed_at = time.time()
            await until(lambda: [r for r in settled(url, schedule_id) if r.due_at > killed_at + 1],
                        lambda after: len(after) >= 3, 40)
            assert f"pid {survivor.pid}" in (lease_holder(url) or "")
            assert "now holds the scheduler lease" in survivor.log_text()
            listing = await call_tool(survivor_url, ALICE, "list_schedules", {})
            assert listing.structured_content["schedules"][0]["last_run"]["task_id"] is not None
        finally:
            for process, _ in processes:
                process.stop()
        every_run = runs(url, schedule_id)
        due = [run.due_at for run in every_run]
        gaps = [b - a for a, b in itertools.pairwise(due)]
        assert all(gap >= INTERVAL - 1e-6 and abs(gap / INTERVAL - round(gap / INTERVAL)) < 1e-6 for gap in gaps), due
        scanned = scheduled_tasks(url)
        linked = [run.task_id for run in every_run if run.task_id]
        assert sorted(linked) == sorted(scanned), "every run has one task, every task one run"
        started = [task_id for task_id, started_at in scanned.items() if started_at is not None]
        assert len(nmap_wrapper.pids()) == len(started), "each task's nmap started once, in one process"


def lease_holder(database_url: str) -> str | None:
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(leases.c.holder_name).where(leases.c.name == "scheduler")).scalar()
    finally:
        engine.dispose()


def scheduled_tasks(database_url: str) -> dict[str, float | None]:
    """Every task of alice's (all of them scheduled here): id -> when its nmap started."""
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            return dict(conn.execute(select(tasks.c.id, tasks.c.started_at).where(tasks.c.owner == "alice")).all())
    finally:
        engine.dispose()


@pytest.mark.slow("it watches an idle scheduler for 4 s")
async def test_an_idle_scheduler_reads_the_schedules_only_when_its_lease_wants_renewing(
    start_runtime: StartRuntime,
) -> None:
    """With no schedule and no run going, the lease holder's tick sleeps until the lease wants
    renewing (lease_seconds / 3), not one second: it read the schedule tables 5 times a second."""
    runtime = await start_runtime(lease_seconds=12)

    def holder() -> Any:
        with runtime.stores.db.engine.connect() as conn:
            return conn.execute(select(leases.c.holder).where(leases.c.name == "scheduler")).scalar()

    await until(holder, lambda held: held == runtime.scheduler.holder)
    reads: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "schedule_runs" in statement and statement.lstrip().upper().startswith("SELECT"):
            reads.append(statement)

    event.listen(runtime.stores.db.engine, "before_cursor_execute", count)
    try:
        await asyncio.sleep(4)
    finally:
        event.remove(runtime.stores.db.engine, "before_cursor_execute", count)
    # A tick reads them in 5 statements: at most two ticks (one may have been under way).
    assert len(reads) <= 10, f"{len(reads)} reads of the schedules in 4 s"
