"""The schema: the tasks table, the task status machine, and the result models."""

from __future__ import annotations

import enum

from pydantic import BaseModel, Field
from sqlalchemy import Column, Float, Index, Integer, LargeBinary, MetaData, String, Table, Text


class TaskStatus(enum.StrEnum):
    """Lifecycle of a scan task.

    queued -> running -> completed | failed | cancelled
    queued -> cancelled
    running -> interrupted   (the process running it died; the scan is never re-run)
    """

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def finished(self) -> bool:
        return self not in (TaskStatus.QUEUED, TaskStatus.RUNNING)


TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.QUEUED: frozenset({TaskStatus.RUNNING, TaskStatus.CANCELLED}),
    TaskStatus.RUNNING: frozenset(
        {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.INTERRUPTED}
    ),
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
    TaskStatus.INTERRUPTED: frozenset(),
}


class ScanKind(enum.StrEnum):
    """Which tool created a task; fixes how its nmap argv was built."""

    QUICK = "quick"
    FULL = "full"
    CUSTOM = "custom"


metadata = MetaData()

# Times are Unix epoch seconds (float): portable across SQLite and PostgreSQL and cheap to
# compare in the heartbeat and reaper queries.
tasks = Table(
    "tasks",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("owner", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("target", Text, nullable=False),
    Column("argv", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("time_limit", Integer, nullable=False),
    Column("worker_id", String(64)),
    Column("heartbeat_at", Float),
    Column("pid", Integer),
    Column("result", Text),
    Column("raw_xml", LargeBinary),
    Column("error", Text),
    Index("ix_tasks_status_created", "status", "created_at"),
    Index("ix_tasks_owner_created", "owner", "created_at"),
)


class PortResult(BaseModel):
    """One scanned port of one host."""

    port: int
    protocol: str
    state: str
    service: str = Field(description="Service name nmap reports, '' when unknown")
    version: str = Field(description="Product and version when detected, else ''")


class HostResult(BaseModel):
    """One host nmap reported on."""

    address: str
    status: str
    hostnames: list[str]
    ports: list[PortResult]


class ScanResult(BaseModel):
    """Parsed nmap output for one task, in the shape the seed service documents."""

    target: str
    scan_time: float = Field(description="Seconds nmap ran")
    hosts_up: int
    hosts_total: int
    hosts: list[HostResult]


class TaskAnswer(BaseModel):
    """What a scan or task tool returns: the result when finished, else how to poll."""

    status: TaskStatus
    task_id: str
    kind: ScanKind
    target: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    message: str | None = None
    error: str | None = None
    result: ScanResult | None = None


class TaskList(BaseModel):
    """A page of the caller's tasks, newest first."""

    tasks: list[TaskAnswer]
