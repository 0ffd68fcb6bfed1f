"""The task store: every SQL statement of the service, and how processes hear of changes.

A task is inserted `queued` (identical calls share one task through a unique dedupe key),
claimed by one guarded statement that gives a worker a lease, marked started just before
nmap starts, and finished by a guarded update. Everything a caller can see (progress, the
hosts finished so far, the result) is written here as it happens, so every process reads
the same truth. A task whose lease expired is resolved by any process: queued again if
nmap never started, interrupted if it had.

Processes hear of changes through `ChangeFeed`: in-process events first, then PostgreSQL's
LISTEN/NOTIFY, or on SQLite (one machine) a cheap check of `PRAGMA data_version`.

Database calls use SQLAlchemy Core on a synchronous engine, one worker-thread hand-off per
operation: measured here, several times faster per lookup than the async ORM.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
import zlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import psycopg
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import (
    Connection,
    Engine,
    String,
    Table,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    literal_column,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import DisconnectionError, IntegrityError, InterfaceError, OperationalError, SQLAlchemyError

from config import Limits
from inventory import HostQuery, network_bounds, plan_update
from models import (
    ACTIVE_STATUSES,
    HostDetail,
    InventoryHost,
    InventoryPort,
    Progress,
    ScanKind,
    ScanResult,
    TaskStatus,
    inventory_hosts,
    inventory_ports,
    leases,
    schedule_runs,
    schedules,
    task_hosts,
    tasks,
    usage_minutes,
    workers,
)
from nmap_report import build_result, merge_results
from scanner import ScanOutcome
from targets import parse_literal

logger = logging.getLogger(__name__)
T = TypeVar("T")

MIGRATIONS = Path(__file__).with_name("migrations")
NOTIFY_CHANNEL = "nmap_mcp"
# The change-feed key of the schedules: a new one wakes the process holding the scheduler lease.
SCHEDULES_KEY = "schedules"
# Run states in which a schedule's run is still going: fired, and its scan not yet finished.
RUNS_GOING = ("pending", "submitted")
# Constant keys for pg_advisory_xact_lock: submissions take the first, so that the queue bound
# and the limits are exact; inventory updates the second (with the owner), one at a time.
_SUBMIT_LOCK = 7_301_001
_INVENTORY_LOCK = 7_301_002
# How often SQLite's data_version is checked for commits made by other processes (and how
# often everyone re-reads while PostgreSQL's notifications cannot be heard).
SQLITE_POLL_SECONDS = 0.5
# Threads for database calls, per database (the engines' pools hold at least as many
# connections). SQLite writes one at a time, and more threads only contend for its lock and the
# GIL: with 4 instead of 12, bench/quick_scans_200.py ran 10% faster (server CPU 12.8 -> 11.0 ms
# per scan). PostgreSQL serves many at once.
DB_THREADS = {"sqlite": 4, "postgresql": 12}
# A pooled PostgreSQL connection unused this long is pinged before it is used again.
PING_IDLE_SECONDS = 1.0
# At most this many task reads in one query (far below SQLite's limit of bound parameters).
READ_BATCH = 500
_SUMMARY_COLUMNS = [c for c in tasks.c if c.name not in ("result", "raw_xml")]
_RESULT_COLUMNS = [c for c in tasks.c if c.name != "raw_xml"]
_INTERRUPTED = "the worker running this scan stopped before it finished; submit it again"

# ---- the statements every scan runs, built once ------------------------------------------
# Building a SQLAlchemy statement and its cache key costs several times more than running it
# (measured: a task read built per call 185 us, the same read built once 22 us, SQLite), and a
# scan runs a dozen of them; so these are built here, with bound parameters named `p_*`
# (never a column's name: those are the SET clause's).
_P = {name: bindparam(f"p_{name}") for name in ("id", "owner", "worker", "pool", "parent")}
_NOTIFY = select(func.pg_notify(NOTIFY_CHANNEL, bindparam("p_key", type_=String)))
_TAKE_SUBMIT_LOCK = select(func.pg_advisory_xact_lock(_SUBMIT_LOCK))
_TAKE_INVENTORY_LOCK = select(func.pg_advisory_xact_lock(_INVENTORY_LOCK, func.hashtext(_P["owner"])))
# A shareable scan's twin: the same call queued or running, or completed recently enough.
_ACTIVE_TWIN = select(*_SUMMARY_COLUMNS).where(tasks.c.dedupe_key == bindparam("p_dedupe_key"))
_FRESH_TWIN = (
    select(*_SUMMARY_COLUMNS)
    .where(tasks.c.owner == _P["owner"], tasks.c.kind == bindparam("p_kind"), tasks.c.argv == bindparam("p_argv"),
           tasks.c.status == TaskStatus.COMPLETED.value, tasks.c.finished_at >= bindparam("p_fresh_since"),
           tasks.c.parent_id.is_(None))
    .order_by(tasks.c.finished_at.desc())
    .limit(1)
)
_COUNT_WAITING = select(func.count().label("waiting")).select_from(tasks).where(
    tasks.c.status == TaskStatus.QUEUED.value, tasks.c.shard_count == 0)
_INSERT_TASKS = insert(tasks)
_READ_TASK = select(*_RESULT_COLUMNS).where(tasks.c.id == _P["id"], tasks.c.owner == _P["owner"],
                                            tasks.c.parent_id.is_(None))
_READ_TASKS = select(*_SUMMARY_COLUMNS).where(tasks.c.id.in_(bindparam("p_ids", expanding=True)),
                                              tasks.c.parent_id.is_(None))
_OURS = (tasks.c.id == _P["id"]) & (tasks.c.worker_id == _P["worker"])
_RUNNING_OURS = _OURS & (tasks.c.status == TaskStatus.RUNNING.value)
_STILL_OURS = select(tasks.c.id).where(_RUNNING_OURS)
# The oldest queued tasks, chosen once: PostgreSQL may run an `IN (SELECT ... LIMIT n FOR
# UPDATE SKIP LOCKED)` subquery again per row it updates, each time skipping the rows it just
# locked, and so claim more than n (seen: 4 scans on 2 slots). A MATERIALIZED CTE runs once.
_OLDEST_QUEUED = (
    select(tasks.c.id)
    .where(tasks.c.status == TaskStatus.QUEUED.value, tasks.c.pool == _P["pool"], tasks.c.shard_count == 0)
    .order_by(tasks.c.created_at).limit(bindparam("p_limit")).with_for_update(skip_locked=True)
    .cte("oldest_queued").prefix_with("MATERIALIZED")
)
_CLAIM = (
    update(tasks)
    .where(tasks.c.id == _OLDEST_QUEUED.c.id, tasks.c.status == TaskStatus.QUEUED.value)
    .values(status=TaskStatus.RUNNING.value)
    .returning(*_SUMMARY_COLUMNS)
)
_CLAIM_PARENT = update(tasks).where(tasks.c.id == _P["parent"], tasks.c.status == TaskStatus.QUEUED.value) \
    .values(status=TaskStatus.RUNNING.value)
# Start, progress and verdict of a scan this worker runs; what they set is in their parameters.
_UPDATE_RUNNING_OURS = update(tasks).where(_RUNNING_OURS)
# The verdict returns the row it wrote: a waiting call in this process needs no read of it.
_RECORD_VERDICT = _UPDATE_RUNNING_OURS.returning(*_RESULT_COLUMNS)
_MARK_PARENT_STARTED = update(tasks).where(tasks.c.id == _P["parent"], tasks.c.started_at.is_(None))
_INSERT_LIVE_HOSTS = insert(task_hosts)
_KEEP_FOUND = update(tasks).where(_OURS, tasks.c.status == TaskStatus.CANCELLED.value, tasks.c.result.is_(None))
_DELETE_LIVE_HOSTS = delete(task_hosts).where(task_hosts.c.task_id == _P["id"])
# What a token's top-level tasks use of its limits, none of it growing with the tasks of a
# window: the windows' usage from usage_minutes (see `_windowed`), and the queued and running
# tasks (index range scans that read no row on SQLite, see models.tasks; one status at a time:
# given `status IN (...)`, PostgreSQL read every task of the token).
_TOP_LEVEL_OF_OWNER = (tasks.c.owner == _P["owner"]) & tasks.c.parent_id.is_(None)


def _top_level_in(status: TaskStatus) -> Any:
    return select(func.count()).where(_TOP_LEVEL_OF_OWNER, tasks.c.status == status.value).scalar_subquery()


def _windowed(bucketed: Any, from_tasks: Any, window: str, *counted: Any) -> Any:
    """A window's usage, exactly: the minutes after its first one from usage_minutes, and the
    part of its first minute inside the window from the tasks themselves (see usage_params)."""
    minutes = select(func.coalesce(func.sum(bucketed), 0)).where(
        usage_minutes.c.owner == _P["owner"], usage_minutes.c.minute > bindparam(f"p_{window}_first_minute"))
    first_minute = select(from_tasks).where(
        _TOP_LEVEL_OF_OWNER, *counted, tasks.c.created_at > bindparam(f"p_{window}_ago"),
        tasks.c.created_at < bindparam(f"p_{window}_first_minute_end"))
    return minutes.scalar_subquery() + first_minute.scalar_subquery()


_USAGE = select(
    _windowed(usage_minutes.c.scans, func.count(), "minute").label("scans_per_minute"),
    (_top_level_in(TaskStatus.QUEUED) + _top_level_in(TaskStatus.RUNNING)).label("concurrent_scans"),
    _windowed(usage_minutes.c.addresses, func.coalesce(func.sum(tasks.c.address_count), 0), "day")
    .label("addresses_per_day"),
    _windowed(usage_minutes.c.rescans, func.count(), "hour", tasks.c.forced.is_(True)).label("rescans_per_hour"),
)


def usage_params(owner: str, now: float) -> dict[str, Any]:
    """The parameters of _USAGE at `now`. A window's first minute is the one its start falls in."""
    params: dict[str, Any] = {"p_owner": owner}
    for window, seconds in (("minute", 60), ("hour", 3600), ("day", 86_400)):
        first = int((now - seconds) // 60)
        params |= {f"p_{window}_ago": now - seconds, f"p_{window}_first_minute": first,
                   f"p_{window}_first_minute_end": (first + 1) * 60.0}
    return params


def _add_usage(dialect_insert: Callable[[Table], Any]) -> Any:
    statement = dialect_insert(usage_minutes)
    return statement.on_conflict_do_update(index_elements=["owner", "minute"], set_={
        name: usage_minutes.c[name] + statement.excluded[name] for name in ("scans", "addresses", "rescans")})


# Each dialect's INSERT, for the upserts (ON CONFLICT is spelled the same, built by each).
_DIALECT_INSERTS = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}
# A new top-level task's part of its owner's usage, added to its minute.
_ADD_USAGE = {dialect: _add_usage(dialect_insert) for dialect, dialect_insert in _DIALECT_INSERTS.items()}
# A submit checked against limits reads the usage and the queue's length in one statement.
_USAGE_AND_WAITING = _USAGE.add_columns(_COUNT_WAITING.scalar_subquery().label("waiting"))
# The inventory a completed scan folds into (see `_fold_into_inventory`).
_KNOWN_HOSTS = select(inventory_hosts).where(
    inventory_hosts.c.owner == _P["owner"],
    inventory_hosts.c.address_key.between(bindparam("p_low"), bindparam("p_high")))
_KNOWN_PORTS = select(inventory_ports).where(
    inventory_ports.c.owner == _P["owner"], inventory_ports.c.address.in_(bindparam("p_addresses", expanding=True)))


def _upsert(dialect_insert: Callable[[Table], Any], table: Table) -> Any:
    """INSERT of whole rows that replaces the row of the same key, in one statement (the
    same syntax on SQLite and PostgreSQL, built by each one's dialect)."""
    statement = dialect_insert(table)
    key = [column.name for column in table.primary_key]
    return statement.on_conflict_do_update(
        index_elements=key, set_={c.name: statement.excluded[c.name] for c in table.c if c.name not in key})


_WRITE_INVENTORY_ROWS = {
    dialect: {table: _upsert(dialect_insert, table) for table in (inventory_hosts, inventory_ports)}
    for dialect, dialect_insert in _DIALECT_INSERTS.items()
}


class TaskNotFound(LookupError):
    """No task with that id belongs to the caller."""


class QueueFull(RuntimeError):
    """The queue already holds max_queued_tasks waiting tasks."""


class TaskAlreadyFinished(RuntimeError):
    """The task finished before it could be cancelled."""


class DatabaseUnavailable(RuntimeError):
    """The task database cannot be reached (or is locked past its busy timeout)."""


class _InventoryRefused(RuntimeError):
    """The database refused the inventory rows of a completed scan (its transaction is lost)."""


class RateLimited(RuntimeError):
    """A limit of the caller's token would be passed; the message names it and when to retry."""


# What each limit counts over, in seconds (None: what is queued or running now).
LIMIT_WINDOWS: dict[str, float | None] = {
    "scans_per_minute": 60.0, "concurrent_scans": None, "addresses_per_day": 86_400.0, "rescans_per_hour": 3600.0,
}


class ScheduleNotFound(LookupError):
    """No schedule with that id belongs to the caller."""


class RunAlreadyQueued(RuntimeError):
    """A schedule's run already has its task (queued by another process), or was deleted."""


@dataclass(frozen=True)
class TaskRecord:
    """One row of the tasks table, as callers and workers see it."""

    id: str
    owner: str
    kind: ScanKind
    target: str
    argv: list[str]
    status: TaskStatus
    time_limit: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    pool: str = "default"
    worker_name: str | None = None
    parent_id: str | None = None
    shard_count: int = 0
    progress: Progress | None = None
    result: ScanResult | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        """The change-feed keys a change of this task wakes: itself, and its parent."""
        return (self.id, self.parent_id) if self.parent_id else (self.id,)


class Submitted(NamedTuple):
    """What `submit` did: the caller's task, whether it was an identical one reused, and the
    queued task it leased to `claim_for` (the pool's oldest: the new one, or an older one)."""

    record: TaskRecord
    reused: bool
    claimed: TaskRecord | None = None


@dataclass(frozen=True)
class Shard:
    """One part of a big scan: what it covers (for display) and its own argv."""

    target: str
    argv: list[str]


@dataclass(frozen=True)
class WorkerInfo:
    """A scan worker: a random id (never a pid), a human name, its pool and capacity."""

    id: str
    name: str
    pool: str
    capacity: int


@dataclass(frozen=True)
class PoolStatus:
    """A pool as list_workers shows it."""

    pool: str
    queued: int
    workers: list[dict[str, Any]]
    running: int = 0


@dataclass(frozen=True)
class ScheduleRecord:
    """One row of the schedules table."""

    id: str
    owner: str
    kind: ScanKind
    spec: str
    every: str
    created_at: float
    next_run_at: float
    webhook_url: str | None
    webhook_secret: str | None


@dataclass(frozen=True)
class RunRecord:
    """One row of the schedule_runs table."""

    id: str
    schedule_id: str
    due_at: float
    status: str
    task_id: str | None
    error: str | None
    finished_at: float | None
    previous_task_id: str | None
    diff: str | None
    webhook_status: str | None
    webhook_attempts: int
    webhook_next_at: float | None
    webhook_error: str | None


@dataclass(frozen=True)
class ScheduleState:
    """A schedule with its latest run (and that run's task status) and its latest change."""

    schedule: ScheduleRecord
    last_run: RunRecord | None
    last_task_status: str | None
    last_change: RunRecord | None


@dataclass(frozen=True)
class SchedulerWork:
    """What the scheduler has to do now: schedules due (none with a run still going), runs
    fired but not yet queued, runs whose task finished, webhooks due; and the next due time."""

    due: list[ScheduleRecord]
    unsubmitted: list[RunRecord]
    finished: list[RunRecord]
    webhooks: list[RunRecord]
    schedules: dict[str, ScheduleRecord]
    next_due: float | None


def dedupe_key(owner: str, kind: ScanKind, argv: Sequence[str]) -> str:
    """Identical calls: the same caller, tool and canonical nmap argv."""
    return hashlib.sha256(json.dumps([owner, kind.value, list(argv)]).encode()).hexdigest()


def create_db_engine(url: str) -> Engine:
    """An engine for `url`. SQLite files are created mode 0600 and get WAL mode, a busy
    timeout, and `BEGIN IMMEDIATE` for writing transactions (see `_sqlite_begin`)."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if not url.startswith("sqlite"):
        engine = create_engine(url, pool_size=DB_THREADS["postgresql"], max_overflow=8)
        event.listen(engine, "checkin", _note_checkin)
        event.listen(engine, "checkout", partial(_ping_if_idle, engine.dialect))
        return engine
    database = make_url(url).database
    if database and database != ":memory:":
        _create_private(Path(database))
    engine = create_engine(url, connect_args={"timeout": 5.0}, pool_size=DB_THREADS["sqlite"], max_overflow=4)
    event.listen(engine, "connect", _sqlite_pragmas)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info["checked_in_at"] = time.monotonic()


def _ping_if_idle(dialect: Any, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """PostgreSQL: a pooled connection idle for PING_IDLE_SECONDS is pinged before use; one
    that does not answer is replaced by a new one (the pool retries on DisconnectionError).
    pool_pre_ping pinged at every checkout: a round trip more for every operation, four or
    five per scan. A connection that dies within the idle time fails its one operation,
    with DatabaseUnavailable, and the pool is renewed."""
    checked_in_at = record.info.get("checked_in_at")
    if checked_in_at is None or time.monotonic() - checked_in_at < PING_IDLE_SECONDS:
        return
    try:
        dialect.do_ping(dbapi_connection)
    except psycopg.Error as e:
        raise DisconnectionError("the pooled connection did not answer its ping") from e


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only, unless it already exists."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Transactions are begun by _sqlite_begin, not by the driver's own implicit BEGIN.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    # A writing transaction that reads first must hold the write lock from its start: in WAL
    # mode a deferred one that read an older snapshot fails at its first write. Sent on the
    # driver's connection: through SQLAlchemy's statement machinery the BEGIN cost as much as
    # the statements after it (4% of the server's CPU per quick scan). Its errors come
    # unwrapped, as sqlite3's own (see `TaskManager._db`).
    begin = "BEGIN IMMEDIATE" if conn.get_execution_options().get("writing") else "BEGIN"
    conn.connection.driver_connection.execute(begin).close()  # type: ignore[union-attr]


def upgrade_schema(engine: Engine) -> None:
    """Bring the database to the newest schema; a database of 0.1.0 (made without
    migrations) is recognised and upgraded in place. Concurrent starts take turns."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    with _migration_lock(engine), engine.connect() as conn:
        conn.execution_options(writing=True)
        with conn.begin():
            if engine.dialect.name == "postgresql":
                conn.execute(select(func.pg_advisory_xact_lock(_SUBMIT_LOCK)))
            config.attributes["connection"] = conn
            tables = set(inspect(conn).get_table_names())
            if "tasks" in tables and "alembic_version" not in tables:
                command.stamp(config, "0001")
            command.upgrade(config, "head")


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """SQLite: processes starting together migrate one at a time, by flock() on a file beside
    the database. Not on the database file itself: closing any descriptor of that file drops
    every POSIX lock this process holds on it, SQLite's included, and without its shared lock
    another process that closes its last connection deletes the WAL under this one's writes."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    with open(os.open(f"{database}.lock", os.O_RDWR | os.O_CREAT, 0o600), "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


class Change(asyncio.Event):
    """Set whenever its key changes. `verdict`: the task as its verdict wrote it, when this
    process wrote it (see ChangeFeed.publish_verdict)."""

    verdict: TaskRecord | None = None


class ChangeFeed:
    """Wakes whoever waits on a key (a task id, or `queue:<pool>`) when it changes, in any
    process. In-process writers publish directly; other processes are heard through
    PostgreSQL NOTIFY, or on SQLite by a commit counter that changes with every commit.

    A notification's payload is `<origin> <key>` (see `heard_key`)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.origin = uuid.uuid4().hex
        self._events: dict[str, set[Change]] = defaultdict(set)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        # A thread of its own, which alone uses its connection: it blocks on the socket
        # (PostgreSQL) or sleeps between checks (SQLite) for as long as the process lives.
        self._listener: threading.Thread | None = None

    @contextlib.contextmanager
    def subscribe(self, key: str) -> Iterator[Change]:
        """An event set whenever `key` changes, for the duration of the block."""
        changed = Change()
        self._events[key].add(changed)
        try:
            yield changed
        finally:
            self._events[key].discard(changed)
            if not self._events[key]:
                del self._events[key]

    def publish(self, *keys: str) -> None:
        for key in keys:
            for changed in self._events.get(key, ()):
                changed.set()

    def publish_verdict(self, record: TaskRecord) -> None:
        """A task of this process finished: its waiters here get the row as it was written."""
        for changed in self._events.get(record.id, ()):
            changed.verdict = record
        self.publish(*record.keys)

    def wake_all(self) -> None:
        """Something may have changed that we could not hear of (a reconnect, SQLite)."""
        for events in self._events.values():
            for changed in events:
                changed.set()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        target = {"postgresql": self._listen, "sqlite": self._poll_sqlite}.get(self._engine.dialect.name)
        if target is not None:
            self._listener = threading.Thread(target=target, name="change-feed", daemon=True)
            self._listener.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            await asyncio.to_thread(self._listener.join, 5)

    def _listen(self) -> None:
        """PostgreSQL: a dedicated connection LISTENs. While it cannot, everyone is woken every
        half second to read for themselves, so that nothing waits on a notification that
        cannot come; it reconnects as often."""
        url = self._engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        lost = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    if lost:
                        logger.info("change feed reconnected")
                    lost = False
                    self._call(self.wake_all)  # whatever happened while we were not listening
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            key = heard_key(note.payload, self.origin)
                            if key is not None:
                                self._call(self.publish, key)
            except psycopg.Error as e:
                if not lost:
                    logger.warning("change feed lost its database connection (%s); retrying", type(e).__name__)
                lost = True
                self._call(self.wake_all)
                self._stop.wait(SQLITE_POLL_SECONDS)

    def _call(self, fn: Callable[..., None], *args: str) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed under us at shutdown
            self._loop.call_soon_threadsafe(fn, *args)

    def _poll_sqlite(self) -> None:
        """SQLite: `PRAGMA data_version` changes whenever another connection commits."""
        with self._engine.connect() as conn:
            last = None
            while not self._stop.is_set():
                try:
                    version = conn.exec_driver_sql("PRAGMA data_version").scalar_one()
                    conn.rollback()
                except OperationalError:
                    version = None
                if version != last:
                    last = version
                    self._call(self.wake_all)
                self._stop.wait(SQLITE_POLL_SECONDS)


def heard_key(payload: str, origin: str) -> str | None:
    """The key a notification's payload `<origin> <key>` names; None for one sent by this
    process (origin `origin`), whose writers published it here already: heard again, it would
    cost every waiter on the key one more read. A payload without an origin, from an older
    release, is a key."""
    sender, _, key = payload.rpartition(" ")
    return None if sender == origin else key


class TaskManager:
    """The durable store of scan tasks; see the module docstring for its guarantees."""

    def __init__(
        self, engine: Engine, *, max_queued: int, lease_seconds: float = 30.0,
        on_unavailable: Callable[[str], None] = lambda _operation: None,
    ) -> None:
        self._engine = engine
        # Its connections begin writing transactions (see `_sqlite_begin`); made once, as
        # setting the option per transaction cost more than the BEGIN itself.
        self._writer = engine.execution_options(writing=True)
        # Told the operation each time the database cannot be reached (metrics count them).
        self._on_unavailable = on_unavailable
        self._max_queued = max_queued
        self.lease_seconds = lease_seconds
        self._postgres = engine.dialect.name == "postgresql"
        self.feed = ChangeFeed(engine)
        self._threads = ThreadPoolExecutor(max_workers=DB_THREADS[engine.dialect.name], thread_name_prefix="db")
        # Task reads waiting for the next batch, and the task that serves them (see `get`).
        self._reads: list[tuple[str, str, asyncio.Future[TaskRecord]]] = []
        self._reader: asyncio.Task[None] | None = None
        # Tasks this process may have written finished hosts of (see `save_live`): only
        # their verdict needs to delete those rows, a statement saved for every other scan.
        self._live_hosts_of: set[str] = set()

    async def start(self) -> None:
        """Bring the schema up to date and start hearing of other processes' changes."""
        await self._db(upgrade_schema, self._engine)
        await self.feed.start()

    async def stop(self) -> None:
        await self.feed.stop()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        self._threads.shutdown(wait=True)
        self._engine.dispose()

    async def ping(self) -> None:
        """Raise DatabaseUnavailable unless the database answers."""
        await self._db(self._select_one_value)

    # ---- what callers do ---------------------------------------------------------------

    async def submit(
        self,
        owner: str,
        kind: ScanKind,
        target: str,
        argv: Sequence[str],
        time_limit: int,
        *,
        pool: str = "default",
        share: bool = False,
        fresh_since: float | None = None,
        shards: Sequence[Shard] = (),
        limits: Limits | None = None,
        address_count: int = 0,
        forced: bool = False,
        schedule_run: str | None = None,
        claim_for: WorkerInfo | None = None,
    ) -> Submitted:
        """Queue a scan (as shards when given), or with `share` return the caller's identical
        scan already queued or running, or completed since `fresh_since`. QueueFull when the
        queue is at its bound, RateLimited when a new task would pass one of `limits` (a
        reused task passes none). A `schedule_run` is linked to the task in the same
        transaction, once (RunAlreadyQueued otherwise).

        With `claim_for`, a worker of this process with a free slot, the same transaction
        also claims the pool's oldest queued task for it, as its claim loop would have: no
        second transaction, and no wake-up of any worker when nothing is left queued."""
        values = {
            "id": str(uuid.uuid4()), "owner": owner, "kind": kind.value, "target": target,
            "argv": json.dumps(list(argv)), "status": TaskStatus.QUEUED.value, "created_at": time.time(),
            "time_limit": time_limit, "pool": pool, "shard_count": len(shards), "parent_id": None,
            "dedupe_key": dedupe_key(owner, kind, argv) if share else None,
            "address_count": address_count, "forced": forced,
        }
        row, reused, claimed, left_queued = await self._db(
            self._submit, values, fresh_since, shards, limits, schedule_run, claim_for)
        if left_queued:
            self.feed.publish(f"queue:{pool}")
        return Submitted(_record(row), reused, claimed)

    async def get(self, task_id: str, owner: str, *, with_result: bool = False) -> TaskRecord:
        """The caller's task; TaskNotFound for a missing id and for another owner's id alike.

        Without the result, reads are batched: those that arrive while a batch is being read
        are read together next, in one query and one thread hand-off. Status polls come many
        at a time, and a hand-off per poll cost more than the query (bench/status_polling.py:
        a third of the server's CPU per poll on SQLite)."""
        if with_result:
            return await self._db(self._read, task_id, owner)
        read: asyncio.Future[TaskRecord] = asyncio.get_running_loop().create_future()
        self._reads.append((task_id, owner, read))
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._serve_reads(), name="task-reads")
        return await read

    async def _serve_reads(self) -> None:
        while self._reads:
            batch, self._reads = self._reads[:READ_BATCH], self._reads[READ_BATCH:]
            try:
                found = await self._db(self._read_many, sorted({task_id for task_id, _, _ in batch}))
            except Exception as e:  # noqa: BLE001 (DatabaseUnavailable, or a bug: every read of the batch gets it)
                for _, _, read in batch:
                    if not read.done():
                        read.set_exception(e)
                continue
            for task_id, owner, read in batch:
                record = found.get(task_id)
                if read.done():
                    continue  # its caller gave up
                if record is None or record.owner != owner:
                    read.set_exception(TaskNotFound(f"no task {task_id!r}"))
                else:
                    read.set_result(record)

    async def wait(
        self,
        task_id: str,
        owner: str,
        timeout: float,
        on_progress: Callable[[Progress], Awaitable[None]] | None = None,
        stop: asyncio.Event | None = None,
        *,
        known: TaskRecord | None = None,
    ) -> TaskRecord:
        """Wait up to `timeout` s (or until `stop` is set) for the task to finish, reporting
        progress as it changes; the scan goes on either way. Woken by the change feed; each
        wake-up reads the task once (with its result once it has finished).

        `known` is the task as the caller has just read it (as `submit` returned it): it is
        not read again before the first wake-up, a read per scan saved. A change made between
        that read and this subscription was not heard, so that first sleep is at most
        SQLITE_POLL_SECONDS."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        reported: Progress | None = None
        with self.feed.subscribe(task_id) as changed:
            while True:
                changed.clear()  # before reading, so a change after the read still wakes us
                verdict = changed.verdict if changed.verdict is not None and changed.verdict.owner == owner else None
                record = known or verdict or await self._db(self._read, task_id, owner)
                remaining = deadline - loop.time()
                if record.status.finished or remaining <= 0 or (stop is not None and stop.is_set()):
                    return record
                if on_progress is not None and record.progress is not None and record.progress != reported:
                    reported = record.progress
                    await on_progress(reported)
                await _first_of(changed, stop, remaining if known is None else min(remaining, SQLITE_POLL_SECONDS))
                known = None

    async def result_so_far(self, record: TaskRecord) -> ScanResult | None:
        """The final result, or the hosts finished so far (partial) while it runs or after it
        was stopped without one; None when there are none."""
        if record.result is not None:
            return record.result
        return await self._db(self._partial_result, record)

    async def raw_xml(self, task_id: str, owner: str) -> bytes | None:
        """nmap's XML report (for a sharded scan, each shard's report in turn); None while
        the task has none."""
        return await self._db(self._select_raw, task_id, owner)

    async def list(self, owner: str, status: TaskStatus | None, limit: int) -> list[TaskRecord]:
        """The caller's most recent tasks, newest first."""
        rows = await self._db(self._select_many, owner, status, limit)
        return [_record(row) for row in rows]

    async def list_all(self, status: TaskStatus | None, limit: int) -> list[TaskRecord]:
        """Every owner's most recent tasks, newest first (for operators)."""
        rows = await self._db(self._select_many, None, status, limit)
        return [_record(row) for row in rows]

    async def cancel(self, task_id: str, owner: str) -> TaskRecord:
        """Mark a queued or running task (and its shards) cancelled; the worker running it
        hears of it through the change feed and stops its nmap."""
        record, shard_ids = await self._db(self._cancel, task_id, owner)
        self.feed.publish(task_id, *shard_ids)
        return record

    async def find_hosts(self, owner: str, query: HostQuery, limit: int, offset: int) -> tuple[list[InventoryHost], int]:
        """A page of the owner's inventory hosts matching `query`, and how many match in all."""
        return await self._db(self._find_hosts, owner, query, limit, offset)

    async def top_values(self, owner: str, field: str, query: HostQuery, limit: int) -> list[tuple[str, int]]:
        """The owner's most common values of `field` (port, service, product, version, os, status)."""
        return await self._db(self._top_values, owner, field, query, limit)

    async def usage(self, owner: str) -> dict[str, int]:
        """What the caller's limits count now: scans running or queued, in the last minute,
        addresses in the last day, forced rescans in the last hour."""
        return await self._db(self._usage, owner)

    async def purge(self, before: float, batch: int = 500) -> dict[str, int]:
        """Delete finished tasks (with their shards and live rows), inventory rows last seen
        and usage counted before `before`, `batch` rows per transaction so that no lock is
        held for long. The limits look back a day at most: `before` is at least a day ago."""
        deleted = {"tasks": 0, "inventory_hosts": 0, "inventory_ports": 0, "usage_minutes": 0}
        for kind in deleted:
            while count := await self._db(self._purge_batch, kind, before, batch):
                deleted[kind] += count
        return deleted

    async def compact(self, free_share: float = 0.25) -> bool:
        """SQLite: VACUUM when at least `free_share` of the file is free pages; True if it did."""
        return await self._db(self._compact, free_share)

    async def pools(self, stale_after: float) -> list[PoolStatus]:
        """Per pool: its workers (alive when they beat within `stale_after` s) and its queue."""
        return await self._db(self._select_pools, stale_after)

    # ---- what workers do ---------------------------------------------------------------

    async def register_worker(self, worker: WorkerInfo) -> None:
        await self._db(self._beat_worker, worker, 0)

    async def unregister_worker(self, worker_id: str) -> None:
        await self._db(self._delete_worker, worker_id)

    async def claim(self, worker: WorkerInfo, pool: str, limit: int) -> list[TaskRecord]:
        """Up to `limit` of the pool's oldest queued tasks, oldest first, now leased to
        `worker`; fewer (or none) when the queue holds fewer."""
        return await self._db(self._claim, worker, pool, limit)

    async def mark_started(self, record: TaskRecord, worker_id: str) -> bool:
        """Record that nmap is about to start; False when the task is no longer ours."""
        return await self._db(self._mark_started, record, worker_id)

    async def release(self, record: TaskRecord, worker_id: str) -> None:
        """Give back a task we claimed but never started: it is queued again."""
        await self._db(self._release, record.id, worker_id)
        self.feed.publish(*record.keys, f"queue:{record.pool}")

    async def save_live(
        self, record: TaskRecord, worker_id: str, progress: Progress | None, first_seq: int, hosts: list[HostDetail]
    ) -> None:
        """Write a running scan's progress and the hosts it finished since the last call.
        Only the worker holding a task writes its hosts, from its start: the task is noted
        before the write, which may commit even when its answer is lost."""
        if hosts:
            self._live_hosts_of.add(record.id)
        await self._db(self._save_live, record.id, worker_id, progress, first_seq, hosts)
        self.feed.publish(*record.keys)

    async def finish(self, record: TaskRecord, worker_id: str, outcome: ScanOutcome) -> bool:
        """Record how the scan ended. False when the task was no longer ours to finish (it
        was cancelled, then only what it found is kept; or resolved by another process)."""
        verdict = await self._db(self._finish, record, worker_id, outcome, record.id in self._live_hosts_of)
        self._live_hosts_of.discard(record.id)
        if verdict is None or record.parent_id:
            self.feed.publish(*record.keys)
        else:
            self.feed.publish_verdict(verdict)
        return verdict is not None

    async def renew(self, worker: WorkerInfo, task_ids: Sequence[str]) -> set[str]:
        """Extend this worker's leases and heartbeat; return the ids no longer ours."""
        return await self._db(self._renew, worker, list(task_ids))

    async def still_ours(self, task_id: str, worker_id: str) -> bool:
        return await self._db(self._still_ours, task_id, worker_id)

    async def resolve_expired(self) -> tuple[int, int]:
        """Resolve tasks whose lease expired: (queued again, interrupted)."""
        requeued, interrupted = await self._db(self._resolve_expired)
        if requeued or interrupted:
            self.feed.wake_all()
        return len(requeued), len(interrupted)

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._threads, partial(fn, *args))
        except (OperationalError, InterfaceError, sqlite3.OperationalError) as e:
            self._on_unavailable(fn.__name__.lstrip("_"))
            raise DatabaseUnavailable("the task database is not reachable; retry later") from e

    # ---- SQL: every statement of the service lives below --------------------------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Connection]:
        with self._writer.connect() as conn, conn.begin():
            yield conn

    def _notify(self, conn: Connection, *keys: str | None) -> None:
        """NOTIFY other processes at commit (SQLite's commit counter needs nothing)."""
        if self._postgres:
            for key in filter(None, keys):
                conn.execute(_NOTIFY, {"p_key": f"{self.feed.origin} {key}"})

    def _relaxed_commit(self, conn: Connection) -> None:
        """PostgreSQL: this commit need not wait for its WAL flush; a lost claim or
        heartbeat is covered by the lease (a claim is re-done, a heartbeat is re-sent)."""
        if self._postgres:
            conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")

    def _select_one_value(self) -> None:
        with self._engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1").scalar_one()

    def _submit(
        self, values: dict[str, Any], fresh_since: float | None, shards: Sequence[Shard],
        limits: Limits | None, schedule_run: str | None, claim_for: WorkerInfo | None,
    ) -> tuple[Mapping[str, Any], bool, TaskRecord | None, bool]:
        """(the task's row, reused, the task claimed for `claim_for`, whether a task this
        submission queued is still queued)."""
        with self._writing() as conn:
            if self._postgres:
                conn.execute(_TAKE_SUBMIT_LOCK)
            if values["dedupe_key"] is not None:
                shared = self._select_shareable(conn, values, fresh_since)
                if shared is not None:
                    return shared, True, None, False
            if limits is None:
                waiting = conn.execute(_COUNT_WAITING).scalar_one()
            else:
                usage = self._usage_in(conn, values["owner"], values["created_at"], _USAGE_AND_WAITING)
                self._check_limits(conn, values, limits, usage)
                waiting = usage["waiting"]
            if waiting + max(len(shards), 1) > self._max_queued:
                raise QueueFull(
                    f"the scan queue is full ({self._max_queued} tasks waiting); "
                    "try again later or cancel queued tasks"
                )
            if schedule_run is not None:
                self._link_run(conn, schedule_run, values["id"])
            rows = [values, *self._shard_rows(values, shards)]
            conn.execute(_INSERT_TASKS, rows)
            conn.execute(_ADD_USAGE[self._engine.dialect.name], {
                "owner": values["owner"], "minute": int(values["created_at"] // 60), "scans": 1,
                "addresses": values["address_count"], "rescans": int(values["forced"])})
            claimed = self._claim_in(conn, claim_for, values["pool"], 1, values["created_at"]) if claim_for else []
            # What this submission queued (its task, or its shards: a parent is never claimed)
            # is still queued unless the claim took the one task it queued.
            took_own = bool(claimed) and claimed[0].id in {row["id"] for row in rows}
            left_queued = len(shards) > 1 or not took_own
            if left_queued:
                self._notify(conn, f"queue:{values['pool']}")
        return (values | {"started_at": None, "finished_at": None, "error": None}, False,
                claimed[0] if claimed else None, left_queued)

    def _select_shareable(
        self, conn: Connection, values: dict[str, Any], fresh_since: float | None
    ) -> Row[Any] | None:
        active = conn.execute(_ACTIVE_TWIN, {"p_dedupe_key": values["dedupe_key"]}).first()
        if active is not None or fresh_since is None:
            return active
        return conn.execute(_FRESH_TWIN, {"p_owner": values["owner"], "p_kind": values["kind"],
                                          "p_argv": values["argv"], "p_fresh_since": fresh_since}).first()

    def _check_limits(self, conn: Connection, values: dict[str, Any], limits: Limits, usage: dict[str, int]) -> None:
        """Raise RateLimited if the new task would pass a limit, given the owner's `usage`
        read in the submitting transaction (which submissions take one at a time, so limits
        hold across processes)."""
        owner, now = values["owner"], values["created_at"]
        problems = {
            "concurrent_scans": usage["concurrent_scans"] + 1 > limits.concurrent_scans,  # type: ignore[operator]
            "scans_per_minute": usage["scans_per_minute"] + 1 > limits.scans_per_minute,  # type: ignore[operator]
            "addresses_per_day": usage["addresses_per_day"] + values["address_count"]
                                  > limits.addresses_per_day,  # type: ignore[operator]
            "rescans_per_hour": values["forced"] and usage["rescans_per_hour"] + 1
                                 > limits.rescans_per_hour,  # type: ignore[operator]
        }
        name = next((name for name, passed in problems.items() if passed), None)
        if name is None:
            return
        limit = getattr(limits, name)
        label = name.replace("_per_", " per ").replace("_", " ")
        if name == "addresses_per_day" and values["address_count"] > limit:
            raise RateLimited(f"this scan covers {values['address_count']} addresses, more than the {limit} "
                              f"addresses per day of token '{owner}'; scan a smaller range")
        if name == "concurrent_scans":
            raise RateLimited(f"{limit} concurrent scans for token '{owner}'; retry when one of them has finished "
                              "(list_tasks shows them)")
        wait = self._retry_after(conn, owner, name, limit, values, now)
        raise RateLimited(f"{limit} {label} for token '{owner}'; retry in {max(1, round(wait))} s")

    @staticmethod
    def _usage_in(conn: Connection, owner: str, now: float, statement: Any = _USAGE) -> dict[str, int]:
        row = conn.execute(statement, usage_params(owner, now)).one()
        return {name: int(value) for name, value in row._mapping.items()}

    @staticmethod
    def _retry_after(conn: Connection, owner: str, name: str, limit: int, values: dict[str, Any], now: float) -> float:
        """Seconds until enough of the window's tasks have aged out for the new one to fit."""
        window = LIMIT_WINDOWS[name]
        assert window is not None
        counted = (tasks.c.owner == owner) & tasks.c.parent_id.is_(None) & (tasks.c.created_at > now - window)
        if name == "rescans_per_hour":
            counted &= tasks.c.forced.is_(True)
        rows = conn.execute(select(tasks.c.created_at, tasks.c.address_count).where(counted)
                            .order_by(tasks.c.created_at)).all()
        weight = [row.address_count if name == "addresses_per_day" else 1 for row in rows]
        need = sum(weight) + (values["address_count"] if name == "addresses_per_day" else 1) - limit
        for row, amount in zip(rows, weight, strict=True):
            need -= amount
            if need <= 0:
                return row.created_at + window - now
        return window

    def _usage(self, owner: str) -> dict[str, int]:
        with self._engine.connect() as conn:
            return self._usage_in(conn, owner, time.time())

    @staticmethod
    def _shard_rows(parent: dict[str, Any], shards: Sequence[Shard]) -> list[dict[str, Any]]:
        return [
            parent | {"id": str(uuid.uuid4()), "target": shard.target, "argv": json.dumps(shard.argv),
                      "parent_id": parent["id"], "shard_count": 0, "dedupe_key": None,
                      "created_at": parent["created_at"] + index * 1e-6}
            for index, shard in enumerate(shards)
        ]

    def _read(self, task_id: str, owner: str) -> TaskRecord:
        """One task with its result (which only a finished task has)."""
        with self._engine.connect() as conn:
            row = conn.execute(_READ_TASK, {"p_id": task_id, "p_owner": owner}).first()
            if row is None:
                raise TaskNotFound(f"no task {task_id!r}")
            return self._with_shard_progress(conn, _record(row))

    def _read_many(self, task_ids: list[str]) -> dict[str, TaskRecord]:
        """Top-level tasks by id, without their results (callers check the owner)."""
        with self._engine.connect() as conn:
            rows = conn.execute(_READ_TASKS, {"p_ids": task_ids}).all()
            return {row.id: self._with_shard_progress(conn, _record(row)) for row in rows}

    @staticmethod
    def _with_shard_progress(conn: Connection, record: TaskRecord) -> TaskRecord:
        """A sharded task that has not finished, with its shards' progress; any other as it is."""
        if not record.shard_count or record.status.finished:
            return record
        rows = conn.execute(select(tasks.c.status, tasks.c.progress).where(tasks.c.parent_id == record.id)).all()
        percents = [
            100.0 if TaskStatus(status).finished else (Progress.model_validate_json(p).percent if p else 0.0)
            for status, p in rows
        ]
        done = sum(TaskStatus(status).finished for status, _ in rows)
        return replace(record, progress=Progress(percent=round(sum(percents) / max(len(percents), 1), 1),
                                                 phase=f"{done} of {len(rows)} shards finished"))

    def _partial_result(self, record: TaskRecord) -> ScanResult | None:
        with self._engine.connect() as conn:
            if record.shard_count:
                shards = conn.execute(
                    select(tasks.c.id, tasks.c.result).where(tasks.c.parent_id == record.id)
                ).all()
                parts = [ScanResult.model_validate_json(r) for _, r in shards if r]
                ids = [task_id for task_id, r in shards if not r]
            else:
                parts, ids = [], [record.id]
            rows = conn.execute(
                select(task_hosts.c.data).where(task_hosts.c.task_id.in_(ids))
                .order_by(task_hosts.c.task_id, task_hosts.c.seq)
            ).scalars()
            hosts = [HostDetail.model_validate_json(data) for data in rows]
        if not record.shard_count:
            return build_result(record.target, hosts, None, complete=False) if hosts else None
        if hosts:
            parts.append(build_result(record.target, hosts, None, complete=False))
        if not parts:
            return None
        merged = merge_results(record.target, parts, (record.finished_at or time.time()) - record.created_at)
        return merged.model_copy(update={"partial": True})

    def _select_raw(self, task_id: str, owner: str) -> bytes | None:
        mine = (tasks.c.id == task_id) & (tasks.c.owner == owner)
        with self._engine.connect() as conn:
            row = conn.execute(select(tasks.c.raw_xml, tasks.c.shard_count).where(mine)).first()
            if row is None or not row.shard_count:
                return None if row is None or row.raw_xml is None else zlib.decompress(row.raw_xml)
            parts = conn.execute(
                select(tasks.c.raw_xml).where(tasks.c.parent_id == task_id).order_by(tasks.c.created_at)
            ).scalars()
            reports = [zlib.decompress(part) for part in parts if part is not None]
        return b"".join(reports) if reports else None

    def _select_many(self, owner: str | None, status: TaskStatus | None, limit: int) -> list[Row[Any]]:
        """Top-level tasks newest first: the owner's, or with owner None everyone's."""
        query = select(*_SUMMARY_COLUMNS).where(tasks.c.parent_id.is_(None))
        if owner is not None:
            query = query.where(tasks.c.owner == owner)
        if status is not None:
            query = query.where(tasks.c.status == status.value)
        query = query.order_by(tasks.c.created_at.desc()).limit(limit)
        with self._engine.connect() as conn:
            return list(conn.execute(query).all())

    def _cancel(self, task_id: str, owner: str) -> tuple[TaskRecord, list[str]]:
        now = time.time()
        with self._writing() as conn:
            mine = (tasks.c.id == task_id) & (tasks.c.owner == owner) & tasks.c.parent_id.is_(None)
            row = conn.execute(select(*_SUMMARY_COLUMNS).where(mine)).first()
            if row is None:
                raise TaskNotFound(f"no task {task_id!r}")
            record = _record(row)
            if record.status.finished:
                raise TaskAlreadyFinished(f"task {task_id} is already {record.status.value}")
            cancelled = {"status": TaskStatus.CANCELLED.value, "finished_at": now, "error": "cancelled",
                         "dedupe_key": None, "lease_expires_at": None}
            active = tasks.c.status.in_(ACTIVE_STATUSES)
            conn.execute(update(tasks).where((tasks.c.id == task_id) | (tasks.c.parent_id == task_id), active)
                         .values(**cancelled))
            shard_ids = self._shard_ids(conn, record)
            self._notify(conn, task_id, *shard_ids)
        return replace(record, status=TaskStatus.CANCELLED, finished_at=now, error="cancelled"), shard_ids

    @staticmethod
    def _shard_ids(conn: Connection, record: TaskRecord) -> list[str]:
        if not record.shard_count:
            return []
        return list(conn.execute(select(tasks.c.id).where(tasks.c.parent_id == record.id)).scalars())

    def _claim(self, worker: WorkerInfo, pool: str, limit: int) -> list[TaskRecord]:
        """No notification: nobody waits for a claim (a waiting call wakes for progress and
        the verdict, a worker for losing its task), and one per scan costs every waiter a read."""
        with self._writing() as conn:
            self._relaxed_commit(conn)
            return self._claim_in(conn, worker, pool, limit, time.time())

    def _claim_in(self, conn: Connection, worker: WorkerInfo, pool: str, limit: int, now: float) -> list[TaskRecord]:
        rows = conn.execute(_CLAIM, {"p_pool": pool, "p_limit": limit, "worker_id": worker.id,
                                     "worker_name": worker.name, "claimed_at": now,
                                     "lease_expires_at": now + self.lease_seconds}).all()
        records = sorted((_record(row) for row in rows), key=lambda record: record.created_at)
        for parent_id in sorted({record.parent_id for record in records if record.parent_id}):
            conn.execute(_CLAIM_PARENT, {"p_parent": parent_id, "claimed_at": now})
        return records

    def _mark_started(self, record: TaskRecord, worker_id: str) -> bool:
        """Not notified either, for the reason `_claim` gives."""
        now = time.time()
        with self._writing() as conn:
            started = conn.execute(_UPDATE_RUNNING_OURS,
                                   {"p_id": record.id, "p_worker": worker_id, "started_at": now}).rowcount == 1
            if started and record.parent_id:
                conn.execute(_MARK_PARENT_STARTED, {"p_parent": record.parent_id, "started_at": now})
        return started

    def _release(self, task_id: str, worker_id: str) -> None:
        with self._writing() as conn:
            conn.execute(
                update(tasks).where(tasks.c.id == task_id, tasks.c.worker_id == worker_id,
                                    tasks.c.status == TaskStatus.RUNNING.value, tasks.c.started_at.is_(None))
                .values(**_UNCLAIMED)
            )

    def _save_live(
        self, task_id: str, worker_id: str, progress: Progress | None, first_seq: int, hosts: list[HostDetail]
    ) -> None:
        with self._writing() as conn:
            ours = conn.execute(_UPDATE_RUNNING_OURS, {
                "p_id": task_id, "p_worker": worker_id, "progress": progress.model_dump_json() if progress else None,
            }).rowcount == 1
            if ours and hosts:
                conn.execute(_INSERT_LIVE_HOSTS, [
                    {"task_id": task_id, "seq": first_seq + i, "data": host.model_dump_json()}
                    for i, host in enumerate(hosts)
                ])
            self._notify(conn, task_id)

    def _finish(self, record: TaskRecord, worker_id: str, outcome: ScanOutcome, live_hosts: bool) -> TaskRecord | None:
        """The task as the verdict wrote it; None when it was no longer ours. `live_hosts`:
        this process may have written finished hosts of the task, which a result replaces.

        The inventory is folded in the same transaction; should the database refuse what
        the fold writes, the verdict is written again without it (a savepoint around the fold
        cost every scan two statements more, for a failure that is a bug)."""
        found = {
            "result": None if outcome.result is None else outcome.result.model_dump_json(),
            "raw_xml": zlib.compress(outcome.raw_xml) if outcome.raw_xml else None,
        }
        try:
            return self._write_verdict(record, worker_id, outcome, found, live_hosts, inventory=True)
        except _InventoryRefused:
            logger.exception("task %s: its result could not be added to the inventory", record.id)
            return self._write_verdict(record, worker_id, outcome, found, live_hosts, inventory=False)

    def _write_verdict(self, record: TaskRecord, worker_id: str, outcome: ScanOutcome, found: dict[str, Any],
                       live_hosts: bool, *, inventory: bool) -> TaskRecord | None:
        ours = {"p_id": record.id, "p_worker": worker_id}
        with self._writing() as conn:
            row = conn.execute(_RECORD_VERDICT, ours | found | {
                "status": outcome.status.value, "finished_at": time.time(), "error": outcome.error,
                "progress": None, "dedupe_key": None, "lease_expires_at": None,
            }).first()
            finished = row is not None
            if not finished:
                # Cancelled while it ran: keep what it found, not the verdict.
                conn.execute(_KEEP_FOUND, ours | found)
            if live_hosts and outcome.result is not None:
                conn.execute(_DELETE_LIVE_HOSTS, {"p_id": record.id})
            if inventory and finished and outcome.status is TaskStatus.COMPLETED and outcome.result is not None:
                self._update_inventory(conn, record, outcome.result)
            if record.parent_id:
                self._settle_parent(conn, record.parent_id)
            self._notify(conn, *record.keys)
        return _record(row) if row is not None else None

    def _settle_parent(self, conn: Connection, parent_id: str) -> None:
        """Once every shard has finished, give the parent its merged result and verdict."""
        # Locking the parent row serialises shards finishing at the same moment.
        parent = _record(conn.execute(select(*_SUMMARY_COLUMNS).where(tasks.c.id == parent_id)
                                      .with_for_update()).one())
        shards = conn.execute(select(tasks.c.status, tasks.c.result, tasks.c.error)
                              .where(tasks.c.parent_id == parent_id)).all()
        statuses = [TaskStatus(s.status) for s in shards]
        if not all(status.finished for status in statuses) or parent.status.finished:
            return
        parts = [ScanResult.model_validate_json(s.result) for s in shards if s.result]
        now = time.time()
        merged = merge_results(parent.target, parts, now - (parent.started_at or parent.created_at)) if parts else None
        status = next((s for s in (TaskStatus.FAILED, TaskStatus.INTERRUPTED, TaskStatus.CANCELLED)
                       if s in statuses), TaskStatus.COMPLETED)
        errors = sorted({f"shard {i + 1}: {s.error}" for i, s in enumerate(shards) if s.error})
        conn.execute(update(tasks).where(tasks.c.id == parent_id).values(
            status=status.value, finished_at=now, error="; ".join(errors) or None, dedupe_key=None,
            result=merged.model_dump_json() if merged else None,
        ))
        self._notify(conn, parent_id)

    def _renew(self, worker: WorkerInfo, task_ids: list[str]) -> set[str]:
        now = time.time()
        with self._writing() as conn:
            self._relaxed_commit(conn)
            self._beat_worker_in(conn, worker, len(task_ids))
            if not task_ids:
                return set()
            ours = (tasks.c.worker_id == worker.id) & (tasks.c.status == TaskStatus.RUNNING.value)
            conn.execute(update(tasks).where(ours, tasks.c.id.in_(task_ids))
                         .values(lease_expires_at=now + self.lease_seconds))
            still = set(conn.execute(select(tasks.c.id).where(ours, tasks.c.id.in_(task_ids))).scalars())
        return set(task_ids) - still

    def _still_ours(self, task_id: str, worker_id: str) -> bool:
        with self._engine.connect() as conn:
            return conn.execute(_STILL_OURS, {"p_id": task_id, "p_worker": worker_id}).first() is not None

    def _resolve_expired(self) -> tuple[list[str], list[str]]:
        now = time.time()
        expired = (tasks.c.status == TaskStatus.RUNNING.value) & (
            tasks.c.lease_expires_at.is_(None) | (tasks.c.lease_expires_at < now)
        ) & (tasks.c.shard_count == 0)
        with self._writing() as conn:
            requeued = conn.execute(
                update(tasks).where(expired, tasks.c.started_at.is_(None)).values(**_UNCLAIMED)
                .returning(tasks.c.id, tasks.c.pool)
            ).all()
            interrupted = conn.execute(
                update(tasks).where(expired, tasks.c.started_at.is_not(None))
                .values(status=TaskStatus.INTERRUPTED.value, finished_at=now, error=_INTERRUPTED,
                        dedupe_key=None, lease_expires_at=None)
                .returning(tasks.c.id, tasks.c.parent_id)
            ).all()
            for parent_id in sorted({row.parent_id for row in interrupted if row.parent_id}):
                self._settle_parent(conn, parent_id)
            self._notify(conn, *(row.id for row in interrupted), *(f"queue:{row.pool}" for row in requeued))
            conn.execute(delete(workers).where(workers.c.heartbeat_at < now - 10 * self.lease_seconds))
        if interrupted:
            logger.warning("%d task(s) whose worker stopped mid-scan marked interrupted", len(interrupted))
        return [row.id for row in requeued], [row.id for row in interrupted]

    def _beat_worker(self, worker: WorkerInfo, running: int) -> None:
        with self._writing() as conn:
            self._beat_worker_in(conn, worker, running)

    @staticmethod
    def _beat_worker_in(conn: Connection, worker: WorkerInfo, running: int) -> None:
        """Refresh the worker's row, or (first beat, or pruned while unreachable) insert it."""
        now = time.time()
        beat = conn.execute(update(workers).where(workers.c.id == worker.id)
                            .values(heartbeat_at=now, running=running)).rowcount
        if not beat:
            conn.execute(insert(workers).values(id=worker.id, name=worker.name, pool=worker.pool,
                                                capacity=worker.capacity, running=running, started_at=now,
                                                heartbeat_at=now))

    def _delete_worker(self, worker_id: str) -> None:
        with self._writing() as conn:
            conn.execute(delete(workers).where(workers.c.id == worker_id))

    def _select_pools(self, stale_after: float) -> list[PoolStatus]:
        now = time.time()
        with self._engine.connect() as conn:
            counts: dict[str, dict[str, int]] = defaultdict(dict)
            for pool, status, count in conn.execute(
                select(tasks.c.pool, tasks.c.status, func.count())
                .where(tasks.c.status.in_([TaskStatus.QUEUED.value, TaskStatus.RUNNING.value]),
                       tasks.c.shard_count == 0).group_by(tasks.c.pool, tasks.c.status)
            ):
                counts[status][pool] = count
            queued, running = counts[TaskStatus.QUEUED.value], counts[TaskStatus.RUNNING.value]
            rows = conn.execute(select(workers).order_by(workers.c.pool, workers.c.name)).all()
        by_pool: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            by_pool[row.pool].append({
                "name": row.name, "capacity": row.capacity, "running": row.running,
                "heartbeat_at": row.heartbeat_at, "alive": now - row.heartbeat_at <= stale_after,
            })
        return [PoolStatus(pool, queued.get(pool, 0), by_pool.get(pool, []), running.get(pool, 0))
                for pool in sorted({*queued, *running, *by_pool})]


    # ---- retention ---------------------------------------------------------------------

    def _purge_batch(self, kind: str, before: float, batch: int) -> int:
        with self._writing() as conn:
            if kind == "tasks":
                old = conn.execute(select(tasks.c.id).where(
                    tasks.c.parent_id.is_(None), tasks.c.status.not_in(ACTIVE_STATUSES),
                    tasks.c.finished_at < before).limit(batch)).scalars().all()
                family = (tasks.c.id.in_(old)) | (tasks.c.parent_id.in_(old))
                ids = conn.execute(select(tasks.c.id).where(family)).scalars().all()
                conn.execute(delete(task_hosts).where(task_hosts.c.task_id.in_(ids)))
                conn.execute(delete(tasks).where(family))
                return len(old)
            table, older = {
                "inventory_hosts": (inventory_hosts, inventory_hosts.c.last_seen < before),
                "inventory_ports": (inventory_ports, inventory_ports.c.last_seen < before),
                "usage_minutes": (usage_minutes, usage_minutes.c.minute < int(before // 60)),
            }[kind]
            key = [c for c in table.primary_key.columns]
            stale = select(*key).where(older).limit(batch)
            return conn.execute(delete(table).where(tuple_(*key).in_(stale))).rowcount

    def _compact(self, free_share: float) -> bool:
        if self._engine.dialect.name != "sqlite":
            return False
        with self._engine.connect() as conn:
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
            free = conn.exec_driver_sql("PRAGMA freelist_count").scalar_one()
            conn.rollback()
        if not pages or free / pages < free_share:
            return False
        # VACUUM cannot run inside a transaction: on the driver's own connection, which begins none.
        raw = self._engine.raw_connection()
        try:
            raw.driver_connection.execute("VACUUM")  # type: ignore[union-attr]
        finally:
            raw.close()
        return True

    # ---- the inventory (inventory.py decides, these statements read and write) ---------

    def _update_inventory(self, conn: Connection, record: TaskRecord, result: ScanResult) -> None:
        """Fold a completed scan into its owner's inventory, in the transaction finishing it.

        Scans of one owner finishing at the same moment take turns (on PostgreSQL an advisory
        lock per owner; SQLite writes one at a time anyway), so each plans from what the other
        wrote. _InventoryRefused when the database refuses the rows; a database that cannot
        be reached is DatabaseUnavailable as everywhere (the verdict is tried again later)."""
        try:
            if self._postgres:
                conn.execute(_TAKE_INVENTORY_LOCK, {"p_owner": record.owner})
            self._fold_into_inventory(conn, record, result)
        except (OperationalError, InterfaceError):
            raise
        except SQLAlchemyError as e:
            raise _InventoryRefused(str(e)) from e

    def _fold_into_inventory(self, conn: Connection, record: TaskRecord, result: ScanResult) -> None:
        scope = [n for target in record.argv[record.argv.index("--") + 1:]
                 for n in (parse_literal(target) or ("", []))[1]]
        known_hosts: dict[str, dict[str, Any]] = {}
        for network in scope:  # a read per network: a scan names few, and the statement is built once
            low, high = network_bounds(network)
            for row in conn.execute(_KNOWN_HOSTS, {"p_owner": record.owner, "p_low": low, "p_high": high}):
                known_hosts[row.address] = dict(row._mapping)
        up = [h.address for h in result.hosts if h.status == "up"]
        known_ports = {
            (row.address, row.protocol, row.port): dict(row._mapping)
            for chunk in _chunks(up, 500)
            for row in conn.execute(_KNOWN_PORTS, {"p_owner": record.owner, "p_addresses": list(chunk)})
        }
        plan = plan_update(record.owner, record.id, result, scope, known_hosts, known_ports, time.time())
        statements = _WRITE_INVENTORY_ROWS[self._engine.dialect.name]
        for table, rows in ((inventory_hosts, plan.hosts), (inventory_ports, plan.ports)):
            for chunk in _chunks(rows, 500):
                conn.execute(statements[table], chunk)

    def _find_hosts(self, owner: str, query: HostQuery, limit: int, offset: int) -> tuple[list[InventoryHost], int]:
        """Hosts matching `query`, by address, with their matching ports; and how many match."""
        ports = inventory_ports.c
        port_filter = self._port_conditions(owner, query)
        with self._engine.connect() as conn:
            if query.by_port:
                matched = select(ports.address_key, ports.address).where(*port_filter).distinct()
                total = conn.execute(select(func.count()).select_from(matched.subquery())).scalar_one()
                page = conn.execute(matched.order_by(ports.address_key).limit(limit).offset(offset)).all()
                addresses = [row.address for row in page]
                host_rows = conn.execute(select(inventory_hosts).where(
                    inventory_hosts.c.owner == owner, inventory_hosts.c.address.in_(addresses))).all()
            else:
                hosts_filter = self._host_conditions(owner, query)
                total = conn.execute(select(func.count()).select_from(inventory_hosts).where(*hosts_filter)).scalar_one()
                host_rows = conn.execute(select(inventory_hosts).where(*hosts_filter)
                                         .order_by(inventory_hosts.c.address_key).limit(limit).offset(offset)).all()
                addresses = [row.address for row in host_rows]
            port_rows = conn.execute(select(inventory_ports).where(*port_filter, ports.address.in_(addresses))
                                     .order_by(ports.address_key, ports.protocol, ports.port)).all() if addresses else []
        by_host: dict[str, list[InventoryPort]] = defaultdict(list)
        for row in port_rows:
            by_host[row.address].append(_inventory_port(row))
        hosts = {row.address: _inventory_host(row, by_host[row.address]) for row in host_rows}
        return [hosts[a] for a in addresses if a in hosts], total

    @staticmethod
    def _port_conditions(owner: str, query: HostQuery) -> list[Any]:
        ports = inventory_ports.c
        conditions: list[Any] = []
        state = query.port_state if query.by_port else "open"
        exact = {ports.port: query.port, ports.protocol: query.protocol, ports.state: state,
                 ports.service: query.service}
        conditions += [column == value for column, value in exact.items() if value is not None]
        if query.product is not None:
            conditions.append(func.lower(ports.product) == query.product.lower())
        if query.version_prefix is not None:
            conditions.append(ports.version.startswith(query.version_prefix, autoescape=True))
        if query.cpe is not None:
            conditions.append(ports.cpe.contains(query.cpe, autoescape=True))
        if query.script is not None:
            conditions.append(ports.scripts.contains(json.dumps(query.script), autoescape=True))
        return conditions + TaskManager._host_conditions(owner, query, inventory_ports)

    @staticmethod
    def _host_conditions(owner: str, query: HostQuery, table: Any = inventory_hosts) -> list[Any]:
        """Owner, network and time filters, which both inventory tables have."""
        columns = table.c
        conditions: list[Any] = [columns.owner == owner]
        if query.network is not None:
            conditions.append(columns.address_key.between(*query.network))
        if query.seen_since is not None:
            conditions.append(columns.last_seen >= query.seen_since)
        if query.changed_since is not None:
            conditions.append(columns.changed_at >= query.changed_since)
        return conditions

    def _top_values(self, owner: str, field: str, query: HostQuery, limit: int) -> list[tuple[str, int]]:
        """The most common values of `field` among the owner's hosts (open ports for port fields)."""
        if field in ("os", "status"):
            column = inventory_hosts.c[field]
            counted = (select(column, func.count().label("n")).where(*self._host_conditions(owner, query),
                                                                      column != "")
                       .group_by(column))
        else:
            ports = inventory_ports.c
            columns = [ports.protocol, ports.port] if field == "port" else (
                [ports.product, ports.version] if field == "version" else [ports[field]])
            counted = (select(*columns, func.count(ports.address.distinct()).label("n"))
                       .where(*self._port_conditions(owner, query), columns[-1] != "").group_by(*columns))
        with self._engine.connect() as conn:
            rows = conn.execute(counted.order_by(literal_column("n").desc()).limit(limit)).all()
        return [(_value_name(field, row), row.n) for row in rows]

    # ---- schedules (schedules.py decides; these statements read and write) ----------------

    async def create_schedule(self, values: dict[str, Any]) -> None:
        """Store a new schedule (a row of `schedules`) and wake the scheduler."""
        await self._db(self._insert_schedule, values)
        self.feed.publish(SCHEDULES_KEY)

    async def schedule_states(self, owner: str | None, limit: int) -> list[ScheduleState]:
        """The owner's schedules (everyone's with owner None), oldest first, with their latest run and change."""
        return await self._db(self._select_schedule_states, owner, limit)

    async def delete_schedule(self, schedule_id: str, owner: str) -> None:
        """Delete the caller's schedule and its runs; ScheduleNotFound for a missing or another owner's id."""
        await self._db(self._delete_schedule, schedule_id, owner)

    async def hold_lease(self, name: str, holder: str, holder_name: str, seconds: float) -> bool:
        """Take or renew the lease `name` for `seconds`; False while another holder's is unexpired."""
        return await self._db(self._hold_lease, name, holder, holder_name, seconds)

    async def release_lease(self, name: str, holder: str) -> None:
        await self._db(self._release_lease, name, holder)

    async def scheduler_work(self, now: float) -> SchedulerWork:
        return await self._db(self._select_scheduler_work, now)

    async def claim_run(self, schedule: ScheduleRecord, following: float, lease: str, holder: str) -> str | None:
        """Fire the schedule's due time: a new pending run, and `following` as its next run time.
        None when this process no longer holds the lease or the due time was fired already."""
        return await self._db(self._claim_run, schedule, following, lease, holder)

    async def previous_completed_run(self, run: RunRecord) -> RunRecord | None:
        """The latest run of the same schedule, due before `run`, whose scan completed."""
        return await self._db(self._select_previous_run, run)

    async def settle_run(self, run_id: str, status: str, *, error: str | None = None,
                         previous_task_id: str | None = None, diff: str | None = None, webhook: bool = False) -> bool:
        """Record a run's end (done or failed), once; with `webhook`, its change is due to be sent."""
        return await self._db(self._settle_run, run_id, status, error, previous_task_id, diff, webhook)

    async def claim_webhook_attempt(self, run: RunRecord, retry_at: float) -> bool:
        """Count one more delivery attempt of the run's change (retried at `retry_at` if none
        reports back); False when another process took this attempt."""
        return await self._db(self._claim_webhook_attempt, run, retry_at)

    async def record_webhook(self, run_id: str, status: str, error: str | None, next_at: float | None) -> None:
        """How the last attempt went: still pending (retried at `next_at`), sent, or failed."""
        await self._db(self._record_webhook, run_id, status, error, next_at)

    def _insert_schedule(self, values: dict[str, Any]) -> None:
        with self._writing() as conn:
            conn.execute(insert(schedules).values(**values))
            self._notify(conn, SCHEDULES_KEY)

    def _select_schedule_states(self, owner: str | None, limit: int) -> list[ScheduleState]:
        query = select(schedules).order_by(schedules.c.created_at).limit(limit)
        if owner is not None:
            query = query.where(schedules.c.owner == owner)
        runs = schedule_runs.c
        with self._engine.connect() as conn:
            states = []
            for row in conn.execute(query).all():
                latest = select(schedule_runs).where(runs.schedule_id == row.id).order_by(runs.due_at.desc()).limit(1)
                last = conn.execute(latest).first()
                change = conn.execute(latest.where(runs.diff.is_not(None))).first()
                status = conn.execute(select(tasks.c.status).where(tasks.c.id == last.task_id)).scalar() \
                    if last is not None and last.task_id else None
                states.append(ScheduleState(_schedule(row), _run(last) if last else None, status,
                                            _run(change) if change else None))
        return states

    def _delete_schedule(self, schedule_id: str, owner: str) -> None:
        with self._writing() as conn:
            mine = (schedules.c.id == schedule_id) & (schedules.c.owner == owner)
            if not conn.execute(delete(schedules).where(mine)).rowcount:
                raise ScheduleNotFound(f"no schedule {schedule_id!r}")
            conn.execute(delete(schedule_runs).where(schedule_runs.c.schedule_id == schedule_id))

    def _hold_lease(self, name: str, holder: str, holder_name: str, seconds: float) -> bool:
        now = time.time()
        held = {"holder": holder, "holder_name": holder_name, "expires_at": now + seconds}
        try:
            with self._writing() as conn:
                free = (leases.c.name == name) & ((leases.c.holder == holder) | (leases.c.expires_at < now))
                if conn.execute(update(leases).where(free).values(**held)).rowcount:
                    return True
                if conn.execute(select(leases.c.name).where(leases.c.name == name)).first() is not None:
                    return False
                conn.execute(insert(leases).values(name=name, **held))
                return True
        except IntegrityError:
            return False  # another process inserted the first row at the same moment: it holds it

    def _release_lease(self, name: str, holder: str) -> None:
        with self._writing() as conn:
            conn.execute(delete(leases).where(leases.c.name == name, leases.c.holder == holder))

    def _select_scheduler_work(self, now: float) -> SchedulerWork:
        runs, found = schedule_runs.c, schedules.c
        going = select(runs.schedule_id).where(runs.status.in_(RUNS_GOING))
        finished = (select(*schedule_runs.c).select_from(schedule_runs.join(tasks, tasks.c.id == runs.task_id))
                    .where(runs.status == "submitted", tasks.c.status.not_in(ACTIVE_STATUSES)))
        with self._engine.connect() as conn:
            due = conn.execute(select(schedules).where(found.next_run_at <= now, found.id.not_in(going))
                               .order_by(found.next_run_at)).all()
            work = [[_run(row) for row in conn.execute(query.order_by(runs.due_at)).all()] for query in (
                select(schedule_runs).where(runs.status == "pending"), finished,
                select(schedule_runs).where(runs.webhook_status == "pending", runs.webhook_next_at <= now))]
            ids = {run.schedule_id for group in work for run in group}
            owners = conn.execute(select(schedules).where(found.id.in_(ids))).all() if ids else []
            next_due = conn.execute(select(func.min(found.next_run_at)).where(found.id.not_in(going))).scalar()
        return SchedulerWork([_schedule(row) for row in due], *work, {row.id: _schedule(row) for row in owners},
                             next_due)

    def _claim_run(self, schedule: ScheduleRecord, following: float, lease: str, holder: str) -> str | None:
        now = time.time()
        run_id = str(uuid.uuid4())
        ours = (leases.c.name == lease) & (leases.c.holder == holder) & (leases.c.expires_at > now)
        due = (schedules.c.id == schedule.id) & (schedules.c.next_run_at == schedule.next_run_at)
        with self._writing() as conn:
            if conn.execute(select(leases.c.name).where(ours)).first() is None:
                return None
            if not conn.execute(update(schedules).where(due).values(next_run_at=following)).rowcount:
                return None
            conn.execute(insert(schedule_runs).values(id=run_id, schedule_id=schedule.id, due_at=schedule.next_run_at,
                                                      status="pending", webhook_attempts=0))
        return run_id

    @staticmethod
    def _link_run(conn: Connection, run_id: str, task_id: str) -> None:
        pending = (schedule_runs.c.id == run_id) & (schedule_runs.c.status == "pending")
        linked = conn.execute(update(schedule_runs).where(pending).values(status="submitted", task_id=task_id)).rowcount
        if not linked:
            raise RunAlreadyQueued(f"run {run_id} already has its task or no longer exists")

    def _select_previous_run(self, run: RunRecord) -> RunRecord | None:
        runs = schedule_runs.c
        with self._engine.connect() as conn:
            row = conn.execute(select(schedule_runs).where(runs.schedule_id == run.schedule_id, runs.status == "done",
                                                           runs.due_at < run.due_at)
                               .order_by(runs.due_at.desc()).limit(1)).first()
        return _run(row) if row else None

    def _settle_run(self, run_id: str, status: str, error: str | None, previous_task_id: str | None,
                    diff: str | None, webhook: bool) -> bool:
        now = time.time()
        going = (schedule_runs.c.id == run_id) & schedule_runs.c.status.in_(RUNS_GOING)
        with self._writing() as conn:
            return bool(conn.execute(update(schedule_runs).where(going).values(
                status=status, error=error, finished_at=now, previous_task_id=previous_task_id, diff=diff,
                webhook_status="pending" if webhook else None, webhook_next_at=now if webhook else None,
            )).rowcount)

    def _claim_webhook_attempt(self, run: RunRecord, retry_at: float) -> bool:
        seen = (schedule_runs.c.id == run.id) & (schedule_runs.c.webhook_status == "pending") & (
            schedule_runs.c.webhook_attempts == run.webhook_attempts)
        with self._writing() as conn:
            return bool(conn.execute(update(schedule_runs).where(seen).values(
                webhook_attempts=run.webhook_attempts + 1, webhook_next_at=retry_at)).rowcount)

    def _record_webhook(self, run_id: str, status: str, error: str | None, next_at: float | None) -> None:
        pending = (schedule_runs.c.id == run_id) & (schedule_runs.c.webhook_status == "pending")
        with self._writing() as conn:
            conn.execute(update(schedule_runs).where(pending).values(webhook_status=status, webhook_error=error,
                                                                     webhook_next_at=next_at))



def _schedule(row: Row[Any]) -> ScheduleRecord:
    data = dict(row._mapping)
    return ScheduleRecord(**data | {"kind": ScanKind(data["kind"])})


def _run(row: Row[Any]) -> RunRecord:
    return RunRecord(**row._mapping)

def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start: start + size]


def _value_name(field: str, row: Row[Any]) -> str:
    if field == "port":
        return f"{row.port}/{row.protocol}"
    if field == "version":
        return f"{row.product} {row.version}".strip()
    return str(row[0])


def _inventory_port(row: Row[Any]) -> InventoryPort:
    data = dict(row._mapping)
    return InventoryPort(**{k: v for k, v in data.items() if k in InventoryPort.model_fields and k not in
                            ("cpe", "scripts")}, cpe=json.loads(data["cpe"]), scripts=json.loads(data["scripts"]))


def _inventory_host(row: Row[Any], ports: list[InventoryPort]) -> InventoryHost:
    data = dict(row._mapping)
    fields = {k: v for k, v in data.items() if k in InventoryHost.model_fields and k != "hostnames"}
    return InventoryHost(**fields, hostnames=json.loads(data["hostnames"]), ports=ports)


_UNCLAIMED = {"status": TaskStatus.QUEUED.value, "worker_id": None, "worker_name": None,
              "claimed_at": None, "lease_expires_at": None}


async def wait_set(event: asyncio.Event, timeout: float) -> None:
    """Return when `event` is set, or after `timeout` s. Not `asyncio.wait_for(event.wait())`:
    on Python 3.11 that swallows a cancel arriving as the event is set, and a loop written with
    it then never stops (seen: a scheduler that outlived its process's shutdown)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


async def _first_of(changed: asyncio.Event, stop: asyncio.Event | None, timeout: float) -> None:
    """Return when `changed` or `stop` is set, or after `timeout` s."""
    waits = [asyncio.ensure_future(changed.wait())]
    if stop is not None:
        waits.append(asyncio.ensure_future(stop.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()


def _record(row: Row[Any] | Mapping[str, Any]) -> TaskRecord:
    data = row._mapping if isinstance(row, Row) else row
    result, progress = data.get("result"), data.get("progress")
    return TaskRecord(
        id=data["id"],
        owner=data["owner"],
        kind=ScanKind(data["kind"]),
        target=data["target"],
        argv=json.loads(data["argv"]),
        status=TaskStatus(data["status"]),
        time_limit=data["time_limit"],
        created_at=data["created_at"],
        started_at=data.get("started_at"),
        finished_at=data.get("finished_at"),
        error=data.get("error"),
        pool=data.get("pool") or "default",
        worker_name=data.get("worker_name"),
        parent_id=data.get("parent_id"),
        shard_count=data.get("shard_count") or 0,
        progress=Progress.model_validate_json(progress) if progress else None,
        result=ScanResult.model_validate_json(result) if result else None,
    )
