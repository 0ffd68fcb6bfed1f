"""Evidence of scans (issue 23, point 4): what each task ran and produced, as get_task_evidence
shows it through in-memory clients of create_server(...), with real nmap on loopback
(127.0.22.0/24) and real SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import subprocess
from datetime import datetime
from typing import Any

import pytest
from fastmcp import Client

from tests.conftest import REAL_NMAP, OpenClient
from tests.support import Listeners, answer_of, call, error_text

pytestmark = pytest.mark.anyio
HOST = "127.0.22.1"


def nmap_says() -> tuple[str, str]:
    """The version and platform `nmap --version` prints, read here apart from the server's parser."""
    lines = subprocess.run([REAL_NMAP, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()
    return lines[0].split()[2], lines[1].removeprefix("Platform:").strip()


async def xml_text(client: Client, task_id: str) -> str:
    """nmap's XML as get_task_result format=xml returns it, every page of it joined."""
    text, offset = "", 0
    while offset is not None:
        page = await answer_of(client, "get_task_result", task_id=task_id, format="xml", offset=offset)
        text += page["content"]
        offset = page["page"]["next_offset"]
    return text


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_run(run: dict[str, Any], worker: str) -> None:
    """A finished run's evidence: which nmap, which worker, and times that agree."""
    assert (run["nmap_version"], run["nmap_platform"]) == nmap_says()
    assert run["worker"] == worker and len(run["worker_id"]) == 36
    for moment in ("started_at", "finished_at"):
        assert datetime.fromisoformat(run[moment]).timestamp() == pytest.approx(run[f"{moment}_epoch"], abs=1e-5)
        assert run[moment].endswith("+00:00")
    assert run["started_at_epoch"] <= run["finished_at_epoch"]


async def test_a_quick_scan_s_evidence_hashes_exactly_the_xml_get_task_result_returns(
    in_memory: OpenClient, listeners: Listeners, database_url: str
) -> None:
    [port] = listeners.open_free_top_ports(1, HOST)
    async with in_memory(database_url=database_url) as alice, in_memory("bob", database_url=database_url) as bob:
        done = await answer_of(alice, "quick_scan", target=HOST)
        evidence = await answer_of(alice, "get_task_evidence", task_id=done["task_id"])
        xml = await xml_text(alice, done["task_id"])
        refused = await call(bob, "get_task_evidence", {"task_id": done["task_id"]})
    assert {p["port"] for p in done["result"]["hosts"][0]["ports"]} >= {port}
    assert error_text(refused).startswith("not_found"), "another's task is not found, as get_task_status says"
    assert {key: evidence[key] for key in ("task_id", "owner", "kind", "status", "target")} == {
        "task_id": done["task_id"], "owner": "alice", "kind": "quick", "status": "completed", "target": HOST}
    [run] = evidence["runs"]
    check_run(run, "alice-0 stdio")
    assert run["task_id"] == done["task_id"] and run["pool"] == "default"
    assert run["argv"][-2:] == ["--", HOST] and "-n" in run["argv"] and "--top-ports" in run["argv"]
    assert run["raw_xml_sha256"] == sha256(xml) and run["raw_xml_bytes"] == len(xml.encode())
    assert len(evidence["result_sha256"]) == 64


async def test_a_full_scan_s_evidence_covers_both_nmap_runs(in_memory: OpenClient, listeners: Listeners) -> None:
    listeners.open_free_top_ports(1, HOST)
    async with in_memory() as alice:
        done = await answer_of(alice, "full_scan", target=HOST, timeout=120)
        evidence = await answer_of(alice, "get_task_evidence", task_id=done["task_id"])
        xml = await xml_text(alice, done["task_id"])
    assert done["status"] == "completed"
    assert xml.count("<nmaprun ") == 2, "port discovery's report, then version detection's"
    [run] = evidence["runs"]
    check_run(run, "alice-0 stdio")
    assert run["raw_xml_sha256"] == sha256(xml) and run["raw_xml_bytes"] == len(xml.encode())
    assert "-sV" not in run["argv"], "the argv stored is the task's, port discovery's; -sV is derived from it"


async def test_a_sharded_scan_s_evidence_is_each_shard_s_in_the_order_its_xml_joins_them(
    in_memory: OpenClient, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1, HOST)
    async with in_memory(shard_addresses=8) as alice:
        done = await answer_of(alice, "custom_scan", command=f"-Pn -p {port} 127.0.22.0/28", timeout=120)
        evidence = await answer_of(alice, "get_task_evidence", task_id=done["task_id"])
        xml = await xml_text(alice, done["task_id"])
    assert done["status"] == "completed"
    runs = evidence["runs"]
    assert [run["target"] for run in runs] == ["127.0.22.0/29", "127.0.22.8/29"]
    assert done["task_id"] not in [run["task_id"] for run in runs]
    documents = ["<?xml version" + part for part in xml.split("<?xml version")[1:]]
    assert [run["raw_xml_sha256"] for run in runs] == [sha256(document) for document in documents]
    assert sum(run["raw_xml_bytes"] for run in runs) == len(xml.encode())
    for run in runs:
        check_run(run, "alice-0 stdio")
        assert run["argv"][-2:] == ["--", run["target"]]
