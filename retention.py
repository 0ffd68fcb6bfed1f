"""Retention: finished tasks, their XML, inventory rows and the limits' per-minute usage
older than `retention_days` are deleted by a periodic job in small batches, and a SQLite file
is compacted when much of it has become free. `retention_days: 0` keeps everything. The same
job takes SQLite's planner statistics of the inventory again (Database.refresh_statistics)."""

from __future__ import annotations

import asyncio
import logging
import random
import time

from db import DatabaseUnavailable
from stores import Stores

logger = logging.getLogger(__name__)
DAY_SECONDS = 86_400.0
# How often the job runs; every process runs it (deleting twice is harmless), at a jittered
# time so that the processes of a fleet do not start together.
EVERY_SECONDS = 3600.0
# The first run comes at a random moment within this long after the process starts.
FIRST_RUN_WITHIN_SECONDS = 60.0


async def purge_once(stores: Stores, retention_days: int, now: float | None = None) -> dict[str, int]:
    """Delete what is older than the retention, in batches; compact SQLite if that freed much of
    it. The limits look back a day at most, so the usage they count is never purged early."""
    before = (now or time.time()) - retention_days * DAY_SECONDS
    deleted = {"tasks": await stores.tasks.purge(before)}
    deleted["inventory_hosts"], deleted["inventory_ports"] = await stores.inventory.purge(before)
    deleted["usage_minutes"] = await stores.usage.purge(before)
    if any(deleted.values()):
        logger.info("retention: deleted %d tasks, %d inventory hosts and %d ports older than %d days",
                    deleted["tasks"], deleted["inventory_hosts"], deleted["inventory_ports"], retention_days)
        if await stores.db.compact():
            logger.info("retention: compacted the SQLite database")
    return deleted


async def upkeep_forever(stores: Stores, retention_days: int,
                         first_run_within_s: float = FIRST_RUN_WITHIN_SECONDS) -> None:
    """The periodic job: the purge (none when retention_days is 0), then the statistics."""
    await asyncio.sleep(random.uniform(0, first_run_within_s))
    while True:
        try:
            if retention_days > 0:
                await purge_once(stores, retention_days)
            await stores.db.refresh_statistics()
        except DatabaseUnavailable:
            logger.warning("retention: the task database is not reachable; trying again later")
        await asyncio.sleep(EVERY_SECONDS * random.uniform(0.9, 1.1))
