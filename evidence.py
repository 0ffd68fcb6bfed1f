"""The evidence of a set of tasks as one archive a report can cite, and the check of one.

`export_evidence` writes a tar.gz holding, for the tasks a filter chooses (evidence_store):
- `tasks/<task id>/result.json`: the result exactly as stored, and `tasks/<task id>/<run id>.xml`:
  nmap's XML of each run (the task's own, or each shard's), exactly as nmap wrote it;
- `audit.jsonl`: the audit log's lines that concern them, exactly as written: every line of
  the calls that queued them (the lines of one call share its `call` id) and of those that
  cancelled them;
- `manifest.json`: the server's version, when it was exported, the filter, every task's
  evidence (get_task_evidence's), the audit chain as verified at export (its length, its
  breaks, its last line's SHA-256) with each line kept and its SHA-256, and every file's SHA-256;
- `SHA256SUMS`: every other file's SHA-256, as `sha256sum -c` reads it.
The archive is deterministic (entries sorted, one mtime: the export's, owner root, mode 0600)
and written mode 0600; the report cites its SHA-256, and the audit chain's last hash.

`verify_archive` checks one: every sum, every file listed and nothing else, and every run's
XML, every result and every audit line against the hashes the manifest records.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from audit import verify_chain
from evidence_store import EvidenceFilter, EvidenceStore, utc

FORMAT = "nmap-mcp-evidence/1"
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
AUDIT_LINES = "audit.jsonl"
# Calls that act on a task they name in their `task_id` argument: their lines are its evidence too.
ACTING_ON_TASKS = frozenset({"cancel_task", "decide_approval", "expire_approval"})
# Files are hashed and copied this many bytes at a time.
CHUNK = 1 << 20


class NothingMatches(LookupError):
    """No task meets the export's filter: no archive is written."""


@dataclass(frozen=True)
class Exported:
    """What an export wrote: how many tasks and files, the archive's SHA-256, the runs whose
    XML no longer has the SHA-256 its worker recorded (the archive keeps what is stored), and
    the task ids asked for that no task of the filter has."""

    tasks: int
    files: int
    sha256: str
    altered: list[str]
    missing: list[str]


async def export_evidence(store: EvidenceStore, audit_log: Path, chosen: EvidenceFilter, out: Path, *,
                          server_version: str, now: float) -> Exported:
    """Write the archive of the tasks `chosen` names to `out` (which must not exist yet)."""
    task_ids = await store.matching(chosen)
    if not task_ids:
        raise NothingMatches("no task matches the filter; nothing was written")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".evidence-") as staging:
        files = Files(Path(staging))
        evidence, altered = [], []
        for task_id in task_ids:
            task, changed = await stage_task(store, task_id, files)
            evidence.append(task)
            altered += changed
        audit = audit_section(audit_log, set(task_ids), files)
        manifest = {"format": FORMAT, "server_version": server_version, "exported_at": utc(now),
                    "exported_at_epoch": int(now), "filter": chosen.described(), "tasks": evidence,
                    "audit": audit, "files": dict(sorted(files.sums.items()))}
        if chosen.engagement is not None:
            # The rules the tasks were checked against, as stored at export.
            manifest["engagement"] = await store.engagement(chosen.engagement)
        files.add(MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        files.add(SUMS, "".join(f"{digest}  {name}\n" for name, digest in sorted(files.sums.items())).encode())
        digest = write_archive(out, files, int(now))
    return Exported(len(task_ids), len(files.sums), digest, altered, sorted(set(chosen.task_ids) - set(task_ids)))


async def stage_task(store: EvidenceStore, task_id: str, files: Files) -> tuple[dict[str, Any], list[str]]:
    """Stage a task's result and XML; its evidence as the manifest holds it, and the runs whose
    XML is not what its worker recorded."""
    bundle = await store.bundle(task_id)
    if bundle.result is not None:
        files.add(f"tasks/{task_id}/result.json", bundle.result)
    altered = []
    for run in bundle.evidence.runs:
        if run.task_id in bundle.raw_xml:
            written = files.add(f"tasks/{task_id}/{run.task_id}.xml", bundle.raw_xml[run.task_id])
            if run.raw_xml_sha256 is not None and run.raw_xml_sha256 != written:
                altered.append(run.task_id)
    return bundle.evidence.model_dump(mode="json"), altered


class Files:
    """The archive's files, staged in a private directory, with their SHA-256."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.sums: dict[str, str] = {}

    def add(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.sums[name] = hashlib.sha256(data).hexdigest()
        return self.sums[name]


def audit_section(audit_log: Path, task_ids: set[str], files: Files) -> dict[str, Any]:
    """The audit log as verified now, and its lines that concern `task_ids` (added to `files`).
    Lines appended after the check are left out: the lines kept are within the chain checked."""
    count, last, problems = verify_chain(audit_log)
    kept = list(concerning(audit_log, count, task_ids))
    files.add(AUDIT_LINES, b"".join(line for _, line in kept))
    return {"log": str(audit_log), "lines": count, "chain_intact": not problems, "breaks": problems,
            "last_line_sha256": last, "file": AUDIT_LINES,
            "kept": [{"line": number, "sha256": hashlib.sha256(line).hexdigest()} for number, line in kept]}


def concerning(audit_log: Path, count: int, task_ids: set[str]) -> Iterator[tuple[int, bytes]]:
    """The first `count` lines' that belong to a call that queued one of `task_ids` or cancelled
    one (numbered from 1): the log is read twice, to find those calls, then their lines."""
    calls = set()
    with audit_log.open("rb") as log:
        for line in itertools.islice(log, count):
            record = _record(line)
            if _concerns(record, task_ids):
                calls.add(record.get("call"))
    calls.discard(None)
    with audit_log.open("rb") as log:
        for number, line in enumerate(itertools.islice(log, count), 1):
            if _record(line).get("call") in calls:
                yield number, line


def _concerns(record: dict[str, Any], task_ids: set[str]) -> bool:
    """Whether an audit line says a call queued (or reused) one of `task_ids`, or acted on one:
    asked to cancel it, approved or denied it, or let its approval expire."""
    if record.get("event") == "queued":
        return _named(record.get("task_id"), task_ids)
    arguments = record.get("arguments")
    return record.get("tool") in ACTING_ON_TASKS and isinstance(arguments, dict) and _named(
        arguments.get("task_id"), task_ids)


def _named(value: object, task_ids: set[str]) -> bool:
    return isinstance(value, str) and value in task_ids


def _record(line: bytes) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError:
        return {}  # verify_chain has reported it
    return record if isinstance(record, dict) else {}


def write_archive(out: Path, files: Files, mtime: int) -> str:
    """The staged files as a tar.gz at `out` (created mode 0600, never over an existing file):
    sorted entries, every one with `mtime`, owner root, mode 0600; the archive's SHA-256."""
    descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with (open(descriptor, "wb") as raw,
              gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=mtime) as packed,
              tarfile.open(fileobj=packed, mode="w", format=tarfile.PAX_FORMAT) as tar):
            for name in sorted(files.sums):
                path = files.directory / name
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = path.stat().st_size, mtime, 0o600
                with path.open("rb") as data:
                    tar.addfile(info, data)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return _sha256_of(out.open("rb"))


def _sha256_of(stream: IO[bytes]) -> str:
    digest = hashlib.sha256()
    with stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class UnreadableArchive(ValueError):
    """The file is not an evidence archive that can be read (no tar.gz, or no manifest or sums)."""


def verify_archive(path: Path) -> tuple[int, list[str]]:
    """Check the archive at `path`: how many files it holds, and every difference found, in
    words naming the file (none: it is as exported). UnreadableArchive when it cannot be read."""
    try:
        sums, kept = _read(path)
    except (OSError, tarfile.TarError, EOFError) as e:
        raise UnreadableArchive(f"{path} is not a readable tar.gz: {e}") from e
    if MANIFEST not in kept or SUMS not in kept:
        raise UnreadableArchive(f"{path} holds no {MANIFEST} or no {SUMS}: not an nmap-mcp evidence archive")
    try:
        manifest = json.loads(kept[MANIFEST])
    except ValueError as e:
        raise UnreadableArchive(f"{MANIFEST} is not JSON: {e}") from e
    problems = _against_sums(sums, kept[SUMS].decode(errors="replace"))
    problems += _against_manifest(sums, manifest, kept.get(AUDIT_LINES, b""))
    return len(sums), problems


def _read(path: Path) -> tuple[dict[str, str], dict[str, bytes]]:
    """Every file's SHA-256, and the bytes of the manifest, the sums and the audit lines."""
    sums: dict[str, str] = {}
    kept: dict[str, bytes] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            stream = tar.extractfile(member)
            if stream is None:
                sums[member.name] = "not a regular file"
                continue
            if member.name in (MANIFEST, SUMS, AUDIT_LINES):
                kept[member.name] = stream.read()
                sums[member.name] = hashlib.sha256(kept[member.name]).hexdigest()
            else:
                sums[member.name] = _sha256_of(stream)
    return sums, kept


def _against_sums(sums: dict[str, str], listed: str) -> list[str]:
    problems, named = [], set()
    for line in listed.splitlines():
        digest, _, name = line.partition("  ")
        named.add(name)
        if name not in sums:
            problems.append(f"{name}: listed in {SUMS} but missing")
        elif sums[name] != digest:
            problems.append(f"{name}: its SHA-256 differs from {SUMS}'s")
    problems += [f"{name}: not listed in {SUMS}" for name in sorted(set(sums) - named - {SUMS})]
    return problems


def _against_manifest(sums: dict[str, str], manifest: dict[str, Any], audit_lines: bytes) -> list[str]:
    """What differs from the hashes the manifest records: of every file, of each run's XML (the
    SHA-256 its worker recorded), of each result, and of each audit line kept."""
    problems = [f"{name}: its SHA-256 differs from the manifest's" for name, digest in manifest.get("files", {}).items()
                if sums.get(name, digest) != digest]
    problems += [f"{name}: in the manifest but missing" for name in manifest.get("files", {}) if name not in sums]
    for task in manifest.get("tasks", []):
        result = f"tasks/{task['task_id']}/result.json"
        if task.get("result_sha256") is not None and sums.get(result) != task["result_sha256"]:
            problems.append(f"{result}: its SHA-256 is not the task's result_sha256")
        for run in task.get("runs", []):
            xml = f"tasks/{task['task_id']}/{run['task_id']}.xml"
            if run.get("raw_xml_sha256") is not None and sums.get(xml) != run["raw_xml_sha256"]:
                problems.append(f"{xml}: its SHA-256 is not the raw_xml_sha256 its worker recorded")
    lines = audit_lines.splitlines(keepends=True)
    recorded = manifest.get("audit", {}).get("kept", [])
    if [hashlib.sha256(line).hexdigest() for line in lines] != [line.get("sha256") for line in recorded]:
        problems.append(f"{AUDIT_LINES}: its lines differ from those the manifest records")
    return problems
