"""The store layer of one process, opened and closed as one: the database, its change feed,
and a store per aggregate. SQL lives only in these modules (tests/test_layers.py checks it):

- db.py: the engine, migrations, database threads, DatabaseUnavailable
- change_feed.py: how processes hear of each other's changes
- task_manager.py: what callers do to tasks
- worker_store.py: what workers do to tasks, their leases and the workers table
- limits.py: the per-token usage and the queue's bound
- inventory_store.py: the inventory across scans
- schedule_store.py: schedules, their runs and webhooks, the scheduler's lease
- people_store.py: the people who signed in and their roles
- engagement_store.py: the engagements scans run under
- approval_store.py: scans that wait for a person's yes, and the decisions
- evidence_store.py: tasks read as evidence (what ran, when, the hashes of what it produced)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from approval_store import ApprovalStore
from change_feed import ChangeFeed
from db import Database, create_db_engine
from engagement_store import EngagementStore
from evidence_store import EvidenceStore
from inventory_store import InventoryStore
from limits import UsageStore
from people_store import PeopleStore
from schedule_store import ScheduleStore
from supervisor import Supervisor
from task_manager import TaskManager
from worker_store import WorkerStore


@dataclass(frozen=True)
class Stores:
    """Every store of one process, on one database."""

    db: Database
    feed: ChangeFeed
    tasks: TaskManager
    workers: WorkerStore
    schedules: ScheduleStore
    inventory: InventoryStore
    usage: UsageStore
    people: PeopleStore
    engagements: EngagementStore
    approvals: ApprovalStore
    evidence: EvidenceStore

    @classmethod
    def open(cls, url: str, *, max_queued: int, lease_seconds: float = 30.0, timeout_s: float = 5.0,
             on_unavailable: Callable[[str], None] = lambda _operation: None) -> Stores:
        """The stores on the database at `url`, whose calls answer within `timeout_s` (nothing
        is read or written before `start`)."""
        db = Database(create_db_engine(url, timeout_s), timeout_s=timeout_s, on_unavailable=on_unavailable)
        feed = ChangeFeed(db)
        return cls(
            db=db,
            feed=feed,
            tasks=TaskManager(db, feed, max_queued=max_queued, lease_seconds=lease_seconds),
            workers=WorkerStore(db, feed, lease_seconds=lease_seconds),
            schedules=ScheduleStore(db, feed),
            inventory=InventoryStore(db),
            usage=UsageStore(db),
            people=PeopleStore(db),
            engagements=EngagementStore(db),
            approvals=ApprovalStore(db, feed),
            evidence=EvidenceStore(db),
        )

    @property
    def lease_seconds(self) -> float:
        return self.workers.lease_seconds

    async def start(self, supervisor: Supervisor) -> None:
        """Bring the schema up to date and start hearing of other processes' changes, the
        listener a loop `supervisor` watches."""
        await self.db.start()
        await self.feed.start(supervisor)

    async def stop(self) -> None:
        await self.feed.stop()
        await self.tasks.stop()
        self.db.close()
