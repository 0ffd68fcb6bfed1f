"""Evidence of scans (issue 23, point 4): what each task ran and produced, as get_task_evidence
shows it through in-memory clients of create_server(...), and the archive `--export-evidence`
writes and `--verify-evidence` checks (real processes of server.py), with real nmap on loopback
(127.0.22.0/24) and real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastmcp import Client

from audit import verify_chain
from evidence import export_evidence
from evidence_store import EvidenceFilter, opened
from server import VERSION
from tests.conftest import REAL_NMAP, OpenClient
from tests.support import ROOT, Listeners, NmapWrapper, answer_of, call, error_text, running_task

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
    # A second process of alice's is a second live worker that takes her scans (a pool of one
    # runs a scan whole; another token's stdio process does not count): either runs a shard.
    async with in_memory(shard_addresses=8) as alice, in_memory("alice"):
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
        assert run["worker"] in ("alice-0 stdio", "alice-1 stdio")
        check_run(run, run["worker"])
        assert run["argv"][-2:] == ["--", run["target"]]


# ---- the export archive and its check ----------------------------------------------------------


def server_command(*options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "server.py"), *options], capture_output=True, text=True,
                          timeout=120, check=False)


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def sha256sum_check(archive: Path, directory: Path) -> subprocess.CompletedProcess[str]:
    """`sha256sum -c SHA256SUMS` run in the directory the archive is extracted to (by hand:
    extractall's `filter` is missing from Python 3.11 before 3.11.4, Debian 12's python3)."""
    for name, data in members(archive).items():
        path = directory / name
        assert path.resolve().is_relative_to(directory.resolve()), name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=directory, capture_output=True, text=True,
                          check=False)


def rewritten(archive: Path, out: Path, changes: dict[str, bytes]) -> Path:
    """A copy of `archive` with the files `changes` names holding other bytes, as an editor would leave it."""
    with tarfile.open(archive, "r:gz") as source, tarfile.open(out, "w:gz") as copy:
        for member in source.getmembers():
            data = changes.get(member.name, source.extractfile(member).read())  # type: ignore[union-attr]
            member.size = len(data)
            copy.addfile(member, io.BytesIO(data))
    return out


async def scanned_for_export(in_memory: OpenClient, nmap_wrapper: NmapWrapper, database_url: str,
                             ) -> tuple[list[dict[str, Any]], str, str]:
    """Alice's quick scan and a scan she cancels, and Bob's quick scan: Alice's evidence (oldest
    first), the cancelled task's id and Bob's task's id."""
    async with in_memory(database_url=database_url) as alice, in_memory("bob", database_url=database_url) as bob:
        done = await answer_of(alice, "quick_scan", target=HOST)
        nmap_wrapper.set_delay(60)
        waiting = asyncio.create_task(call(alice, "custom_scan", {"command": f"-p 1 {HOST}", "timeout": 60}))
        cancelled = await running_task(alice, nmap_wrapper)
        await answer_of(alice, "cancel_task", task_id=cancelled)
        await asyncio.wait_for(waiting, 10)
        nmap_wrapper.set_delay(0)
        other = await answer_of(bob, "quick_scan", target=HOST)
        evidence = [await answer_of(alice, "get_task_evidence", task_id=task_id)
                    for task_id in (done["task_id"], cancelled)]
    return evidence, cancelled, other["task_id"]


async def test_an_export_holds_the_owner_s_tasks_results_xml_and_audit_lines_and_sha256sum_checks_it(
    in_memory: OpenClient, listeners: Listeners, nmap_wrapper: NmapWrapper, database_url: str, tmp_path: Path
) -> None:
    listeners.open_free_top_ports(1, HOST)
    evidence, cancelled, bobs = await scanned_for_export(in_memory, nmap_wrapper, database_url)
    config, log, out = tmp_path / "in-memory-0.json", tmp_path / "audit.jsonl", tmp_path / "alice.tar.gz"
    exported = server_command("-c", str(config), "--export-evidence", str(out), "--owner", "alice")
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.startswith(f"{out}: 2 tasks, ") and exported.stdout.rstrip().endswith(
        hashlib.sha256(out.read_bytes()).hexdigest()), "it prints the SHA-256 a report cites"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with tarfile.open(out, "r:gz") as tar:
        infos = tar.getmembers()
    assert [info.name for info in infos] == sorted(info.name for info in infos)
    assert {(info.mtime, info.mode, info.uid, info.gid) for info in infos} == {(infos[0].mtime, 0o600, 0, 0)}
    files = members(out)
    manifest = json.loads(files["manifest.json"])
    assert manifest["tasks"] == evidence, "every task's evidence, as get_task_evidence shows it"
    assert manifest["filter"] == {"owner": "alice"} and manifest["server_version"] == VERSION
    done = evidence[0]
    [run] = done["runs"]
    xml = files[f"tasks/{done['task_id']}/{run['task_id']}.xml"]
    assert hashlib.sha256(xml).hexdigest() == run["raw_xml_sha256"] and xml.startswith(b"<?xml")
    assert hashlib.sha256(files[f"tasks/{done['task_id']}/result.json"]).hexdigest() == done["result_sha256"]
    count, last, problems = verify_chain(log)
    assert manifest["audit"] | {"kept": None} == {"log": str(log), "lines": count, "chain_intact": True,
                                                  "breaks": problems, "last_line_sha256": last,
                                                  "file": "audit.jsonl", "kept": None}
    kept = [json.loads(line) for line in files["audit.jsonl"].splitlines()]
    whole = log.read_bytes().splitlines(keepends=True)
    assert [whole[line["line"] - 1] for line in manifest["audit"]["kept"]] == files["audit.jsonl"].splitlines(
        keepends=True), "the lines kept are the log's own bytes, numbered as in the log"
    by_call = {(line["tool"], line["event"]) for line in kept}
    assert {("quick_scan", event) for event in ("accepted", "queued", "done")} <= by_call
    assert {("cancel_task", "accepted"), ("cancel_task", "done"), ("custom_scan", "queued")} <= by_call
    assert {line["task_id"] for line in kept if line["event"] == "queued"} == {done["task_id"], cancelled}
    assert bobs not in files["audit.jsonl"].decode() and not any(bobs in name for name in files)
    checked = sha256sum_check(out, tmp_path / "extracted")
    assert checked.returncode == 0 and checked.stdout.count(": OK\n") == len(files) - 1, checked.stdout


async def test_verify_evidence_names_what_an_edit_changed(
    in_memory: OpenClient, listeners: Listeners, tmp_path: Path
) -> None:
    listeners.open_free_top_ports(1, HOST)
    async with in_memory() as alice:
        done = await answer_of(alice, "quick_scan", target=HOST)
    out = tmp_path / "one.tar.gz"
    unknown = "00000000-0000-4000-8000-000000000000"
    chosen = server_command("-c", str(tmp_path / "in-memory-0.json"), "--export-evidence", str(out),
                            "--task", done["task_id"], "--task", unknown, "--since", "2026-01-01")
    assert chosen.returncode == 0
    assert chosen.stderr == f"warning: no task {unknown} meets the other conditions: it is not in the archive\n"
    assert json.loads(members(out)["manifest.json"])["filter"] == {
        "task_ids": sorted([done["task_id"], unknown]), "since": "2026-01-01T00:00:00.000000+00:00"}
    intact = server_command("--verify-evidence", str(out))
    assert (intact.returncode, intact.stderr) == (0, "") and intact.stdout.endswith(" files, intact\n")
    files = members(out)
    xml_name = f"tasks/{done['task_id']}/{done['task_id']}.xml"
    edited = files[xml_name].replace(b'state="open"', b'state="closed"', 1)
    assert edited != files[xml_name]
    sums = files["SHA256SUMS"].replace(hashlib.sha256(files[xml_name]).hexdigest().encode(),
                                       hashlib.sha256(edited).hexdigest().encode())
    against_manifest = [f"{xml_name}: its SHA-256 differs from the manifest's",
                        f"{xml_name}: its SHA-256 is not the raw_xml_sha256 its worker recorded"]
    # The file edited alone, and with SHA256SUMS made to match it: the manifest still knows.
    for changes, named in (({xml_name: edited}, [f"{xml_name}: its SHA-256 differs from SHA256SUMS's",
                                                 *against_manifest]),
                           ({xml_name: edited, "SHA256SUMS": sums}, against_manifest)):
        edited_archive = rewritten(out, tmp_path / "edited.tar.gz", changes)
        caught = server_command("--verify-evidence", str(edited_archive))
        assert caught.returncode == 1
        assert caught.stdout == f"{edited_archive}: {len(files)} files, {len(named)} differences\n"
        assert caught.stderr.splitlines() == [f"{edited_archive}: {problem}" for problem in named]
        edited_archive.unlink()


async def test_an_export_that_matches_nothing_writes_nothing(in_memory: OpenClient, tmp_path: Path) -> None:
    async with in_memory() as alice:
        await answer_of(alice, "list_tasks")
    out = tmp_path / "none.tar.gz"
    refused = server_command("-c", str(tmp_path / "in-memory-0.json"), "--export-evidence", str(out),
                             "--owner", "alice", "--until", "2026-01-01T00:00:00Z")
    assert refused.returncode == 2 and refused.stderr == "error: no task matches the filter; nothing was written\n"
    assert not out.exists()
    config = tmp_path / "in-memory-0.json"
    again = server_command("-c", str(config), "--export-evidence", str(config))
    assert again.returncode == 2 and again.stderr.startswith(f"error: {config} exists: the export writes a new file")
    misused = server_command("--owner", "alice")
    assert misused.returncode == 2
    assert "--task, --owner, --engagement, --since and --until go with --export-evidence" in misused.stderr


async def test_an_export_is_the_same_bytes_for_the_same_tasks_and_moment(
    in_memory: OpenClient, listeners: Listeners, database_url: str, tmp_path: Path
) -> None:
    listeners.open_free_top_ports(1, HOST)
    async with in_memory(database_url=database_url) as alice:
        await answer_of(alice, "quick_scan", target=HOST)
    url = database_url if database_url.startswith("postgresql") else f"sqlite:///{tmp_path / 'tasks.db'}"
    written = []
    for name in ("first.tar.gz", "second.tar.gz"):
        with opened(url, 5.0) as store:
            await export_evidence(store, tmp_path / "audit.jsonl", EvidenceFilter(owner="alice"), tmp_path / name,
                                  server_version="test", now=1_796_000_000.0)
        written.append((tmp_path / name).read_bytes())
    assert written[0] == written[1]
    assert [name for name in os.listdir(tmp_path) if name.startswith(".evidence-")] == [], "staging is removed"
