"""Hostname lookups for scan targets, kept apart from the rest of the server's work.

Names are resolved by the system resolver (getaddrinfo: /etc/hosts, nsswitch, resolv.conf),
which blocks a thread for as long as the DNS server takes, and cannot be interrupted: a
lookup that times out for its caller goes on in its thread. So lookups run in a thread pool
of their own, never the event loop's default executor, which other work shares, and each
caller (token) has at most LOOKUPS_PER_CALLER threads busy at once, counted until a thread
has returned, not until its caller stopped waiting. The pool has that many threads for
every caller the server knows, so one token's hung lookups can never leave another token's
waiting for a thread. A lookup beyond a caller's share waits for one of its own to end,
within the same time limit, then is refused saying why.

Answers and failures are cached per caller for a short time (POSITIVE_TTL_S,
NEGATIVE_TTL_S), so a name that does not resolve is not asked again at once, and one token
cannot learn from timing which names another has looked up.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import NamedTuple

from cachetools import TLRUCache

from targets import IPAddress, TargetError

LOOKUPS_PER_CALLER = 2
POSITIVE_TTL_S = 30.0
NEGATIVE_TTL_S = 10.0
CACHE_ENTRIES = 1024

# One blocking lookup: a hostname's addresses, or OSError (socket.gaierror) or UnicodeError.
BlockingLookup = Callable[[str], tuple[IPAddress, ...]]


class _Failed(NamedTuple):
    """A lookup that found no address (cached like an answer)."""

    reason: str


_Outcome = tuple[IPAddress, ...] | _Failed


def system_lookup(hostname: str) -> tuple[IPAddress, ...]:
    """The system resolver's addresses for `hostname` (blocks; run in HostResolver's pool)."""
    infos = socket.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)
    return tuple(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def _expires(_key: tuple[str, str], outcome: _Outcome, now: float) -> float:
    return now + (NEGATIVE_TTL_S if isinstance(outcome, _Failed) else POSITIVE_TTL_S)


class HostResolver:
    """Looks hostnames up for callers, each within its share of a pool of its own."""

    def __init__(self, callers: int, timeout_s: float, *, lookup: BlockingLookup = system_lookup,
                 timer: Callable[[], float] = time.monotonic) -> None:
        self._timeout_s = timeout_s
        self._lookup = lookup
        # Threads start when needed: a server whose callers give addresses starts none.
        self._pool = ThreadPoolExecutor(max_workers=LOOKUPS_PER_CALLER * max(callers, 1),
                                        thread_name_prefix="resolve")
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._cache: TLRUCache[tuple[str, str], _Outcome, float] = TLRUCache(CACHE_ENTRIES, _expires, timer)

    async def addresses(self, caller: str, hostname: str) -> tuple[IPAddress, ...]:
        """`hostname`'s addresses for `caller`; TargetError when it does not resolve, takes
        longer than `timeout_s`, or the caller's own earlier lookups have not ended by then."""
        outcome = self._cache.get((caller, hostname))
        if outcome is None:
            outcome = await self._look_up(caller, hostname)
        if isinstance(outcome, _Failed):
            raise TargetError(f"'{hostname}' does not resolve ({outcome.reason})")
        return outcome

    async def _look_up(self, caller: str, hostname: str) -> _Outcome:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        slots = self._slots.setdefault(caller, asyncio.Semaphore(LOOKUPS_PER_CALLER))
        try:
            async with asyncio.timeout_at(deadline):
                await slots.acquire()
        except TimeoutError as e:
            raise TargetError(
                f"'{hostname}' was not looked up: this token's {LOOKUPS_PER_CALLER} lookups under way have not "
                f"ended within {self._timeout_s:g} s (its DNS server is slow); try again later, or give an address"
            ) from e
        lookup = loop.run_in_executor(self._pool, self._outcome, hostname)
        # The slot is the thread's: it is given back when the thread returns, however long after the caller left.
        lookup.add_done_callback(partial(self._ended, caller, hostname, slots))
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(lookup)
        except TimeoutError as e:
            raise TargetError(f"resolving '{hostname}' took more than {self._timeout_s:g} s") from e

    def _outcome(self, hostname: str) -> _Outcome:
        """In a pool thread: the lookup, its failure an outcome to cache too."""
        try:
            return self._lookup(hostname)
        except (OSError, UnicodeError) as e:
            return _Failed(e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__)

    def _ended(self, caller: str, hostname: str, slots: asyncio.Semaphore, lookup: asyncio.Future[_Outcome]) -> None:
        slots.release()
        if not lookup.cancelled() and lookup.exception() is None:
            self._cache[(caller, hostname)] = lookup.result()

    def close(self) -> None:
        """Drop lookups not started; a thread still waiting on DNS ends on its own."""
        self._pool.shutdown(wait=False, cancel_futures=True)
