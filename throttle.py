"""Failed-token throttling per client address, in this process's memory.

A client address whose requests carried refused tokens more than `limit` times within
`window_s` seconds gets 429 with Retry-After for its next refused tokens, instead of 401.
The token of every request is still checked: a valid token from a throttled address works
(a NAT, a proxy or an office shares one address; one bad client must not lock the others
out). So the throttle does not slow guessing (the secrets' length does that: at least 32
characters, 256 bits from --init); it answers a client that keeps sending a bad token with
a 429 that tells it to stop, and makes it visible in the metrics.

The state is a generic cell rate algorithm (GCRA): one number per address, the time its
refusals would be paid off at `limit` per `window_s`; a burst of `limit` is allowed, then
one refusal per `window_s / limit`. Refusals answered 429 do not add to it, so a client that
waits out Retry-After gets its answer, however hard it pushed before. At most
`MAX_ADDRESSES` addresses are kept, the least recently refused dropped first. IPv6 clients
count by their /64, the smallest network a host is usually given.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from ipaddress import IPv6Address, IPv6Network, ip_address

from starlette.types import Scope

# 10,000 addresses at about 190 bytes each (IPv6 /64 keys, measured with tracemalloc): under
# 2 MiB, whatever a prober sends.
MAX_ADDRESSES = 10_000
IPV6_PREFIX = 64


class FailedTokenThrottle:
    """Counts refused tokens per client address; says when an address must wait."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = window_s / limit
        self._window = window_s
        self._clock = clock
        # Address -> when its refusals are paid off (the GCRA's theoretical arrival time).
        self._paid_off_at: OrderedDict[str, float] = OrderedDict()

    def refused(self, address: str) -> int | None:
        """Count one refused token from `address`; None while under the limit, else the
        whole seconds it must wait (Retry-After)."""
        now = self._clock()
        # The backlog, to the microsecond: (now + x) - now is not always x in floating point, and
        # one rounding bit past the window once answered an address's first refusal with 429.
        backlog = round(max(self._paid_off_at.get(address, now) - now, 0.0) + self._interval, 6)
        if backlog > self._window:
            return max(1, math.ceil(backlog - self._window))
        self._paid_off_at[address] = now + backlog
        self._paid_off_at.move_to_end(address)
        while len(self._paid_off_at) > MAX_ADDRESSES:
            self._paid_off_at.popitem(last=False)
        return None

    def __len__(self) -> int:
        return len(self._paid_off_at)


def client_address(scope: Scope) -> str:
    """The address a request counts under: its client's IP (uvicorn has put the forwarded
    one there when a trusted proxy sent it), an IPv6 client by its /64; '' when unknown."""
    client = scope.get("client")
    if not client:
        return ""
    try:
        address = ip_address(client[0])
    except ValueError:
        return str(client[0])
    if isinstance(address, IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)
