"""A /22 quick scan: one nmap run vs the service, unsharded and sharded over two workers.

    .venv/bin/python bench/sharded_scan.py [--rounds 3] [--slots 4] [--shard 4096] [--network 127.77.0.0/22]

The target is --network, a /22 (1,024 loopback addresses, every one of them up on Linux), with
listeners of this script on a few of them, so each run has open ports to find. Per round,
in rotating order:
- direct: the argv the service gave nmap for the whole /22 (read from its audit log), run
  once behind the same sandbox prefix, its XML parsed as the service parses it;
- unsharded: the service on PostgreSQL (one `--api`, one `--worker`), shard_addresses above
  1,024, so one nmap run inside the service;
- sharded: the same with two `--worker` processes and shard_addresses --shard (default 4,096,
  the config's: the service sizes the shards, 4 of 256 for this quick scan; 64 makes the 16 of
  before issue 24), --slots scans at a time per worker; each run prints its nmap runs.
A service run is one quick_scan call (timeout 5, so it answers with the task id), then
get_task_status until it finished; its time is the server's own clock (finished_at minus
created_at). Every run must find the same hosts up and the same open ports. Loopback answers
at once, so these figures are mostly overhead: what sharding costs where the network is fast,
not what it saves where hosts are slow to answer (there each shard is a separate nmap on a
worker of its own). Targets only --network.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    mcp_session,
    postgres_database,
    queued_argv,
    service_config,
    start_api,
    start_worker,
    stop_process,
)
from bench.fleet_drain import wait_for_workers
from nmap_report import parse_report
from tests.support import Listeners, own_user_sandbox, top_ports

Network = ipaddress.IPv4Network
# Hosts of the /22 with a listener on one of nmap's top 100 ports, in different shards.
LISTENING = (10, 300, 777)


def open_ports(result: Any) -> set[tuple[str, int]]:
    return {(h.address, p.port) for h in result.hosts for p in h.ports if p.state == "open"}


async def service_scan(url: str, workers: int, network: Network) -> tuple[float, int, set[tuple[str, int]]]:
    """One quick_scan of the /22 through MCP: the server's time, hosts up and open ports."""
    async with mcp_session(url) as client:
        await wait_for_workers(client, workers)
        started = (await client.call_tool("quick_scan", {"target": str(network), "timeout": 5,
                                                         "rescan": True})).structured_content
        task_id = started["task_id"]
        # Polls the server, as an agent would: nothing local to wait on.
        while (status := (await client.call_tool("get_task_status", {"task_id": task_id})).structured_content)[  # noqa: ASYNC110
                "status"] in ("queued", "running"):
            await asyncio.sleep(0.05)
        assert status["status"] == "completed", status
        runs = (await client.call_tool("get_task_evidence", {"task_id": task_id})).structured_content["runs"]
        print(f"  {len(runs)} nmap run(s) of {workers} worker(s)", flush=True)
        found: set[tuple[str, int]] = set()
        offset: int | None = 0
        hosts_up = 0
        while offset is not None:
            page = (await client.call_tool("get_task_result", {"task_id": task_id, "offset": offset,
                                                               "limit": 1000})).structured_content
            hosts_up = page["result"]["hosts_up"]
            found |= {(h["address"], p["port"]) for h in page["result"]["hosts"] for p in h["ports"]}
            offset = page["page"]["next_offset"]
        return status["finished_at"] - status["created_at"], hosts_up, found


def run_service(workdir: Path, network: Network, workers: int, shard: int,
                slots: int) -> tuple[float, int, set[tuple[str, int]]]:
    """A fresh database, one --api process (its audit log in workdir/api) and `workers`
    --worker processes; one scan."""
    with postgres_database() as database_url:
        common = {"database_url": database_url, "max_concurrent_tasks": slots, "shard_addresses": shard,
                  "max_addresses_per_scan": network.num_addresses}
        api_config = service_config(workdir / "api", **common)
        api = start_api(api_config, role="api")
        processes = [start_worker(service_config(workdir / f"worker{i}", worker_name=f"worker{i}", **common))
                     for i in range(1, workers + 1)]
        try:
            return asyncio.run(service_scan(api.url, workers, network))
        finally:
            for process in processes:
                stop_process(process)
            api.stop()


def run_direct(argv: list[str], network: Network) -> tuple[float, int, set[tuple[str, int]]]:
    # The service has nmap write its XML to the pipe on its stdin (-oX /proc/self/fd/0); run
    # directly, the same XML goes to stdout.
    argv = ["-" if word == "/proc/self/fd/0" else word for word in argv]
    started = time.perf_counter()
    xml = subprocess.run([*own_user_sandbox(), *argv], stdin=subprocess.DEVNULL, capture_output=True, check=True).stdout
    seconds = time.perf_counter() - started
    result = parse_report(xml, str(network))
    return seconds, result.hosts_up, open_ports(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slots", type=int, default=4, help="max_concurrent_tasks of each worker")
    parser.add_argument("--shard", type=int, default=4096, help="shard_addresses of the sharded runs")
    parser.add_argument("--network", type=ipaddress.IPv4Network, default=Network("127.77.0.0/22"),
                        help="the loopback /22 scanned")
    args = parser.parse_args()
    network: Network = args.network
    assert network.is_loopback and network.num_addresses == 1024, "a loopback /22"
    listeners = Listeners()
    ports = {str(address): next(p for p in top_ports(100) if 1024 <= p < 32768 and listeners.open(p, str(address)))
             for address in (network[i] for i in LISTENING)}
    print(f"target {network}; listening on {', '.join(f'{a}:{p}' for a, p in ports.items())}")
    times: dict[str, list[float]] = {"direct": [], "unsharded": [], "sharded": []}
    seen: dict[str, set[tuple[int, frozenset[tuple[str, int]]]]] = {name: set() for name in times}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
            # The service's own argv for the whole /22 comes from a first unsharded run.
            run_service(Path(tmp) / "argv", network, 1, network.num_addresses + 1, args.slots)
            argv = queued_argv(Path(tmp) / "argv" / "api" / "audit.jsonl")
            print("nmap argv:", " ".join(argv))
            runs: dict[str, Callable[[Path], tuple[float, int, set[tuple[str, int]]]]] = {
                "unsharded": lambda d: run_service(d, network, 1, network.num_addresses + 1, args.slots),
                "sharded": lambda d: run_service(d, network, 2, args.shard, args.slots),
                "direct": lambda _d: run_direct(argv, network),
            }
            order = list(runs)
            for round_no in range(args.rounds):
                for name in order[round_no % 3:] + order[:round_no % 3]:
                    seconds, hosts_up, found = runs[name](Path(tmp) / f"r{round_no}-{name}")
                    times[name].append(seconds)
                    seen[name].add((hosts_up, frozenset(found)))
                    print(f"round {round_no + 1}: {name:9s} {seconds:6.2f} s, {hosts_up} hosts up, "
                          f"{len(found)} open ports", flush=True)
    finally:
        listeners.stop()
    answers = set().union(*seen.values())
    assert len(answers) == 1, f"every run must find the same hosts and ports: {seen}"
    hosts_up, found = answers.pop()
    assert hosts_up == network.num_addresses and found == set(ports.items()), (hosts_up, found)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\nmedians of {args.rounds} rounds ({args.slots} slots per worker, PostgreSQL):")
    for name, median in medians.items():
        print(f"  {name:9s} {median:6.2f} s   {median / medians['direct']:5.2f}x direct")
    print(f"sharded / unsharded: {medians['sharded'] / medians['unsharded']:.2f}x "
          f"(shard_addresses {args.shard}, two workers, vs one nmap in the service)")


if __name__ == "__main__":
    main()
