"""A hostile webhook receiver against a real server: the server's memory while it streams.

    .venv/bin/python bench/webhook_hostile.py [--stream-mib 448]

Starts `server.py` (SQLite, loopback scans only, listening on 127.41.0.0/16), a receiver that
answers 200 and then streams a body of --stream-mib MiB as fast as it is taken (the
penetration test of issue 19 streamed 448 MiB), and a quick scan scheduled every 2 s whose
webhook points at the receiver. Once the schedule's first run is done, a listener opens on the
scanned address, so a later run finds a port opened and the server sends the change, up to 4
attempts. The server's resident memory (VmRSS from /proc) is sampled every 50 ms: printed
before the first attempt, at its peak and after the last one, with what the receiver got out
and how the delivery was recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.receivers import STREAM, WebhookReceiver, receiver_address
from tests.support import (
    ALICE,
    START_UP_SECONDS,
    Listeners,
    ServiceProcess,
    call_tool,
    free_port,
    server_argv,
    top_ports,
    wait_until,
    write_config,
)


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


class Sampler:
    """VmRSS of one process every 50 ms, in a thread, until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid, self.samples = pid, [rss_mib(pid)]
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stopped.wait(0.05):
            self.samples.append(rss_mib(self.pid))

    def stop(self) -> float:
        self._stopped.set()
        self._thread.join(5)
        return max(self.samples)


async def last_schedule(url: str) -> dict[str, Any]:
    [schedule] = (await call_tool(url, ALICE, "list_schedules", {})).structured_content["schedules"]
    return dict(schedule)


async def until(url: str, done: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not done(schedule := await last_schedule(url)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting: {schedule}")
        await asyncio.sleep(0.2)
    return schedule


async def measure(stream_mib: int, directory: Path) -> None:
    receiver = WebhookReceiver(stream_bytes=stream_mib << 20)
    host, target = receiver_address(), receiver_address()
    config = write_config(directory / "c.json", host=host, port=free_port(host), log_level="INFO",
                          allowed_targets=[], min_schedule_seconds=1, audit_log=str(directory / "audit.jsonl"),
                          webhook_allowed_urls=[receiver.url("/hostile/")], webhook_allowed_addresses=[receiver.host])
    server = ServiceProcess(server_argv(config), directory / "server.log").start()
    listeners = Listeners()
    try:
        assert wait_until(lambda: "listening on" in server.log_text(), START_UP_SECONDS), server.log_text()
        url = f"http://{host}:{json.loads(config.read_text())['port']}/mcp"
        await call_tool(url, ALICE, "schedule_scan", {"kind": "quick", "target": target, "every": "2s",
                                                      "webhook_url": receiver.url(STREAM)})
        await until(url, lambda s: (s["last_run"] or {}).get("status") == "completed", 60)
        before, sampler = rss_mib(server.pid), Sampler(server.pid)
        next(port for port in top_ports(100) if 1024 <= port < 32768 and listeners.open(port, target))
        done = await until(url, lambda s: (s["last_change"] or {}).get("webhook") in ("sent", "failed"), 120)
        peak, after = sampler.stop(), rss_mib(server.pid)
    finally:
        listeners.stop()
        server.stop()
        receiver.stop()
    change = done["last_change"]
    print(f"receiver: 200, then up to {stream_mib} MiB; it got {receiver.streamed / 2**20:.1f} MiB out "
          f"over {len(receiver.requests)} attempts")
    print(f"delivery recorded: {change['webhook']} ({change['webhook_error']})")
    print(f"server RSS: {before:.0f} MiB before, {peak:.0f} MiB at peak, {after:.0f} MiB after")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream-mib", type=int, default=448)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(measure(options.stream_mib, Path(directory)))


if __name__ == "__main__":
    main()
