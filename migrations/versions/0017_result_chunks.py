"""Results stored so that a page reads a page (issue 24): a result's hosts move out of the
task's row into result_chunks, 64 hosts to a zlib-compressed row in the result's order; the
row keeps the result's head (counts, warnings, errors) and how many hosts it has. A sharded
scan's result is stored once: its shards' copies are dropped where the parent has the
merged result. nmap's XML moves from the row (raw_xml) into report_pieces of 256 KiB, paged in
characters (report_chars). Existing results and reports are converted here, a batch of tasks
at a time.

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

import ipaddress
import json
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

BATCH = 200
CHUNK_HOSTS = 64  # result_store.CHUNK_HOSTS as of this revision
PIECE_BYTES = 256 * 1024  # result_store.PIECE_BYTES as of this revision


def address_key(address: str) -> str:
    """result_store.address_key as of this revision."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return "9"
    return f"{parsed.version}{int(parsed):0{8 if parsed.version == 4 else 32}x}"


def dumped(value: Any) -> str:
    """JSON as pydantic writes it: compact, non-ASCII as it is."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def chunk_rows(task_id: str, hosts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"task_id": task_id, "first_host": first, "host_count": len(part),
             "first_key": address_key(part[0].get("address", "")), "last_key": address_key(part[-1].get("address", "")),
             "data": zlib.compress(dumped(part).encode())}
            for first in range(0, len(hosts), CHUNK_HOSTS) if (part := hosts[first: first + CHUNK_HOSTS])]


def report_rows(task_id: str, raw: bytes) -> tuple[int, list[dict[str, Any]]]:
    """result_store._report_rows as of this revision."""
    pieces, start, first_char = [], 0, 0
    while start < len(raw):
        end = min(start + PIECE_BYTES, len(raw))
        while start < end < len(raw) and 0x80 <= raw[end] < 0xC0:
            end -= 1
        if end == start:
            end = min(start + PIECE_BYTES, len(raw))
        piece = raw[start:end]
        chars = len(piece.decode("utf-8", "replace"))
        pieces.append({"task_id": task_id, "first_char": first_char, "chars": chars, "data": zlib.compress(piece)})
        first_char, start = first_char + chars, end
    return first_char, pieces


def batches(conn: sa.Connection, column: str, done: str) -> Iterator[Sequence[Any]]:
    """Batches of (id, `column`) of the tasks with `column` set and not converted yet (`done`
    NULL), by id (never all at once)."""
    after = ""
    query = sa.text(f"SELECT id, {column} AS stored FROM tasks WHERE {column} IS NOT NULL AND {done} IS NULL "
                    "AND id > :after ORDER BY id LIMIT :batch")
    while rows := conn.execute(query, {"after": after, "batch": BATCH}).all():
        yield rows
        after = rows[-1].id


def table(name: str, *columns: str) -> sa.TableClause:
    return sa.table(name, *(sa.column(column) for column in columns))


CHUNKS = table("result_chunks", "task_id", "first_host", "host_count", "first_key", "last_key", "data")
PIECES = table("report_pieces", "task_id", "first_char", "chars", "data")


def convert_results(conn: sa.Connection) -> None:
    update = sa.text("UPDATE tasks SET result = :head, result_hosts = :hosts WHERE id = :id")
    for rows in batches(conn, "result", "result_hosts"):
        heads, parts = [], []
        for row in rows:
            result = json.loads(row.stored)
            hosts = result.get("hosts", [])
            heads.append({"id": row.id, "head": dumped(result | {"hosts": []}), "hosts": len(hosts)})
            parts.extend(chunk_rows(row.id, hosts))
        conn.execute(update, heads)
        if parts:
            conn.execute(sa.insert(CHUNKS), parts)


def convert_reports(conn: sa.Connection) -> None:
    update = sa.text("UPDATE tasks SET report_chars = :chars WHERE id = :id")
    for rows in batches(conn, "raw_xml", "report_chars"):
        lengths, pieces = [], []
        for row in rows:
            chars, rows_of_task = report_rows(row.id, zlib.decompress(row.stored))
            lengths.append({"id": row.id, "chars": chars})
            pieces.extend(rows_of_task)
        conn.execute(update, lengths)
        if pieces:
            conn.execute(sa.insert(PIECES), pieces)


def upgrade() -> None:
    op.create_table(
        "result_chunks",
        sa.Column("task_id", sa.String(36), primary_key=True),
        sa.Column("first_host", sa.Integer, primary_key=True),
        sa.Column("host_count", sa.Integer, nullable=False),
        sa.Column("first_key", sa.String(33), nullable=False),
        sa.Column("last_key", sa.String(33), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "report_pieces",
        sa.Column("task_id", sa.String(36), primary_key=True),
        sa.Column("first_char", sa.BigInteger, primary_key=True),
        sa.Column("chars", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.add_column("tasks", sa.Column("result_hosts", sa.Integer))
    op.add_column("tasks", sa.Column("report_chars", sa.BigInteger))
    conn = op.get_bind()
    conn.execute(sa.text("UPDATE tasks SET result = NULL WHERE parent_id IN "
                         "(SELECT id FROM tasks WHERE shard_count > 0 AND result IS NOT NULL)"))
    convert_results(conn)
    convert_reports(conn)
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("raw_xml")


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("raw_xml", sa.LargeBinary))
    conn = op.get_bind()
    for task_id, head in conn.execute(sa.text("SELECT id, result FROM tasks WHERE result_hosts IS NOT NULL")).all():
        hosts = [host for data in conn.execute(sa.select(CHUNKS.c.data).where(CHUNKS.c.task_id == task_id)
                                               .order_by(CHUNKS.c.first_host)).scalars()
                 for host in json.loads(zlib.decompress(data))]
        conn.execute(sa.text("UPDATE tasks SET result = :result WHERE id = :id"),
                     {"id": task_id, "result": dumped(json.loads(head) | {"hosts": hosts})})
    for (task_id,) in conn.execute(sa.text("SELECT id FROM tasks WHERE report_chars IS NOT NULL")).all():
        raw = b"".join(zlib.decompress(data) for data in conn.execute(
            sa.select(PIECES.c.data).where(PIECES.c.task_id == task_id).order_by(PIECES.c.first_char)).scalars())
        conn.execute(sa.text("UPDATE tasks SET raw_xml = :raw WHERE id = :id"),
                     {"id": task_id, "raw": zlib.compress(raw)})
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("report_chars")
        batch.drop_column("result_hosts")
    op.drop_table("report_pieces")
    op.drop_table("result_chunks")
