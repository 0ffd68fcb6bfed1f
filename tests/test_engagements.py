"""Rules of engagement (engagements.py): windows in a named time zone, dates, scope and
exclusions, allowed scans, members; enforced through the scan tools and schedules of real
servers running real nmap on loopback."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import sys
import time
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest
from pydantic import ValidationError

from argv_check import ArgvCheck, TaskRefused
from config import ConfigError, Settings, load_settings
from engagements import (
    EngagementRefused,
    EngagementRules,
    ScopedTarget,
    check_kind,
    check_scope,
    check_time,
    opening,
    with_exclusions,
)
from models import ScanKind, TaskRecord, TaskStatus
from policy import Policy
from scanner import build_argv
from tests.conftest import OpenClient
from tests.nodes import opened_stores
from tests.support import (
    ALICE,
    SECRETS,
    LiveServer,
    answer_of,
    call,
    error_text,
    finished,
    poll_until_finished,
    raw_tool_call,
    write_config,
)

pytestmark = pytest.mark.anyio
BERLIN = ZoneInfo("Europe/Berlin")
NIGHTS = {"days": ["mon", "tue", "wed", "thu", "fri"], "start": "22:00", "end": "06:00"}
# Loopback addresses of this module's scans.
NET = "127.0.23.0/24"
NMAP = "/usr/bin/nmap"


def berlin(*args: int) -> float:
    return datetime(*args, tzinfo=BERLIN).timestamp()  # type: ignore[misc]


def nights(**more: Any) -> EngagementRules:
    return EngagementRules(scope=[NET], windows=[NIGHTS], timezone="Europe/Berlin", starts="2027-01-04",
                           ends="2027-01-29", **more)


def refusal(rules: EngagementRules, now: float) -> EngagementRefused:
    with pytest.raises(EngagementRefused) as refused:
        check_time("q1", rules, now)
    return refused.value


def test_a_window_that_runs_past_midnight_belongs_to_the_day_it_starts() -> None:
    rules = nights()
    monday_night, tuesday_morning = berlin(2027, 1, 4, 22, 0), berlin(2027, 1, 5, 5, 59)
    assert opening(rules, monday_night).open and opening(rules, tuesday_morning).open
    assert opening(rules, monday_night).closes_at == berlin(2027, 1, 5, 6, 0)
    # Friday's window runs into Saturday morning; Saturday's and Sunday's nights have none.
    assert opening(rules, berlin(2027, 1, 9, 5, 0)).open
    saturday = refusal(rules, berlin(2027, 1, 9, 12, 0))
    assert saturday.code == "outside_window" and saturday.opens_at == berlin(2027, 1, 11, 22, 0)
    assert str(saturday) == ("engagement 'q1' allows scans mon,tue,wed,thu,fri 22:00-06:00 (Europe/Berlin); the next "
                             "window opens 2027-01-11T22:00:00+01:00 (in 2 days 10 h)")


def test_windows_keep_their_local_hours_across_daylight_saving() -> None:
    rules = EngagementRules(scope=[NET], windows=[{"start": "09:00", "end": "17:00"}], timezone="Europe/Berlin")
    winter, summer = opening(rules, berlin(2027, 3, 20, 20, 0)), opening(rules, berlin(2027, 3, 28, 20, 0))
    assert datetime.fromtimestamp(winter.opens_at or 0, UTC).hour == 8   # 09:00 CET, the next morning
    assert datetime.fromtimestamp(summer.opens_at or 0, UTC).hour == 7   # 09:00 CEST


def test_dates_bound_the_windows_in_the_engagement_s_zone() -> None:
    rules = nights()
    early = refusal(rules, berlin(2027, 1, 1, 23, 0))
    assert early.code == "engagement_not_started" and early.opens_at == berlin(2027, 1, 4, 22, 0)
    # `ends` is a date: its whole day counts, so Friday the 29th's night runs to its end only.
    assert opening(rules, berlin(2027, 1, 29, 23, 59)).closes_at == berlin(2027, 1, 30, 0, 0)
    ended = refusal(rules, berlin(2027, 1, 30, 0, 0))
    assert ended.code == "engagement_ended" and ended.opens_at is None
    assert "ended at 2027-01-30T00:00:00+01:00" in str(ended)


def test_rules_that_cannot_mean_anything_are_refused_when_written() -> None:
    bad = [
        {"scope": []},
        {"scope": ["10.0.0.1/24"]},
        {"scope": ["host name"]},
        {"scope": [NET], "timezone": "Mars/Olympus"},
        {"scope": [NET], "starts": "2027-02-01", "ends": "2027-01-01"},
        {"scope": [NET], "ends": "2027-02-01T10:00:00"},
        {"scope": [NET], "windows": [{"start": "10:00", "end": "10:00"}]},
        {"scope": [NET], "exclude": ["gateway.example"]},
        {"scope": [NET], "kinds": ["ping"]},
    ]
    for rules in bad:
        with pytest.raises(ValidationError):
            EngagementRules.model_validate(rules)


def test_config_engagements_are_checked_at_load(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.json", engagements={"Q1 Test": {"scope": [NET]}})
    with pytest.raises(ConfigError, match="engagement name 'Q1 Test' may hold only"):
        load_settings(config)
    config = write_config(tmp_path / "config.json", engagements={"q1": {"scope": [NET], "timezone": "Nowhere"}})
    with pytest.raises(ConfigError, match=r"'engagements.q1.timezone': .*not an IANA time zone"):
        load_settings(config)


def target(text: str, name: str | None = None) -> ScopedTarget:
    return ScopedTarget(text, name, (ipaddress.ip_network(text),))


def test_scope_by_network_or_by_the_name_a_target_was_given_as() -> None:
    rules = EngagementRules(scope=[NET, "*.corp.example", "db.example"], exclude=["127.0.23.1", "127.0.23.64/26"])
    assert check_scope("q1", rules, [target("127.0.23.8/29"), target("10.9.9.9/32", "web.corp.example"),
                                     target("10.9.9.8/32", "db.example")]) == []
    for outside in ([target("127.0.24.1/32")], [target("127.0.22.0/23")], [target("10.9.9.9/32", "corp.example")]):
        with pytest.raises(EngagementRefused) as refused:
            check_scope("q1", rules, outside)
        assert refused.value.code == "outside_scope"
    with pytest.raises(EngagementRefused, match=r"'127.0.23.70/32' is excluded from .* \(127.0.23.64/26\)"):
        check_scope("q1", rules, [target("127.0.23.70/32")])
    cutting = check_scope("q1", rules, [target("127.0.23.0/24")])
    assert [str(n) for n in cutting] == ["127.0.23.1/32", "127.0.23.64/26"]
    assert with_exclusions(["-sT", "--script=(banner) and (safe)"], cutting) == [
        "-sT", "--exclude", "127.0.23.1/32,127.0.23.64/26", "--script=(banner) and (safe)"]
    assert with_exclusions(["-sT", "--exclude", "127.0.23.9"], cutting[:1]) == [
        "-sT", "--exclude", "127.0.23.9,127.0.23.1/32"]


def test_kinds_options_and_script_categories() -> None:
    rules = EngagementRules(scope=[NET], kinds=["quick", "custom"], options=["-p", "-Pn"], script_categories=["safe"])
    check_kind("q1", rules, ScanKind.QUICK, ["-sT", "-T4", "--top-ports", "100"])
    with pytest.raises(EngagementRefused, match="allows only quick, custom scans, not full"):
        check_kind("q1", rules, ScanKind.FULL, [])
    check_kind("q1", rules, ScanKind.CUSTOM, ["-sT", "-p", "22", "-Pn", "--host-timeout", "900s",
                                              "--script=(safe) and (default or safe) and not (brute)"])
    with pytest.raises(EngagementRefused, match=r"does not allow -T4, -sV; it allows -p, -Pn"):
        check_kind("q1", rules, ScanKind.CUSTOM, ["-sT", "-sV", "-T4", "-p", "22"])
    with pytest.raises(EngagementRefused, match="allows scripts of the categories safe only, not default"):
        check_kind("q1", rules, ScanKind.CUSTOM, ["-sT", "--script=(default or safe) and (default or safe)"])


def utc_window(start: datetime, end: datetime) -> dict[str, Any]:
    return {"days": [("mon", "tue", "wed", "thu", "fri", "sat", "sun")[start.weekday()]],
            "start": start.strftime("%H:%M:%S"), "end": end.strftime("%H:%M:%S")}


def engagement_config(**engagements: dict[str, Any]) -> dict[str, Any]:
    tokens = {"alice": {"secret": SECRETS["alice"], "engagement": "lab"},
              "bob": {"secret": SECRETS["bob"], "manage_engagements": True}}
    return {"tokens": tokens, "engagements": engagements}


async def test_scans_run_under_an_engagement_within_its_scope(in_memory: OpenClient) -> None:
    lab = {"scope": [NET], "exclude": ["127.0.23.2"], "tokens": ["alice"]}
    async with in_memory(**engagement_config(lab=lab)) as alice:
        answer = await answer_of(alice, "custom_scan", command="-n -Pn -p 1 127.0.23.0/30", timeout=60)
        done = await finished(alice, answer["task_id"])
        assert done["status"] == "completed" and done["engagement"] == "lab"
        # The exclusion cut into the range: nmap was told to skip it, and did.
        assert sorted(h["address"] for h in done["result"]["hosts"]) == ["127.0.23.0", "127.0.23.1", "127.0.23.3"]
        outside = await call(alice, "quick_scan", {"target": "127.0.0.1"})
        assert error_text(outside) == ("outside_scope: '127.0.0.1' is outside the scope of engagement 'lab' "
                                       f"({NET})")
        excluded = await call(alice, "quick_scan", {"target": "127.0.23.2"})
        assert error_text(excluded).startswith("excluded: '127.0.23.2' is excluded from engagement 'lab'")


async def test_who_may_scan_under_it_and_what_they_may_see(in_memory: OpenClient) -> None:
    config = engagement_config(lab={"scope": [NET], "tokens": ["alice"]}, other={"scope": ["127.0.24.0/24"]})
    config["require_engagement"] = True
    config["tokens"]["carol"] = {"secret": "carol-secret-" + "c" * 24}
    async with in_memory(**config) as alice, in_memory("bob", **config) as bob, \
            in_memory("carol", **config) as carol:
        assert [e["name"] for e in (await answer_of(alice, "list_engagements"))["engagements"]] == ["lab"]
        assert [e["name"] for e in (await answer_of(bob, "list_engagements"))["engagements"]] == ["lab", "other"]
        hidden = await call(alice, "get_engagement", {"name": "other"})
        assert error_text(hidden).startswith("not_found: there is no engagement 'other'")
        # alice is held to her default engagement; carol has none and names none, which this server requires.
        refused = await call(carol, "quick_scan", {"target": "127.0.23.1"})
        assert error_text(refused).startswith("engagement_required: every scan on this server runs under an engagement")
        not_member = await call(carol, "quick_scan", {"target": "127.0.23.1", "engagement": "lab"})
        assert error_text(not_member).startswith("not_a_member: this caller may not scan under engagement 'lab'")
        missing = await call(alice, "quick_scan", {"target": "127.0.23.1", "engagement": "nope"})
        assert error_text(missing).startswith("not_found: there is no engagement 'nope'")
        # Only a grant with manage_engagements sees and calls create_engagement.
        assert "create_engagement" not in {tool.name for tool in await alice.list_tools()}
        forbidden = await call(alice, "create_engagement", {"name": "mine", "rules": {"scope": ["0.0.0.0/0"]}})
        assert error_text(forbidden) == "forbidden: this token may not use create_engagement"
        made = await answer_of(bob, "create_engagement", name="night", rules={
            "scope": [NET], "tokens": ["carol"], "kinds": ["quick"], "windows": [NIGHTS], "timezone": "Europe/Berlin"})
        assert made["owner"] == "bob" and made["kinds"] == ["quick"]
        assert made["windows"] == ["mon,tue,wed,thu,fri 22:00-06:00"]
        again = await call(bob, "create_engagement", {"name": "night", "rules": {"scope": [NET]}})
        assert error_text(again).startswith("already_exists: an engagement named 'night' exists already")
        assert (await answer_of(carol, "get_engagement", name="night"))["scope"] == [NET]


async def test_a_scan_outside_the_window_or_dates_is_refused_saying_when(in_memory: OpenClient) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    # A window of tomorrow's weekday only (and never today's), in UTC.
    tomorrow = now + timedelta(days=1)
    later = {"scope": [NET], "tokens": ["alice"], "windows": [utc_window(tomorrow.replace(hour=1, minute=0, second=0),
                                                                         tomorrow.replace(hour=2, minute=0, second=0))]}
    over = {"scope": [NET], "tokens": ["alice"], "ends": (date.today() - timedelta(days=2)).isoformat()}
    async with in_memory(**engagement_config(lab=later, over=over)) as alice:
        refused = await call(alice, "quick_scan", {"target": "127.0.23.1"})
        opens = tomorrow.replace(hour=1, minute=0, second=0).isoformat()
        assert error_text(refused).startswith("outside_window: engagement 'lab' allows scans ")
        assert f"the next window opens {opens}" in error_text(refused)
        shown = await answer_of(alice, "get_engagement", name="lab")
        assert shown["open_now"] is False and shown["closed_because"] == "outside_window"
        assert shown["opens_at"] == opens
        ended = await call(alice, "quick_scan", {"target": "127.0.23.1", "engagement": "over"})
        assert error_text(ended).startswith("engagement_ended: engagement 'over' ended at ")
        assert (await answer_of(alice, "list_tasks"))["tasks"] == []


@pytest.mark.slow("the window closes 6 s after the scan starts")
async def test_a_scan_is_stopped_when_its_window_closes(in_memory: OpenClient, nmap_wrapper: Any) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    closing = {"scope": [NET], "tokens": ["alice"], "windows": [utc_window(now - timedelta(seconds=30),
                                                                           now + timedelta(seconds=6))]}
    nmap_wrapper.set_delay(60)
    async with in_memory(**engagement_config(lab=closing)) as alice:
        answer = await answer_of(alice, "quick_scan", target="127.0.23.1", timeout=5)
        done = await finished(alice, answer["task_id"], timeout=40)
    # Stopped at the window's close (the wrapper would have held nmap for 60 s): the margin is
    # for recording the verdict on a busy machine.
    assert done["status"] == "failed" and "time limit" in done["error"], done
    assert done["finished_at"] <= (now + timedelta(seconds=30)).timestamp()


async def test_a_schedule_s_run_waits_for_its_engagement_s_window(in_memory: OpenClient) -> None:
    tomorrow = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    start = tomorrow.replace(hour=3, minute=0, second=0)
    later = {"scope": [NET], "tokens": ["alice"], "windows": [utc_window(start, start + timedelta(hours=1))]}
    async with in_memory(**engagement_config(lab=later)) as alice:
        made = await answer_of(alice, "schedule_scan", kind="quick", target="127.0.23.1", every="1h")
        assert made["next_run_at"] <= time.time()
        listed = None
        for _ in range(200):
            listed = (await answer_of(alice, "list_schedules"))["schedules"][0]
            if listed["next_run_at"] == start.timestamp():
                break
            await anyio.sleep(0.05)
        assert listed is not None and listed["next_run_at"] == start.timestamp(), listed
        assert listed["engagement"] == "lab"
        assert listed.get("last_run") is None and (await answer_of(alice, "list_tasks"))["tasks"] == []


def test_an_engagement_in_the_config_is_json_the_operator_can_write(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.json", engagements={"q1": {
        "scope": ["10.20.0.0/16", "*.corp.example"], "exclude": ["10.20.0.1"], "windows": [NIGHTS],
        "timezone": "Europe/Berlin", "starts": "2027-01-04", "ends": "2027-03-31", "tokens": ["ci"],
        "roles": ["pentesters"]}})
    rules = load_settings(config).engagements["q1"]
    assert rules.first_moment() == berlin(2027, 1, 4, 0, 0) and rules.last_moment() == berlin(2027, 4, 1, 0, 0)
    assert json.loads(rules.model_dump_json())["windows"][0]["start"] == "22:00:00"


# libfaketime (Debian's faketime, which test.sh installs): the process it is preloaded into
# reads the clock the test sets. Its directory names the machine's architecture.
FAKETIME_LIBRARY = next(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"), Path("libfaketime.so.1"))


@pytest.mark.server
@pytest.mark.slow("the server's clock starts 45 s before the window opens, and runs at its real pace")
async def test_a_scan_outside_the_window_is_refused_then_runs_when_it_opens(tmp_path: Path, nmap_wrapper: Any) -> None:
    """A real server whose clock (libfaketime) reads Monday 4 January 2027, 21:59:15 in Berlin,
    45 s before the engagement's first window (room for a slow start on a busy machine): a scan
    is refused naming 22:00 as the next window's start; a schedule made now waits; once the
    server's clock passes 22:00 the same call runs, and so does the schedule's first run, both
    created after the window opened."""
    opens = berlin(2027, 1, 4, 22, 0)
    fake_start = datetime.fromtimestamp(opens - 45, UTC).strftime("%Y-%m-%d %H:%M:%S")
    config = write_config(tmp_path / "config.json", nmap_path=str(nmap_wrapper.path), engagements={
        "q1": nights(tokens=["alice"]).model_dump(mode="json", exclude_defaults=True)},
        tokens={"alice": {"secret": ALICE, "engagement": "q1"}})
    server = LiveServer(config, tmp_path / "server.log", json.loads(config.read_text())["port"], program=(
        "env", "TZ=UTC", f"LD_PRELOAD={FAKETIME_LIBRARY}", f"FAKETIME=@{fake_start}",
        sys.executable, str(Path(__file__).parents[1] / "server.py")))
    server.start()
    try:
        scan = {"target": "127.0.23.1", "timeout": 30}
        refused = await raw_tool_call(server.url, ALICE, "quick_scan", scan)
        assert refused["isError"], refused
        assert refused["content"][0]["text"].startswith("outside_window: engagement 'q1' allows scans mon,tue,wed,"
                                                        "thu,fri 22:00-06:00 (Europe/Berlin); the next window opens "
                                                        "2027-01-04T22:00:00+01:00 (in ")
        made = await raw_tool_call(server.url, ALICE, "schedule_scan", {"kind": "quick", "target": "127.0.23.2",
                                                                         "every": "1d"})
        assert not made["isError"], made
        deadline = time.monotonic() + 90
        while (ran := await raw_tool_call(server.url, ALICE, "quick_scan", scan))["isError"]:
            assert ran["content"][0]["text"].startswith("outside_window: "), ran
            assert time.monotonic() < deadline, "the window never opened"
            await anyio.sleep(0.5)
        task = await poll_until_finished(server.url, ALICE, ran["structuredContent"]["task_id"])
        assert task["status"] == "completed" and task["engagement"] == "q1" and task["created_at"] >= opens
        run = None
        while run is None or run.get("task_id") is None:
            assert time.monotonic() < deadline, "the schedule's run never came"
            await anyio.sleep(0.5)
            schedules = await raw_tool_call(server.url, ALICE, "list_schedules", {})
            run = schedules["structuredContent"]["schedules"][0].get("last_run")
        first = await poll_until_finished(server.url, ALICE, run["task_id"])
        assert first["target"] == "127.0.23.2" and first["created_at"] >= opens and run["due_at"] == opens
    finally:
        server.stop()


def stored_task(options: list[str], target: str, engagement: str | None, owner: str = "alice") -> TaskRecord:
    """A task as a row of the shared database may hold it, written by anyone."""
    return TaskRecord(id="t", owner=owner, kind=ScanKind.CUSTOM, target=target, engagement=engagement,
                      argv=build_argv(NMAP, options, [target], ipv6=False, privileged=False),
                      status=TaskStatus.RUNNING, time_limit=60, created_at=time.time(), started_at=None,
                      finished_at=None, error=None)


async def test_a_worker_reads_the_engagement_again_before_nmap_starts(tmp_path: Path) -> None:
    """The database is no trust boundary: a row that names an engagement is checked against
    that engagement's rules as they stand when its worker claims it, and a server that
    requires engagements runs no row without one."""
    now = datetime.now(UTC).replace(microsecond=0)
    rules = {"lab": EngagementRules(scope=[NET], exclude=["127.0.23.2"], tokens=["alice"]),
             "shut": EngagementRules(scope=[NET], tokens=["alice"], windows=[
                 utc_window(now + timedelta(hours=2), now + timedelta(hours=3))])}
    settings = Settings(tokens={"alice": {"secret": SECRETS["alice"]}}, allow_loopback=True, require_engagement=True)
    async with opened_stores(f"sqlite:///{tmp_path / 'tasks.db'}", max_queued=10) as stores:
        await stores.engagements.load_config(rules)
        check = ArgvCheck.of_worker(NMAP, Policy(settings, NMAP), privileged=False, pool="default",
                                    engagements=stores.engagements)
        scan = ["-sT", "-p", "1", "--max-rate", "50000"]
        fine = stored_task([*scan, "--exclude", "127.0.23.2/32"], "127.0.23.0/30", "lab")
        assert await check.argv_to_run(fine) == fine.argv
        refusals = {
            "its argv does not exclude 127.0.23.2/32, which its engagement excludes":
                stored_task(scan, "127.0.23.0/30", "lab"),
            "its engagement refuses it: '127.0.0.1' is outside the scope of engagement 'lab'":
                stored_task(scan, "127.0.0.1", "lab"),
            "its engagement refuses it: this caller may not scan under engagement 'lab'":
                stored_task(scan, "127.0.23.1", "lab", owner="bob"),
            "its engagement refuses it: engagement 'shut' allows scans":
                stored_task(scan, "127.0.23.1", "shut"),
            "it names no engagement, and every scan here runs under one": stored_task(scan, "127.0.23.1", None),
        }
        for reason, record in refusals.items():
            with pytest.raises(TaskRefused) as refused:
                await check.argv_to_run(record)
            assert str(refused.value).startswith(reason), (reason, str(refused.value))


async def test_an_engagement_s_probe_budget_counts_every_member_s_scans(in_memory: OpenClient) -> None:
    lab = {"scope": [NET], "tokens": ["alice", "bob"], "probes_per_day": 100}
    config = engagement_config(lab=lab)
    config["tokens"]["bob"]["engagement"] = "lab"
    async with in_memory(**config) as alice, in_memory("bob", **config) as bob:
        first = await answer_of(alice, "custom_scan", command="-Pn -p 1-60 127.0.23.1", timeout=30)
        assert first["status"] == "completed"
        over = await call(bob, "custom_scan", {"command": "-Pn -p 1-60 127.0.23.2"})
        assert re.fullmatch(r"rate_limited: 100 probes per day for engagement 'lab' \(this scan sends 60\); "
                            r"retry in \d+ s", error_text(over)), error_text(over)
        whole = await call(bob, "custom_scan", {"command": "-Pn -p 1-101 127.0.23.2"})
        assert error_text(whole) == ("rate_limited: this scan sends 101 probes (addresses x ports), more than the 100 "
                                     "probes per day of engagement 'lab'; scan fewer addresses or ports")
        assert not (await call(bob, "custom_scan", {"command": "-Pn -p 1-40 127.0.23.2"})).is_error
        plan = await answer_of(bob, "plan_scan", tool="custom_scan", arguments={"command": "-Pn -p 1 127.0.23.3"})
        assert plan["verdict"] == "refused" and plan["code"] == "rate_limited"


async def test_a_task_that_waited_in_the_queue_gets_what_is_left_of_its_window(tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    closing = EngagementRules(scope=[NET], tokens=["alice"], windows=[
        utc_window(now - timedelta(minutes=5), now + timedelta(seconds=40))])
    settings = Settings(tokens={"alice": {"secret": SECRETS["alice"]}}, allow_loopback=True)
    async with opened_stores(f"sqlite:///{tmp_path / 'tasks.db'}", max_queued=10) as stores:
        await stores.engagements.load_config({"lab": closing, "open": EngagementRules(scope=[NET])})
        check = ArgvCheck.of_worker(NMAP, Policy(settings, NMAP), privileged=False, pool="default",
                                    engagements=stores.engagements)
        queued = stored_task(["-sT", "-p", "1", "--max-rate", "50000"], "127.0.23.1", "lab")
        assert 30 <= await check.time_limit(queued) <= 40 < queued.time_limit
        assert await check.time_limit(replace(queued, engagement="open")) == queued.time_limit
        assert await check.time_limit(replace(queued, engagement=None)) == queued.time_limit


def test_the_engagement_docs_examples_load_as_they_are_written(tmp_path: Path) -> None:
    """docs/engagements.md's config example and approval rules are what a team copies."""
    text = (Path(__file__).parents[1] / "docs" / "engagements.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", text, re.S)
    example = json.loads("{" + blocks[0].strip().strip("{}") + "}")
    for name, token in example["tokens"].items():
        token["secret_sha256"] = hashlib.sha256(name.encode()).hexdigest()
    example["engagements"]["q1-internal"]["approval"] = json.loads("{" + blocks[1].strip() + "}")["approval"]
    settings = load_settings(write_config(tmp_path / "config.json", **example))
    rules = settings.engagements["q1-internal"]
    assert rules.approval is not None and rules.approval.addresses_over == 256 and rules.windows
    assert settings.require_engagement and settings.tokens["deepsoc"].engagement == "q1-internal"
