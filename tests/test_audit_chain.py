"""The audit log's hash chain: lines appended by several writers (processes sharing the file)
chain into one sequence, a torn last line is no link, and `--verify-audit` finds a line edited
or removed (audit.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from audit import GENESIS, AuditLog, verify_chain
from tests.support import ROOT, SECRETS


def written(path: Path, count: int) -> list[bytes]:
    """`count` lines from two writers taking turns, as an API and its worker do."""
    first, second = AuditLog(path), AuditLog(path)
    for index in range(count):
        assert (first if index % 2 else second).write({"event": "accepted", "call": str(index), "tool": "t"})
    first.close()
    second.close()
    return path.read_bytes().splitlines(keepends=True)


def test_two_writers_chain_into_one_sequence(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    lines = written(log, 6)
    assert json.loads(lines[0])["prev"] == GENESIS
    count, last, problems = verify_chain(log)
    assert (count, problems) == (6, [])
    assert len(last) == 64 and last != GENESIS


def test_an_edited_or_removed_line_breaks_the_chain_where_it_was(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    lines = written(log, 5)
    log.write_bytes(b"".join([*lines[:2], lines[2].replace(b'"tool":"t"', b'"tool":"x"'), *lines[3:]]))
    assert verify_chain(log)[2] == [
        "line 4: its prev does not match line 3: line 3 was edited, or lines were removed before it"]
    log.write_bytes(b"".join([lines[0], *lines[2:]]))
    assert verify_chain(log)[2] == [
        "line 2: its prev does not match line 1: line 1 was edited, or lines were removed before it"]
    log.write_bytes(b"".join(lines[1:]))
    assert verify_chain(log)[2] == ["line 1 does not start the chain: lines were removed before it"]


def test_a_torn_last_line_is_cut_off_and_the_next_line_chains_to_the_one_before(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    written(log, 2)
    with log.open("ab") as torn:
        torn.write(b'{"event":"accep')
    again = AuditLog(log)
    assert again.write({"event": "done", "call": "2", "tool": "t"})
    again.close()
    count, _, problems = verify_chain(log)
    assert (count, problems) == (3, [])


def test_verify_audit_prints_the_length_and_last_hash_and_fails_on_a_break(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    lines = written(log, 3)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"token": SECRETS["alice"], "audit_log": str(log)}))
    command = [sys.executable, str(ROOT / "server.py"), "-c", str(config), "--verify-audit"]
    intact = subprocess.run(command, capture_output=True, text=True, check=False)
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout == f"{log}: 3 lines, chain intact; last line's SHA-256 {verify_chain(log)[1]}\n"
    log.write_bytes(lines[0] + lines[2])
    broken = subprocess.run(command, capture_output=True, text=True, check=False)
    assert broken.returncode == 1
    assert "line 2: its prev does not match line 1" in broken.stderr and "2 lines, 1 break;" in broken.stdout
