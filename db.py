"""The database under every store: engine, SQLite pragmas, migrations and their lock, the
threads database calls run in, and the translation of "cannot reach it" into one exception.

Database calls use SQLAlchemy Core on a synchronous engine, one worker-thread hand-off per
operation: measured here, several times faster per lookup than the async ORM. A store module
(task_manager, worker_store, limits, inventory_store, schedule_store) writes its statements as
plain functions of a Connection and runs them with `Database.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Connection, Engine, Table, bindparam, create_engine, event, func, inspect, literal_column, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

T = TypeVar("T")

MIGRATIONS = Path(__file__).with_name("migrations")
# Constant keys for pg_advisory_xact_lock: submissions (and migrations) take the first, so that
# the queue bound and the limits are exact; inventory updates the second (with the owner), one
# owner at a time; new schedules the third (with the owner), so that the cap on them is exact.
SUBMIT_LOCK = 7_301_001
INVENTORY_LOCK = 7_301_002
SCHEDULE_LOCK = 7_301_003
# Threads for database calls, per database (the engines' pools hold at least as many
# connections). SQLite writes one at a time, and more threads only contend for its lock and the
# GIL: with 4 instead of 12, bench/quick_scans_200.py ran 10% faster (server CPU 12.8 -> 11.0 ms
# per scan). PostgreSQL serves many at once.
DB_THREADS = {"sqlite": 4, "postgresql": 12}
# A pooled PostgreSQL connection unused this long is pinged before it is used again.
PING_IDLE_SECONDS = 1.0
# A pooled PostgreSQL connection unused this long is closed by the server (idle_session_timeout,
# PostgreSQL 14 and later). The pool hands out the connection returned last (LIFO), so an idle
# process keeps reusing one and those a busy spell opened go (an idle worker held 3, an idle API
# 4, each up to 20 after a busy spell, for as long as the process lived); the next busy spell's
# pings find them gone and open new ones (see `_ping_if_idle`).
POOL_IDLE_SECONDS = 60
# A call that takes longer than this counts as the database being slow (see `calm_seconds`).
SLOW_CALL_SECONDS = 1.0
# The tables SQLite's planner has statistics of (sqlite_stat1), taken at start and by the hourly
# job (retention.py): without them an inventory query by port read every port of the owner
# through (owner, address_key), find_hosts(port=80) 113 ms at 100k hosts, 34 ms with them through
# (owner, port, state). Not tasks: stat1 averages its status column (25,000 rows per value at
# 50k tasks, where 'queued' holds a handful), and the worker's claim then read whole indexes
# (0.07 -> 62 ms); its queries are written for the planner without statistics, and tested so.
# Hence no PRAGMA optimize either, which would take them of tasks too.
ANALYZED_TABLES = ("inventory_hosts", "inventory_ports")
# Each dialect's INSERT, for upserts (ON CONFLICT is spelled the same, built by each).
DIALECT_INSERTS: dict[str, Callable[[Table], postgresql.Insert | sqlite.Insert]] = {
    "sqlite": sqlite.insert, "postgresql": postgresql.insert}


class DatabaseUnavailable(RuntimeError):
    """The task database cannot be reached, or did not answer in time."""


class _Abandoned(Exception):
    """The caller gave up on this call: its transaction is rolled back rather than committed."""


class _Call:
    """One call of `Database.run`, as the database thread running it sees it."""

    __slots__ = ("abandoned",)

    def __init__(self) -> None:
        self.abandoned = False


# The call the current database thread runs (see `Database.writing`).
_running = threading.local()


def _run_call(call: _Call, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    _running.call = call
    try:
        return fn(*args)
    finally:
        _running.call = None


def shown_url(url: str) -> str:
    """`url` as it may be printed: the database it names, without its password."""
    return make_url(url).render_as_string(hide_password=True)


def create_db_engine(url: str, timeout_s: float = 5.0) -> Engine:
    """An engine for `url`. SQLite files are created mode 0600 and get WAL mode, a busy
    timeout, and `BEGIN IMMEDIATE` for writing transactions (see `_sqlite_begin`).
    PostgreSQL connections give up connecting, and the server cancels a statement (one that
    waits for a lock, say), after `timeout_s`."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if not url.startswith("sqlite"):
        limits = {"connect_timeout": max(1, math.ceil(timeout_s)),
                  "options": f"-c statement_timeout={math.ceil(timeout_s * 1000)}"}
        engine = create_engine(url, pool_size=DB_THREADS["postgresql"], max_overflow=8, pool_use_lifo=True,
                               connect_args=limits)
        event.listen(engine, "connect", _close_when_idle)
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


def _close_when_idle(dbapi_connection: Any, _record: Any) -> None:
    """PostgreSQL 14 and later: the server closes this connection once it has been idle for
    POOL_IDLE_SECONDS (an older server knows no such setting, and keeps it)."""
    if dbapi_connection.info.server_version < 140000:
        return
    with dbapi_connection.cursor() as cursor:
        cursor.execute(f"SET idle_session_timeout = {POOL_IDLE_SECONDS * 1000}")
    dbapi_connection.commit()


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
    # unwrapped, as sqlite3's own (see `Database.run`).
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
                # A migration may rewrite a big table: no statement timeout for it.
                conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
                conn.execute(select(func.pg_advisory_xact_lock(SUBMIT_LOCK)))
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


def upsert(dialect: str, table: Table) -> Any:
    """INSERT of whole rows that replaces the row of the same key, in one statement (the
    same syntax on SQLite and PostgreSQL, built by each one's dialect)."""
    return _replacing(DIALECT_INSERTS[dialect](table), table)


def upsert_set(table: Table) -> Any:
    """PostgreSQL: `upsert` of rows given as one JSON array of objects (bound as p_rows, no two
    of one key), one statement for them all. Per batch of the inventory fold (256 hosts, 1,280
    ports) it took 0.7x the wall time and 0.3x the CPU of executemany; on SQLite, with json_each,
    1.45x the wall time of executemany, which SQLite runs in C statement by statement."""
    columns = [column.name for column in table.c]
    rows = func.json_populate_recordset(literal_column(f"NULL::{table.name}"),
                                        bindparam("p_rows", type_=postgresql.JSON)).table_valued(*columns)
    return _replacing(postgresql.insert(table).from_select(columns, select(*(rows.c[name] for name in columns))),
                      table)


def _replacing(statement: postgresql.Insert | sqlite.Insert, table: Table) -> Any:
    key = [column.name for column in table.primary_key]
    return statement.on_conflict_do_update(
        index_elements=key, set_={c.name: statement.excluded[c.name] for c in table.c if c.name not in key})


class Database:
    """One engine and the threads its calls run in, shared by every store of a process.

    A call that does not answer within `timeout_s` (a database that froze: a failover, a
    partition, a paused VM, a long lock) is DatabaseUnavailable to its caller at once; the
    thread running it is left to finish when the database answers, and a writing transaction
    given up on this way is rolled back rather than committed (unless the freeze came during
    its very COMMIT). Slow and failed calls are remembered: `calm_seconds` says for how long
    the database has answered this process promptly, which is what lease expiry may trust."""

    def __init__(self, engine: Engine, *, timeout_s: float = 5.0,
                 on_unavailable: Callable[[str], None] = lambda _operation: None) -> None:
        self.engine = engine
        self.timeout_s = timeout_s
        # When this process last saw the database fail or answer slowly (monotonic seconds).
        # Its start counts as such: what happened before it is unknown.
        self._troubled_at = time.monotonic()
        # The calls under way, with when each began: one waiting long is trouble already.
        self._in_flight: dict[_Call, float] = {}
        self.dialect = engine.dialect.name
        self.postgres = self.dialect == "postgresql"
        # Its connections begin writing transactions (see `_sqlite_begin`); made once, as
        # setting the option per transaction cost more than the BEGIN itself.
        self._writer = engine.execution_options(writing=True)
        # Told the operation each time the database cannot be reached (metrics count them).
        self._on_unavailable = on_unavailable
        self._threads = ThreadPoolExecutor(max_workers=DB_THREADS[self.dialect], thread_name_prefix="db")

    @property
    def directory(self) -> Path | None:
        """Where a SQLite database's file is; None for PostgreSQL, whose data is elsewhere."""
        database = self.engine.url.database
        if self.dialect != "sqlite" or not database or database == ":memory:":
            return None
        return Path(database).parent

    async def start(self) -> None:
        """Bring the schema up to date (a migration may take long: no deadline), and take the
        planner's statistics."""
        await self.run(upgrade_schema, self.engine, deadline=False)
        await self.refresh_statistics()

    async def refresh_statistics(self) -> None:
        """SQLite: the planner's statistics of ANALYZED_TABLES taken again, as the inventory
        grows (PostgreSQL's autovacuum keeps its own). About 0.2 s at 100k hosts: no deadline."""
        await self.run(self._refresh_statistics, deadline=False)

    def _refresh_statistics(self) -> None:
        if self.dialect != "sqlite":
            return
        with self.writing() as conn:
            for table in ANALYZED_TABLES:
                conn.exec_driver_sql(f"ANALYZE {table}")
        # A connection reads the statistics when it opens, not again after another's ANALYZE:
        # the pooled ones are replaced (those in use, once they are returned).
        self.engine.dispose()

    def close(self) -> None:
        self._threads.shutdown(wait=True)
        self.engine.dispose()

    async def run(self, fn: Callable[..., T], *args: Any, deadline: bool = True) -> T:
        """`fn(*args)` in a database thread; DatabaseUnavailable when the database cannot be
        reached or (with `deadline`) has not answered within `timeout_s`, counted under
        `fn`'s name. Without a deadline (long by nature: a migration, a VACUUM, a big verdict,
        parsing a big result) a call says nothing of how promptly the database answers."""
        call = _Call()
        started = time.monotonic()
        if deadline:
            self._in_flight[call] = started
        answer = asyncio.get_running_loop().run_in_executor(self._threads, _run_call, call, fn, args)
        try:
            async with asyncio.timeout(self.timeout_s if deadline else None):
                return await answer
        except TimeoutError as e:
            call.abandoned = True
            raise self._unavailable(fn) from e
        except (OperationalError, InterfaceError, sqlite3.OperationalError) as e:
            raise self._unavailable(fn) from e
        finally:
            if deadline:
                del self._in_flight[call]
                if time.monotonic() - started > SLOW_CALL_SECONDS:
                    self._troubled_at = time.monotonic()

    def _unavailable(self, fn: Callable[..., object]) -> DatabaseUnavailable:
        self._troubled_at = time.monotonic()
        self._on_unavailable(fn.__name__.lstrip("_"))
        return DatabaseUnavailable("the task database is not reachable; retry later")

    def calm_seconds(self) -> float:
        """For how long every call of this process has had a prompt answer (since its start at
        most); 0 while a call has been waiting for longer than SLOW_CALL_SECONDS."""
        now = time.monotonic()
        if now - min(self._in_flight.values(), default=now) > SLOW_CALL_SECONDS:
            return 0.0
        return now - self._troubled_at

    async def ping(self) -> None:
        """Raise DatabaseUnavailable unless the database answers."""
        await self.run(self._select_one_value)

    def reading(self) -> Connection:
        """A connection for reads (use it as a context manager)."""
        return self.engine.connect()

    @contextlib.contextmanager
    def writing(self) -> Iterator[Connection]:
        """A writing transaction, committed at the end of the block unless its caller gave up
        waiting for it meanwhile (see the class docstring)."""
        with self._writer.connect() as conn, conn.begin():
            yield conn
            call = getattr(_running, "call", None)
            if call is not None and call.abandoned:
                raise _Abandoned("the caller gave up waiting; rolled back")

    def relaxed_commit(self, conn: Connection) -> None:
        """PostgreSQL: this commit need not wait for its WAL flush; a lost claim or
        heartbeat is covered by the lease (a claim is re-done, a heartbeat is re-sent)."""
        if self.postgres:
            conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")

    def _select_one_value(self) -> None:
        with self.reading() as conn:
            conn.exec_driver_sql("SELECT 1").scalar_one()

    async def compact(self, free_share: float = 0.25) -> bool:
        """SQLite: VACUUM when at least `free_share` of the file is free pages; True if it did.
        A VACUUM of a big file takes long: no deadline."""
        return await self.run(self._compact, free_share, deadline=False)

    def _compact(self, free_share: float) -> bool:
        if self.dialect != "sqlite":
            return False
        with self.reading() as conn:
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
            free = conn.exec_driver_sql("PRAGMA freelist_count").scalar_one()
            conn.rollback()
        if not pages or free / pages < free_share:
            return False
        # VACUUM cannot run inside a transaction: on the driver's own connection, which begins none.
        raw = self.engine.raw_connection()
        try:
            raw.driver_connection.execute("VACUUM")  # type: ignore[union-attr]
        finally:
            raw.close()
        return True

    async def purge(self, delete_batch: Callable[[Connection, float, int], int], before: float,
                    batch: int = 500) -> int:
        """Run `delete_batch(conn, before, batch)` in transactions of its own until it deletes
        nothing, so that no lock is held for long; how many it deleted in all."""
        deleted = 0
        while count := await self.run(self._purge_batch, delete_batch, before, batch):
            deleted += count
        return deleted

    def _purge_batch(self, delete_batch: Callable[[Connection, float, int], int], before: float, batch: int) -> int:
        with self.writing() as conn:
            return delete_batch(conn, before, batch)
