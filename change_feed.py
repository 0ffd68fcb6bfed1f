"""How processes hear of changes: in-process events first, then PostgreSQL's LISTEN/NOTIFY,
or on SQLite (one machine) a cheap check of `PRAGMA data_version`; and the waiting helpers
built on them.

A key is what changed: a task id, `queue:<pool>` (see `queue_key`), or a store's own key
(schedule_store.SCHEDULES_KEY). Writers publish the keys they changed in this process and
`notify` them to the others in the transaction that changed them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator

import psycopg
from sqlalchemy import Connection, String, bindparam, func, select
from sqlalchemy.exc import OperationalError

from db import Database
from models import TaskRecord
from supervisor import Supervisor

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "nmap_mcp"
# How often SQLite's data_version is checked for commits made by other processes (and how
# often everyone re-reads while PostgreSQL's notifications cannot be heard).
POLL_SECONDS = 0.5
# TCP keepalives of the listening connection (idle seconds, interval, probes): a connection
# that died without a word (a firewall's dropped state, a host gone) is noticed within about
# 35 s, and the feed reconnects (waiters re-read meanwhile) instead of waiting for
# notifications that no longer come.
LISTEN_KEEPALIVE = (20, 5, 3)
# Built once: building a statement costs several times more than running it.
_NOTIFY = select(func.pg_notify(NOTIFY_CHANNEL, bindparam("p_key", type_=String)))


def queue_key(pool: str) -> str:
    """The key that changes when a task of `pool` is queued (workers of the pool wait on it)."""
    return f"queue:{pool}"


class Change(asyncio.Event):
    """Set whenever its key changes. `verdict`: the task as its verdict wrote it, when this
    process wrote it (see ChangeFeed.publish_verdict)."""

    verdict: TaskRecord | None = None


class ChangeFeed:
    """Wakes whoever waits on a key when it changes, in any process. In-process writers
    publish directly; other processes are heard through PostgreSQL NOTIFY, or on SQLite by a
    commit counter that changes with every commit.

    A notification's payload is `<origin> <key>` (see `heard_key`)."""

    def __init__(self, db: Database) -> None:
        self._db = db
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

    def notify(self, conn: Connection, *keys: str | None) -> None:
        """NOTIFY other processes of `keys` when `conn`'s transaction commits (SQLite's
        commit counter needs nothing)."""
        if self._db.postgres:
            for key in filter(None, keys):
                conn.execute(_NOTIFY, {"p_key": f"{self.origin} {key}"})

    async def start(self, supervisor: Supervisor) -> None:
        """Start hearing of other processes' changes, in a thread `supervisor` watches as the
        loop `change-feed`: a process that stopped hearing would wait out every timeout."""
        self._loop = asyncio.get_running_loop()
        target = {"postgresql": self._listen, "sqlite": self._poll_sqlite}.get(self._db.dialect)
        if target is not None:
            supervisor.start("change-feed", self._follow(target))

    async def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            await asyncio.to_thread(self._listener.join, 5)

    async def _follow(self, target: Callable[[], None]) -> None:
        """Run `target` in the listener thread; end as it ends, raising what it raised."""
        assert self._loop is not None
        ended: asyncio.Future[None] = self._loop.create_future()

        def run() -> None:
            error: BaseException | None = None
            try:
                target()
            except BaseException as e:  # noqa: BLE001 - handed to the supervised task, which raises it
                error = e
            self._call(_settle, ended, error)

        self._listener = threading.Thread(target=run, name="change-feed", daemon=True)
        self._listener.start()
        await ended

    def _listen(self) -> None:
        """PostgreSQL: a dedicated connection LISTENs. While it cannot, everyone is woken every
        half second to read for themselves, so that nothing waits on a notification that
        cannot come; it reconnects as often."""
        url = self._db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        lost = False
        while not self._stop.is_set():
            try:
                idle_s, interval_s, probes = LISTEN_KEEPALIVE
                with psycopg.connect(url, autocommit=True, connect_timeout=2, keepalives=1, keepalives_idle=idle_s,
                                     keepalives_interval=interval_s, keepalives_count=probes) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    if lost:
                        logger.info("change feed reconnected")
                    lost = False
                    self._call(self.wake_all)  # whatever happened while we were not listening
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=POLL_SECONDS):
                            key = heard_key(note.payload, self.origin)
                            if key is not None:
                                self._call(self.publish, key)
            except psycopg.Error as e:
                if not lost:
                    logger.warning("change feed lost its database connection (%s); retrying", type(e).__name__)
                lost = True
                self._call(self.wake_all)
                self._stop.wait(POLL_SECONDS)

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed under us at shutdown
            self._loop.call_soon_threadsafe(fn, *args)

    def _poll_sqlite(self) -> None:
        """SQLite: `PRAGMA data_version` changes whenever another connection commits."""
        with self._db.reading() as conn:
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
                self._stop.wait(POLL_SECONDS)


def _settle(ended: asyncio.Future[None], error: BaseException | None) -> None:
    if ended.done():  # cancelled with the task awaiting it
        return
    if error is None:
        ended.set_result(None)
    else:
        ended.set_exception(error)


def heard_key(payload: str, origin: str) -> str | None:
    """The key a notification's payload `<origin> <key>` names; None for one sent by this
    process (origin `origin`), whose writers published it here already: heard again, it would
    cost every waiter on the key one more read. A payload without an origin, from an older
    release, is a key."""
    sender, _, key = payload.rpartition(" ")
    return None if sender == origin else key


async def wait_set(event: asyncio.Event, timeout_s: float) -> None:
    """Return when `event` is set, or after `timeout_s`. Not `asyncio.wait_for(event.wait())`:
    on Python 3.11 that swallows a cancel arriving as the event is set, and a loop written with
    it then never stops (seen: a scheduler that outlived its process's shutdown)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()


async def first_of(changed: asyncio.Event, stop: asyncio.Event | None, timeout_s: float) -> None:
    """Return when `changed` or `stop` is set, or after `timeout_s`."""
    waits = [asyncio.ensure_future(changed.wait())]
    if stop is not None:
        waits.append(asyncio.ensure_future(stop.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()
