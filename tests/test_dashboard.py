"""The operator page (/ui): its JSON API over real HTTP against a live server running real
scans of loopback, and the page itself in a real browser (Debian's chromium, headless,
driven through chromedriver by Selenium). Every scan targets 127.0.0.0/8."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from dashboard import CONTENT_SECURITY_POLICY
from tests.nodes import opened_stores
from tests.support import (
    ALICE,
    BOB,
    SECRETS,
    BannerServer,
    Listeners,
    LiveServer,
    StartServer,
    call_tool,
    free_port,
    post,
)

ARTIFACTS = Path(__file__).with_name("artifacts")
# About 10 s; the long one (about 30 s) is cancelled once the browser has seen it progress.
SLOW_SCAN = "-p 1-500 --scan-delay 20ms 127.0.0.2"
LONG_SCAN = "-p 1-1500 --scan-delay 20ms 127.0.0.2"
# What a hostile service can make nmap report as its product and version (nmap's
# OpenSSH-on-Debian match keeps whatever follows "Debian-" in the banner, up to 80 characters).
HOSTILE_VERSION = "OpenSSH 9.2p1 Debian 2<img src=x onerror=alert(1)><script>alert(2)</script>"


class HostileBanner(BannerServer):
    """An SSH banner carrying markup and a script, as an attacker's host would send it."""

    BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2<img src=x onerror=alert(1)><script>alert(2)</script>\r\n"


def start(live_server: StartServer, **overrides: object) -> LiveServer:
    """A server with alice as the page's admin and a worker name the tests can look for."""
    return live_server(ui_admin_tokens=["alice"], worker_name="dash-worker", **overrides)


def base(server: LiveServer) -> str:
    return f"http://127.0.0.1:{server.port}"


async def get(server: LiveServer, path: str, token: str | None = None, **params: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.get(base(server) + path, params=params, headers=headers)


async def overview(server: LiveServer, token: str) -> dict[str, Any]:
    """The overview's sections by name, with the viewer under 'viewer'."""
    answer = await get(server, "/ui/api/overview", token)
    assert answer.status_code == 200, answer.text
    document = answer.json()
    return {"viewer": document["viewer"], **{s["name"]: s["data"] for s in document["sections"]}}


async def scan(server: LiveServer, token: str, command: str, timeout: int = 60) -> dict[str, Any]:
    result = await call_tool(server.url, token, "custom_scan", {"command": command, "timeout": timeout})
    assert not result.is_error, result.content
    return result.structured_content


def test_the_page_and_its_files_carry_a_strict_policy_and_no_inline_code(live_server: StartServer) -> None:
    server = start(live_server)
    files = {"/ui": "text/html", "/ui/dashboard.js": "text/javascript", "/ui/dashboard.css": "text/css"}
    served = {}
    for path, media_type in files.items():
        answer = httpx.get(base(server) + path, timeout=10)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(media_type)
        assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert answer.headers["x-content-type-options"] == "nosniff"
        served[path] = answer.text
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY and "script-src 'self';" in CONTENT_SECURITY_POLICY
    html = served["/ui"]
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and all(" src=" in tag for tag in scripts), "no inline script"
    assert not re.search(r"<style\b| style=| on[a-z]+=", html), "no inline style or event handler"
    assert not re.search(r"<input[^>]* name=", html), "an input without a name is never submitted"
    script = served["/ui/dashboard.js"]
    for risky in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "cookie", "token="):
        assert risky not in script, f"dashboard.js must not use {risky}"


def test_the_api_refuses_a_missing_or_wrong_token_in_the_words_of_the_mcp_endpoint(live_server: StartServer) -> None:
    server = start(live_server)
    expected = {"missing": post(server), "wrong": post(server, Authorization="Bearer not-a-token")}
    some_id = str(uuid.uuid4())
    for path in ("/ui/api/overview", f"/ui/api/tasks/{some_id}", f"/ui/api/diff?a={some_id}&b={some_id}"):
        for case, headers in (("missing", {}), ("wrong", {"Authorization": "Bearer not-a-token"})):
            refused = httpx.get(base(server) + path, headers=headers, timeout=10)
            assert refused.status_code == 401, (path, case)
            assert refused.json() == expected[case].json()
            assert refused.headers["www-authenticate"] == expected[case].headers["www-authenticate"]
            assert refused.headers["x-content-type-options"] == "nosniff"


@pytest.mark.anyio
async def test_the_overview_shows_pools_workers_and_a_scan_with_the_port_it_found(
    live_server: StartServer, listeners: Listeners
) -> None:
    port = free_port()
    assert listeners.open(port)
    server = start(live_server)
    done = await scan(server, BOB, f"-p {port} 127.0.0.1")
    seen = await overview(server, BOB)
    assert seen["viewer"] == {"name": "bob", "admin": False}
    assert list(seen) == ["viewer", "pools", "running", "recent", "diff", "schedules", "inventory"]
    [pool] = seen["pools"]["pools"]
    assert pool["pool"] == "default" and pool["workers_alive"] == 1
    assert [(w["name"], w["alive"], w["capacity"]) for w in pool["workers"]] == [("dash-worker", True, 10)]
    [row] = seen["recent"]["tasks"]
    assert row["owner"] == "bob" and row["task"]["task_id"] == done["task_id"]
    assert (row["task"]["target"], row["task"]["status"], row["task"]["worker"]) == ("127.0.0.1", "completed",
                                                                                     "dash-worker")
    assert [r["task"]["task_id"] for r in seen["diff"]["tasks"]] == [done["task_id"]]
    assert seen["running"]["tasks"] == []

    detail = await get(server, f"/ui/api/tasks/{done['task_id']}", BOB)
    assert detail.status_code == 200 and detail.headers["cache-control"] == "no-store"
    [host] = detail.json()["task"]["result"]["hosts"]
    assert host["address"] == "127.0.0.1" and [(p["port"], p["state"]) for p in host["ports"]] == [(port, "open")]
    unknown = await get(server, f"/ui/api/tasks/{uuid.uuid4()}", BOB)
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
    assert (await get(server, "/ui/api/tasks/not-a-task-id", BOB)).json()["error"] == "invalid_argument"


@pytest.mark.anyio
async def test_the_schedules_and_the_inventory_search_show_each_tokens_own_unless_admin(
    live_server: StartServer, listeners: Listeners
) -> None:
    port = free_port()
    assert listeners.open(port)
    server = start(live_server)
    command = f"-p {port} 127.0.0.1"
    created = await call_tool(server.url, BOB, "schedule_scan", {"kind": "custom", "command": command, "every": "1h"})
    assert not created.is_error, created.content
    schedule_id = created.structured_content["schedule_id"]

    async def bobs_schedules() -> list[dict[str, Any]]:
        return (await overview(server, BOB))["schedules"]["schedules"]

    deadline = asyncio.get_running_loop().time() + 30
    rows = await bobs_schedules()
    while (rows[0]["schedule"]["last_run"] or {}).get("status") != "completed":
        assert asyncio.get_running_loop().time() < deadline, rows
        await asyncio.sleep(0.3)
        rows = await bobs_schedules()
    [row] = rows
    assert row["owner"] == "bob" and row["schedule"]["schedule_id"] == schedule_id
    assert (row["schedule"]["command"], row["schedule"]["every"], row["schedule"]["last_change"]) == (
        command, "1h", None)
    as_admin = await overview(server, ALICE)
    admin_rows = as_admin["schedules"]["schedules"]
    assert [(r["owner"], r["schedule"]["schedule_id"]) for r in admin_rows] == [("bob", schedule_id)]
    assert as_admin["inventory"] == {"owners": ["alice", "bob"]}
    assert (await overview(server, BOB))["inventory"] == {"owners": ["bob"]}

    found = await get(server, "/ui/api/hosts", BOB, port=str(port))
    assert found.status_code == 200 and found.headers["cache-control"] == "no-store"
    [host] = found.json()["hosts"]["hosts"]
    assert found.json()["owner"] == "bob" and host["address"] == "127.0.0.1"
    assert [(p["port"], p["state"]) for p in host["ports"]] == [(port, "open")]
    theirs = await get(server, "/ui/api/hosts", ALICE, port=str(port), owner="bob", network="127.0.0.0/8")
    assert [h["address"] for h in theirs.json()["hosts"]["hosts"]] == ["127.0.0.1"]
    assert (await get(server, "/ui/api/hosts", ALICE, port=str(port))).json()["hosts"]["hosts"] == []
    mine_only = await get(server, "/ui/api/hosts", BOB, owner="alice", port=str(port))
    assert mine_only.json()["owner"] == "bob", "owner counts only for admins"
    for bad in ({"port": "0"}, {"port": "http"}, {"network": "127.0.0.1/99"}, {"service": "s" * 65}):
        refused = await get(server, "/ui/api/hosts", BOB, **bad)
        assert refused.status_code == 400 and refused.json()["error"] == "invalid_argument", (bad, refused.text)
    await call_tool(server.url, BOB, "delete_schedule", {"schedule_id": schedule_id})
    assert await bobs_schedules() == []


@pytest.mark.anyio
async def test_a_running_scan_shows_its_progress_as_it_rises(live_server: StartServer) -> None:
    server = start(live_server)
    started = await scan(server, ALICE, SLOW_SCAN, timeout=5)
    assert started["status"] == "running"
    percents = []
    while rows := [r for r in (await overview(server, ALICE))["running"]["tasks"]
                   if r["task"]["task_id"] == started["task_id"]]:
        if rows[0]["task"]["progress"]:
            percents.append(rows[0]["task"]["progress"]["percent"])
        await asyncio.sleep(0.5)
    assert len(set(percents)) >= 2 and percents == sorted(percents), percents
    [done] = (await overview(server, ALICE))["recent"]["tasks"]
    assert done["task"]["status"] == "completed"


@pytest.mark.anyio
async def test_an_admin_sees_every_tokens_tasks_and_others_only_their_own(live_server: StartServer) -> None:
    server = start(live_server)
    alices = await scan(server, ALICE, "-p 1 127.0.0.1")
    bobs = await scan(server, BOB, "-p 1 127.0.0.3")
    as_admin = await overview(server, ALICE)
    assert as_admin["viewer"] == {"name": "alice", "admin": True}
    assert [(r["owner"], r["task"]["task_id"]) for r in as_admin["recent"]["tasks"]] == [
        ("bob", bobs["task_id"]), ("alice", alices["task_id"])]
    as_bob = await overview(server, BOB)
    assert [(r["owner"], r["task"]["task_id"]) for r in as_bob["recent"]["tasks"]] == [("bob", bobs["task_id"])]
    theirs = await get(server, f"/ui/api/tasks/{bobs['task_id']}", ALICE, owner="bob")
    assert theirs.status_code == 200 and theirs.json()["owner"] == "bob"
    assert theirs.json()["task"]["result"]["hosts"][0]["address"] == "127.0.0.3"
    for path in (f"/ui/api/tasks/{alices['task_id']}", "/ui/api/diff"):
        refused = await get(server, path, BOB, owner="alice", a=alices["task_id"], b=alices["task_id"])
        assert refused.status_code == 404 and refused.json()["error"] == "not_found"


@pytest.mark.anyio
async def test_the_diff_of_two_tasks_shows_the_ports_that_opened_and_closed(
    live_server: StartServer, listeners: Listeners
) -> None:
    closing, opening = free_port(), free_port()
    assert listeners.open(closing)
    server = start(live_server)
    before = await scan(server, ALICE, f"-p {closing},{opening} 127.0.0.1")
    listeners.close(closing)
    assert listeners.open(opening)
    after = await scan(server, ALICE, f"-p {closing},{opening} 127.0.0.1")
    diff = await get(server, "/ui/api/diff", ALICE, a=before["task_id"], b=after["task_id"])
    assert diff.status_code == 200
    # before and after are "state service"; nmap names the service of some ports.
    assert [(c["port"], c["before"], c["after"].split()[0]) for c in diff.json()["ports_opened"]] == [
        (opening, "", "open")]
    assert [(c["port"], c["before"].split()[0], c["after"]) for c in diff.json()["ports_closed"]] == [
        (closing, "open", "")]
    running = await scan(server, ALICE, SLOW_SCAN, timeout=5)
    unfinished = await get(server, "/ui/api/diff", ALICE, a=before["task_id"], b=running["task_id"])
    assert unfinished.status_code == 409 and unfinished.json()["error"] == "not_comparable"
    lacking = await get(server, "/ui/api/diff", ALICE, a=before["task_id"])
    assert lacking.status_code == 400 and lacking.json()["error"] == "invalid_argument"
    await call_tool(server.url, ALICE, "cancel_task", {"task_id": running["task_id"]})


@pytest.mark.anyio
async def test_a_token_sees_only_the_parts_its_tools_allow(live_server: StartServer) -> None:
    readers = {"secret": BOB, "tools": ["custom_scan", "list_tasks", "get_task_result"]}
    # diff_scans without list_tasks: the diff section would list its tasks, so it is not shown.
    watcher = {"secret": "carol-secret-" + "c" * 24, "tools": ["list_workers", "diff_scans"]}
    server = start(live_server, tokens={"alice": {"secret": ALICE}, "bob": readers, "carol": watcher})
    done = await scan(server, BOB, "-p 1 127.0.0.1")
    assert list(await overview(server, BOB)) == ["viewer", "running", "recent"]
    assert (await get(server, f"/ui/api/tasks/{done['task_id']}", BOB)).status_code == 200
    refused = await get(server, "/ui/api/diff", BOB, a=done["task_id"], b=done["task_id"])
    assert refused.status_code == 403
    assert refused.json() == {"error": "forbidden",
                              "error_description": "/ui/api/diff needs the tool diff_scans, which this token may "
                                                   "not use"}
    assert list(await overview(server, watcher["secret"])) == ["viewer", "pools"]
    assert (await get(server, f"/ui/api/tasks/{done['task_id']}", watcher["secret"])).status_code == 403


def text_of(driver: webdriver.Chrome, selector: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return found[0].text if found else ""


def progress_values(driver: webdriver.Chrome) -> list[str]:
    return [bar.get_attribute("value") or "" for bar in
            driver.find_elements(By.CSS_SELECTOR, "section[data-section=running] progress")]


@pytest.mark.anyio
async def test_the_page_in_a_browser_shows_tasks_ports_pools_progress_and_a_diff(
    live_server: StartServer, listeners: Listeners, browser: webdriver.Chrome
) -> None:
    closing, opening = free_port(), free_port()
    assert listeners.open(closing)
    hostile = HostileBanner()
    try:
        server = start(live_server)
        before = await scan(server, ALICE, f"-p {closing},{opening} 127.0.0.1")
        listeners.close(closing)
        assert listeners.open(opening)
        after = await scan(server, ALICE, f"-p {closing},{opening} 127.0.0.1")
        await scan(server, ALICE, f"-sV -p {hostile.port} 127.0.0.1")
    finally:
        hostile.stop()
    scheduled = await call_tool(server.url, ALICE, "schedule_scan",
                                {"kind": "custom", "command": f"-p {opening} 127.0.0.1", "every": "1h"})
    assert not scheduled.is_error, scheduled.content
    running = await scan(server, ALICE, LONG_SCAN, timeout=5)
    assert running["status"] == "running"

    browser.get(base(server) + "/ui")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda d: d.find_element(By.ID, "token").is_displayed())
    browser.find_element(By.ID, "token").send_keys(ALICE)
    browser.find_element(By.CSS_SELECTOR, "#sign-in button[type=submit]").click()
    wait.until(lambda d: HOSTILE_VERSION in text_of(d, "section[data-section=recent]"),
               message="the recent tasks never showed the hostile banner's version as text")
    recent = text_of(browser, "section[data-section=recent]")
    assert f"127.0.0.1: {opening}/tcp" in recent and "127.0.0.2" in recent
    pools = text_of(browser, "section[data-section=pools]")
    assert "pool default" in pools and "dash-worker alive" in pools
    assert browser.find_elements(By.CSS_SELECTOR, "main img, main script") == [], "a banner's markup must stay text"
    marked = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "section[data-section=recent] .untrusted")]
    assert HOSTILE_VERSION in marked, "the target's text is drawn apart, as the target's"
    assert "127.0.0.2" in text_of(browser, "section[data-section=running]")
    first = wait.until(progress_values)
    wait.until(lambda d: progress_values(d) not in ([], first), message="the running scan's progress is refreshed")
    wait.until(lambda d: "completed" in text_of(d, "section[data-section=schedules]"),
               message="the schedule's first run never showed as completed")
    schedules = text_of(browser, "section[data-section=schedules]")
    assert f"custom -p {opening} 127.0.0.1" in schedules and "1h" in schedules and "none found" in schedules

    for port, expected in ((opening, f"{opening}/tcp open"), (hostile.port, HOSTILE_VERSION)):
        field = browser.find_element(By.ID, "hosts-port")
        field.clear()
        field.send_keys(str(port))
        browser.find_element(By.ID, "hosts-run").click()
        wait.until(lambda d, e=expected: e in text_of(d, "#hosts-output"),
                   message=f"the inventory search for port {port} never showed {expected!r}")
        assert "127.0.0.1" in text_of(browser, "#hosts-output")
    assert browser.find_elements(By.CSS_SELECTOR, "main img, main script") == [], (
        "a banner's markup stays text in the inventory too")

    Select(browser.find_element(By.ID, "diff-a")).select_by_value(f"alice/{before['task_id']}")
    Select(browser.find_element(By.ID, "diff-b")).select_by_value(f"alice/{after['task_id']}")
    browser.find_element(By.ID, "diff-run").click()
    wait.until(lambda d: "ports opened" in text_of(d, "#diff-output"))
    compared = text_of(browser, "#diff-output")
    assert re.search(rf"127\.0\.0\.1 {opening}/tcp: absent \u2192 open\b", compared), compared
    assert re.search(rf"127\.0\.0\.1 {closing}/tcp: open\b.* \u2192 absent", compared), compared
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    browser.execute_script("arguments[0].scrollIntoView()",
                           browser.find_element(By.CSS_SELECTOR, "section[data-section=schedules]"))
    assert browser.save_screenshot(str(ARTIFACTS / "dashboard-schedules.png"))

    assert browser.current_url == base(server) + "/ui" and browser.get_cookies() == []
    assert browser.execute_script("return sessionStorage.getItem('nmap-mcp-token')") == ALICE
    browser.refresh()
    wait.until(lambda d: "dash-worker" in text_of(d, "section[data-section=pools]"))
    assert not browser.find_element(By.ID, "token").is_displayed(), "the token is asked for once per session"
    browser.find_element(By.ID, "sign-out").click()
    assert browser.find_element(By.ID, "token").is_displayed()
    assert browser.execute_script("return sessionStorage.length") == 0
    console = [entry["message"] for entry in browser.get_log("browser")]
    assert not [line for line in console if "Content Security Policy" in line], console
    await call_tool(server.url, ALICE, "cancel_task", {"task_id": running["task_id"]})
    assert all(secret not in server.log_text() for secret in SECRETS.values())


# Approvals (docs/engagements.md): alice's scans of more than 2 addresses wait for an approver; bob approves.
LAB = "127.0.24.0/24"
HELD = "127.0.24.0/30"
JUSTIFICATION = "ticket SEC-7 <script>alert(3)</script><b>bold</b>"


def approvals_config(tmp_path: Path) -> dict[str, Any]:
    """alice scans under lab; bob approves (and may scan under it too: his own scan he may not
    approve); neither is a ui admin. The audit log is the test's to read."""
    tokens = {"alice": {"secret": ALICE, "engagement": "lab"},
              "bob": {"secret": BOB, "engagement": "lab", "approve_scans": True}}
    lab = {"scope": [LAB], "tokens": ["alice", "bob"], "approval": {"addresses_over": 2}}
    return {"tokens": tokens, "engagements": {"lab": lab}, "audit_log": str(tmp_path / "audit.jsonl"),
            "worker_name": "dash-worker"}


async def decide(server: LiveServer, task_id: str, body: object, token: str | None = BOB,
                 origin: str | None = "own") -> httpx.Response:
    """The page's POST of a decision, with bob's token and the page's Origin unless told otherwise."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if origin is not None:
        headers["Origin"] = base(server) if origin == "own" else origin
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(f"{base(server)}/ui/api/approvals/{task_id}", json=body, headers=headers)


async def task_status(server: LiveServer, task_id: str, token: str = ALICE) -> dict[str, Any]:
    result = await call_tool(server.url, token, "get_task_status", {"task_id": task_id})
    assert not result.is_error, result.content
    return result.structured_content


async def until_finished(server: LiveServer, task_id: str) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + 60
    while (state := await task_status(server, task_id))["status"] in ("awaiting_approval", "queued", "running"):
        assert asyncio.get_running_loop().time() < deadline, state
        await asyncio.sleep(0.3)
    return state


def approval_row(driver: webdriver.Chrome, task_id: str) -> str:
    return text_of(driver, f".approval[data-task='{task_id}']")


def notice(driver: webdriver.Chrome) -> str:
    return text_of(driver, "#approvals-notice")


@pytest.mark.anyio
async def test_an_approver_approves_and_denies_in_the_page_and_each_decision_is_audited_as_theirs(
    live_server: StartServer, listeners: Listeners, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    port = free_port("127.0.24.1")
    assert listeners.open(port, host="127.0.24.1")
    why_not = f"port {port + 1} is out of the plan"
    server = live_server(**approvals_config(tmp_path))
    approved = await scan(server, ALICE, f"-Pn -p {port} {HELD}")
    denied = await scan(server, ALICE, f"-Pn -p {port + 1} {HELD}")
    assert {approved["status"], denied["status"]} == {"awaiting_approval"}
    async with opened_stores(f"sqlite:///{tmp_path / 'tasks.db'}", max_queued=10) as stores:
        assert await stores.approvals.justify(approved["task_id"], "alice", JUSTIFICATION)
    assert "approvals" not in await overview(server, ALICE), "alice approves nothing: no approvals section"

    browser.get(base(server) + "/ui")
    # The page redraws its sections every 2 s: an element read mid-redraw is stale, read again.
    wait = WebDriverWait(browser, 20, ignored_exceptions=[StaleElementReferenceException])
    wait.until(lambda d: d.find_element(By.ID, "token").is_displayed())
    browser.find_element(By.ID, "token").send_keys(BOB)
    browser.find_element(By.CSS_SELECTOR, "#sign-in button[type=submit]").click()
    wait.until(lambda d: all(approval_row(d, t["task_id"]) for t in (approved, denied)),
               message="the page never listed alice's scans waiting for approval")
    own = await scan(server, BOB, "-Pn -p 1 127.0.24.4/30")
    assert own["status"] == "awaiting_approval"
    wait.until(lambda d: approval_row(d, own["task_id"]), message="a scan held now shows up without a reload")
    first = approval_row(browser, approved["task_id"])
    for shown in ("alice: custom 127.0.24.0/30 under lab", f"nmap -sT -Pn -p {port} --host-timeout",
                  "waits because it covers 4 addresses, more than 2", f"alice says: {JUSTIFICATION}",
                  f"-- {HELD} (pool default)", f"(task {approved['task_id'][:8]})"):
        assert shown in first, (shown, first)
    assert browser.find_elements(By.CSS_SELECTOR, "main script, main b") == [], "a justification stays text"
    assert "says" not in approval_row(browser, denied["task_id"])
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "dashboard-approvals.png"))

    browser.find_element(By.ID, f"approve-{approved['task_id']}").click()
    wait.until(lambda d: "Give a reason to approve alice's custom" in notice(d))
    assert (await task_status(server, approved["task_id"]))["status"] == "awaiting_approval"
    browser.find_element(By.ID, f"reason-{approved['task_id']}").send_keys("in the plan for today")
    browser.find_element(By.ID, f"approve-{approved['task_id']}").click()
    wait.until(lambda d: "You approved alice's custom 127.0.24.0/30" in notice(d))
    wait.until(lambda d: not approval_row(d, approved["task_id"]), message="an approved scan leaves the list")
    browser.find_element(By.ID, f"reason-{denied['task_id']}").send_keys(why_not)
    updated = text_of(browser, "#status")
    wait.until(lambda d: text_of(d, "#status") not in ("", updated), message="the page refreshes")
    assert browser.find_element(By.ID, f"reason-{denied['task_id']}").get_attribute("value") == why_not, (
        "a reason being typed survives the refresh")
    browser.find_element(By.ID, f"deny-{denied['task_id']}").click()
    wait.until(lambda d: "You denied alice's custom" in notice(d))
    browser.find_element(By.ID, f"reason-{own['task_id']}").send_keys("mine")
    browser.find_element(By.ID, f"approve-{own['task_id']}").click()
    wait.until(lambda d: "Could not approve bob's custom" in notice(d))
    assert notice(browser).endswith("nobody approves or denies their own scan; another approver decides")
    assert browser.find_element(By.ID, "approvals-notice").get_attribute("class") == "error"
    wait.until(lambda d: not approval_row(d, denied["task_id"]) and approval_row(d, own["task_id"]))

    ran = await until_finished(server, approved["task_id"])
    assert ran["status"] == "completed", ran
    result = await call_tool(server.url, ALICE, "get_task_result", {"task_id": approved["task_id"]})
    hosts = result.structured_content["result"]["hosts"]
    assert [(h["address"], [p["port"] for p in h["ports"] if p["state"] == "open"]) for h in hosts
            if h["address"] == "127.0.24.1"] == [("127.0.24.1", [port])]
    refused = await task_status(server, denied["task_id"])
    assert refused["status"] == "denied" and refused["error"] == f"denied by bob: {why_not}"

    browser.find_element(By.ID, "sign-out").click()
    browser.find_element(By.ID, "token").send_keys(ALICE)
    browser.find_element(By.CSS_SELECTOR, "#sign-in button[type=submit]").click()
    wait.until(lambda d: approved["task_id"][:8] in text_of(d, "section[data-section=diff]"))
    assert browser.find_elements(By.CSS_SELECTOR, "section[data-section=approvals]") == []
    assert browser.find_elements(By.CSS_SELECTOR, "section[data-section=recent] .status-denied")
    await call_tool(server.url, ALICE, "custom_scan", {"command": f"-Pn -p {port} 127.0.24.0/30", "timeout": 5})
    wait.until(lambda d: "waits for an approver" in text_of(d, "section[data-section=recent]"))
    console = [entry["message"] for entry in browser.get_log("browser")]
    assert not [line for line in console if "Content Security Policy" in line], console

    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    decisions = {(line["event"], line["arguments"]["task_id"] if "arguments" in line else line["verdict"])
                 for line in lines if line.get("tool") == "decide_approval" and line.get("via") == "/ui"
                 and line["token"] == "bob"}
    assert {("accepted", approved["task_id"]), ("accepted", denied["task_id"]), ("accepted", own["task_id"]),
            ("done", "allowed"), ("done", "refused")} == decisions
    accepted = [line["arguments"] for line in lines if line.get("tool") == "decide_approval"
                and line["event"] == "accepted"]
    assert {"task_id": denied["task_id"], "decision": "deny", "reason": why_not} in accepted
    assert [line["reason"] for line in lines if line.get("tool") == "decide_approval" and line["event"] == "done"
            and line["verdict"] == "refused"] == [
        "forbidden: nobody approves or denies their own scan; another approver decides"]


@pytest.mark.anyio
@pytest.mark.slow("an approval nobody decides expires after 5 s, the shortest time an engagement allows")
async def test_a_decision_comes_only_from_the_page_of_an_approver_and_a_refusal_says_why(
    live_server: StartServer, tmp_path: Path
) -> None:
    config = approvals_config(tmp_path)
    brief = {"scope": [LAB], "tokens": ["alice"], "approval": {"addresses_over": 2, "expires_after_seconds": 5}}
    server = live_server(**config | {"engagements": config["engagements"] | {"brief": brief}})
    held = await scan(server, ALICE, f"-Pn -p 1 {HELD}")
    expiring = (await call_tool(server.url, ALICE, "custom_scan", {"command": f"-Pn -p 2 {HELD}",
                                                                   "engagement": "brief"})).structured_content
    approve = {"decision": "approve", "reason": "planned"}
    elsewhere = f"http://127.0.0.1:{free_port()}"
    for origin in (None, elsewhere, "null", "http://attacker.example", base(server).replace("http:", "https:")):
        refused = await decide(server, held["task_id"], approve, origin=origin)
        assert refused.status_code == 403, (origin, refused.text)
    assert (await decide(server, held["task_id"], approve, origin=elsewhere)).json() == {
        "error": "forbidden", "error_description": "a decision is sent by the operator page itself: this request's "
                                                   "Origin is missing or is not this server's"}
    unsigned = await decide(server, held["task_id"], approve, token=None)
    assert unsigned.status_code == 401 and unsigned.json()["error"] == "unauthorized"
    by_alice = await decide(server, held["task_id"], approve, token=ALICE)
    assert by_alice.status_code == 403 and by_alice.json()["error_description"] == (
        "/ui/api/approvals/{task_id} needs the tool decide_approval, which this token may not use")
    for body in ({"decision": "approve"}, {"decision": "approve", "reason": "  "}, {"decision": "maybe", "reason": "x"},
                 {"decision": "approve", "reason": "r" * 501}, ["approve"]):
        invalid = await decide(server, held["task_id"], body)
        assert invalid.status_code == 400 and invalid.json()["error"] == "invalid_argument", (body, invalid.text)
    async with httpx.AsyncClient(timeout=10) as http:
        as_form = await http.post(f"{base(server)}/ui/api/approvals/{held['task_id']}", data={"decision": "approve"},
                                  headers={"Authorization": f"Bearer {BOB}", "Origin": base(server)})
    assert as_form.status_code == 400 and as_form.json()["error"] == "invalid_argument"
    unknown = str(uuid.uuid4())
    assert (await decide(server, unknown, approve)).json()["error"] == "not_found"
    assert (await task_status(server, held["task_id"]))["status"] == "awaiting_approval"

    approved = await decide(server, held["task_id"], approve)
    assert approved.status_code == 200, approved.text
    assert {key: approved.json()[key] for key in ("task_id", "decision", "decided_by", "decision_reason")} == {
        "task_id": held["task_id"], "decision": "approved", "decided_by": "bob", "decision_reason": "planned"}
    again = await decide(server, held["task_id"], {"decision": "deny", "reason": "changed my mind"})
    assert again.status_code == 409 and again.json() == {
        "error": "already_decided", "error_description": f"task {held['task_id']} was approved already by bob"}
    assert (await until_finished(server, held["task_id"]))["status"] == "completed"
    deadline = asyncio.get_running_loop().time() + 30
    while (state := await task_status(server, expiring["task_id"]))["status"] == "awaiting_approval":
        assert asyncio.get_running_loop().time() < deadline, state
        await asyncio.sleep(0.3)
    assert state["status"] == "denied" and state["error"] == "no approver decided within 5 s"
    late = await decide(server, expiring["task_id"], approve)
    assert late.status_code == 409 and late.json()["error_description"] == (
        f"task {expiring['task_id']} was expired already")

    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    done = [(line["token"], line["verdict"], line["reason"]) for line in lines
            if line.get("tool") == "decide_approval" and line["event"] == "done"]
    assert all(line.get("via") == "/ui" for line in lines if line.get("tool") == "decide_approval")
    assert done[0] == ("alice", "refused", "forbidden: /ui/api/approvals/{task_id} needs the tool decide_approval, "
                                           "which this token may not use")
    assert [verdict for _, verdict, _ in done[1:5]] == ["refused"] * 4, "each invalid decision is audited"
    assert done[5:] == [
        ("bob", "refused", f"not_found: no scan {unknown!r} waits for approval; list_approvals shows those that do"),
        ("bob", "allowed", None),
        ("bob", "refused", f"already_decided: task {held['task_id']} was approved already by bob"),
        ("bob", "refused", f"already_decided: task {expiring['task_id']} was expired already")]
