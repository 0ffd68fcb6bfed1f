"""The operator page (/ui): its JSON API over real HTTP against a live server running real
scans of loopback, and the page itself in a real browser (Debian's chromium, headless,
driven through chromedriver by Selenium). Every scan targets 127.0.0.0/8."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from dashboard import CONTENT_SECURITY_POLICY
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
