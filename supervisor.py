"""The background loops of one process, watched (procrastinate's _monitor_side_tasks is the model).

A loop that ends with an exception (anything but being cancelled) is logged with its
traceback, and the process is told to stop: a worker whose claim loop died would otherwise
keep beating, look alive in list_workers and claim nothing. A stopped process exits non-zero,
so that its supervisor (systemd, a container runtime) restarts it, and the leases of what it
ran expire and hand its work to another worker. A loop that returns has decided it has
nothing to do (retention with retention_days 0): that is not a failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

logger = logging.getLogger(__name__)


class Supervisor:
    """Starts named loops and sets `failed` (with `failure` saying which and why) when one dies."""

    def __init__(self) -> None:
        self._loops: dict[str, asyncio.Task[None]] = {}
        self.failed = asyncio.Event()
        self.failure: str | None = None

    @property
    def names(self) -> set[str]:
        """The loops running now."""
        return set(self._loops)

    def start(self, name: str, loop: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `loop` as the background loop `name`; its task, for whoever stops it."""
        task = asyncio.create_task(loop, name=name)
        self._loops[name] = task
        task.add_done_callback(self._ended)
        return task

    async def stop(self, *names: str) -> None:
        """Cancel the loops named (every loop when none is) and wait until they have ended."""
        stopping = [task for name, task in self._loops.items() if not names or name in names]
        for task in stopping:
            task.cancel()
        await asyncio.gather(*stopping, return_exceptions=True)

    def _ended(self, task: asyncio.Task[None]) -> None:
        name = task.get_name()
        if self._loops.get(name) is task:
            del self._loops[name]
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            return
        logger.critical("the background loop %r died; stopping this process", name, exc_info=error)
        if self.failure is None:
            self.failure = f"the background loop {name!r} died ({type(error).__name__})"
        self.failed.set()
