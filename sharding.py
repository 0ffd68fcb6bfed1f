"""Big scans as shards, without I/O: how big a scan's shards are, how it is cut into them, and
what a parent task shows of its shards (their progress while they run, their merged verdict
once all ended).

A sharded scan is a parent task (never claimed) and one task per shard, each with its own
argv; the stores keep the rows, this module decides what they mean.

Sharding pays only where shards run at once on different workers: every shard is one more
nmap start, claim and merge (measured on loopback, 16 shards of a /22 quick scan cost 0.2 s
against 0.6 s for the whole scan in one run), and nmap already scans many hosts in parallel
within one run. So a scan is split only over a pool of two or more live workers, and never
into shards smaller than the host group nmap itself finds efficient for that scan
(`efficient_group`); see `shard_size`. Unless the pool's own recent runs say that this kind of
scan waits on its network (`waits_on_network`): nmap then spends its time waiting for answers,
not working, and runs at once on one machine add up; such a scan is cut for every free slot of
its pool, one worker's included, down to nmap's own host group for it (`least_group`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from impact import option_values, ports_per_address, seconds_per_probe
from models import Progress, ScanResult, TaskStatus
from nmap_report import merge_results
from targets import IPNetwork

# A parent's verdict is the first of these its shards ended in; completed when none did.
_WORST_FIRST = (TaskStatus.FAILED, TaskStatus.INTERRUPTED, TaskStatus.CANCELLED)

# nmap's own host groups (nmap 7.9x: scan_engine.cc determineScanGroupSize, nmap.h
# PING_GROUP_SZ): host discovery, a ping scan's whole work, runs 4,096 hosts at a time; a UDP
# port scan 128; a TCP port scan 1,024 / its ports, at least 64. A shard below its scan's group
# makes each nmap run less parallel than one run of the whole scan would be.
PING_GROUP = 4096
UDP_GROUP = 128
TCP_GROUP_PROBES, TCP_GROUP_MIN = 1024, 64
# The probes (addresses x ports) a shard carries at least: 256 addresses of a quick scan's 100
# ports. nmap's manual (--min-hostgroup) calls 256 the common choice, a network "in Class C
# sized chunks", and host groups of 2,048 or more helpful for scans of a few ports; a shard's
# fixed cost (an nmap start, a claim, a merge) is then small beside its scan.
SHARD_MIN_PROBES = 25_600
# Shards per slot that can take one now: two, so that a worker that finishes early (a nearer
# network, a faster machine) takes more of the scan than a slow one.
SHARDS_PER_SLOT = 2
# A scan waits on its network when the pool's recent nmap runs of its kind spent at least this
# long per probe, less RUN_START_S each: nmap bound by this machine's 2 cores does 19,000
# probes a second or more on loopback (a /18 of 5 ports in 4.3 s: 52 us a probe; a quick scan
# of a /22 6 us), where a network of 100 ms round trips held it to 430-530 (a /22 of 5 ports
# in 9.7-12 s: 1.9-2.3 ms; a /24 1.6-2.5 ms). 0.5 ms is ten times the machine's slowest and a
# quarter of that network's. There nmap waits: 4 runs of a /24 at once took 4.0 s against
# 9.7-10.6 s for the /22 in one (bench-results 16).
SLOW_PROBE_S = 0.0005
# What a run costs whatever it scans (nmap's start in its sandbox, the claim, parse and
# verdict): 0.03-0.1 s here idle, several times that under load. Left out of each run's time,
# so that small fast scans, all start, do not read as slow probes.
RUN_START_S = 0.5
# Cut for its network only when the whole scan would take this long in one run: six times a
# run's fixed cost (RUN_START_S; on that slow network a run of 64 addresses, all waiting, took
# 0.9-1.6 s), so that what shards add stays small beside what running them at once saves.
LONG_SCAN_S = 3.0


class PoolCapacity(NamedTuple):
    """A pool as shard sizing sees it: its live workers, their slots (max_concurrent_tasks)
    together, and the nmap runs they reported at their last heartbeat."""

    workers: int
    slots: int
    running: int


@dataclass(frozen=True)
class Shard:
    """One part of a big scan: what it covers (for display) and its own argv."""

    target: str
    argv: list[str]


class ShardEnd(NamedTuple):
    """How one shard stands: its status, its result once it has one, its error."""

    status: TaskStatus
    result: ScanResult | None
    error: str | None


class ParentVerdict(NamedTuple):
    """What a parent task records once every shard has finished."""

    status: TaskStatus
    result: ScanResult | None
    error: str | None


def efficient_group(options: Sequence[str]) -> int:
    """The fewest addresses a shard of a scan with these (canonical) options may hold: nmap's own
    host group for the scan (raised by the caller's --min-hostgroup, as nmap does), or as many
    addresses as carry SHARD_MIN_PROBES probes, whichever is larger; a power of two (shards are
    whole subnets), at most nmap's largest group, a ping scan's 4,096. A quick scan (100 ports)
    gets 256, a scan of nmap's default 1,000 ports or of all ports 64, one port 4,096."""
    ports = max(ports_per_address(options), 1)
    return min(_power_of_two_at_least(max(_nmap_group(options), -(-SHARD_MIN_PROBES // ports))), PING_GROUP)


def least_group(options: Sequence[str]) -> int:
    """The fewest addresses a shard of a scan that waits on its network may hold: nmap's own
    host group for the scan (a TCP scan 1,024 / its ports, at least 64; UDP 128; a ping scan
    4,096; a --min-hostgroup), a power of two. Probes are not counted: a shard's nmap waits for
    its answers, its start is small beside that. Not below nmap's group: on a network of 100 ms
    round trips, 5 ports, a run of 64 addresses took 14-25 ms an address, of 256 10-14 ms, of
    1,024 9.5-10 ms; a /22 cut in 16 x 64, 4 at a time, 6.4 s, in 4 x 256 at once 4.0 s."""
    return min(_power_of_two_at_least(_nmap_group(options)), PING_GROUP)


def _nmap_group(options: Sequence[str]) -> int:
    given = option_values(options)
    if "-sn" in given:
        group = PING_GROUP
    elif "-sU" in given:
        group = UDP_GROUP
    else:
        group = max(TCP_GROUP_PROBES // max(ports_per_address(options), 1), TCP_GROUP_MIN)
    return max(group, int(given.get("--min-hostgroup") or 0))


def waits_on_network(probes: int, runs: Sequence[tuple[int, float]]) -> bool:
    """Whether a scan of `probes` waits on its network, from `runs`: (probes, seconds) of the
    pool's recent nmap runs of its kind, each scan run whole and each shard (not a sharded
    scan's own time, which its shards running at once shortened). Their seconds per probe
    (less RUN_START_S a run; the median, weighted toward runs of a similar size) must be at
    least SLOW_PROBE_S, and the scan's probes at that pace at least LONG_SCAN_S. No runs: no."""
    pace = seconds_per_probe(probes, [(count, max(seconds - RUN_START_S, 0.0)) for count, seconds in runs])
    return pace is not None and pace >= SLOW_PROBE_S and pace * probes >= LONG_SCAN_S


def shard_size(addresses: int, group: int, pool: PoolCapacity, largest: int, slow: bool = False) -> int | None:
    """How many addresses each shard of a scan of `addresses` holds; None: run it whole.

    - A pool with fewer than two live workers runs every scan whole, however large: shards on
      one machine share its CPU and network, where nmap already runs many hosts in parallel,
      and each costs a start and a merge (a pool with no live worker yet is sized as one).
      Unless the scan is `slow` (waits_on_network: its nmap waits, the cores idle): then one
      worker's free slots run its shards at once too.
    - Otherwise about SHARDS_PER_SLOT shards for each slot free now (at least one per
      worker, so that each takes part as its slots free), rounded up to a power of two:
      never below `group` (efficient_group, or least_group for a `slow` scan), never above
      `largest` (config shard_addresses, which also lowers `group` when set below it).
    - A scan no larger than its shard runs whole."""
    if pool.workers < (1 if slow else 2):
        return None
    takers = max(pool.slots - pool.running, pool.workers)
    wanted = _power_of_two_at_least(-(-addresses // (takers * SHARDS_PER_SLOT)))
    size = min(max(wanted, min(group, largest)), largest)
    return size if size < addresses else None


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def shard(argv: list[str], networks: Sequence[Sequence[IPNetwork]], size: int) -> list[Shard]:
    """Split a scan into shards of at most `size` addresses, each a copy of `argv` with its
    own targets after `--`. Networks larger than `size` are cut into subnets; whole networks
    are packed into shards in order, so that every address is scanned by exactly one shard."""
    pieces: list[IPNetwork] = []
    for network in (n for target in networks for n in target):
        if network.num_addresses <= size:
            pieces.append(network)
        else:
            bits = network.max_prefixlen - (size.bit_length() - 1)
            pieces.extend(network.subnets(new_prefix=bits))
    groups: list[list[IPNetwork]] = [[]]
    for piece in pieces:
        if sum(n.num_addresses for n in groups[-1]) + piece.num_addresses > size:
            groups.append([])
        groups[-1].append(piece)
    options = argv[: argv.index("--") + 1]
    return [Shard(target=" ".join(map(str, group)), argv=[*options, *map(str, group)]) for group in groups if group]


def shards_progress(shards: Sequence[tuple[TaskStatus, Progress | None]]) -> Progress:
    """A running parent's progress: the mean of its shards' (a finished one counts 100%; one
    queued again after its worker died counts from 0 again); seconds left are the longest of
    its shards' while every shard not finished has an estimate (they run in parallel)."""
    percents = [100.0 if status.finished else (progress.percent if progress else 0.0) for status, progress in shards]
    done = sum(status.finished for status, _ in shards)
    left = [progress.remaining_s for status, progress in shards
            if not status.finished and progress is not None and progress.remaining_s is not None]
    return Progress(percent=round(sum(percents) / max(len(percents), 1), 1),
                    phase=f"{done} of {len(shards)} shards finished",
                    remaining_s=max(left) if left and len(left) == len(shards) - done else None)


def parent_verdict(target: str, duration_s: float, shards: Sequence[ShardEnd], addresses: int) -> ParentVerdict | None:
    """The parent's verdict once every shard has finished (None before): the shards' results
    merged, the worst status any of them ended in, and each shard's error by its number. A
    verdict other than completed has a partial result, of all `addresses` the scan covers
    (a shard stopped before it found anything has no result to count its own)."""
    if not all(end.status.finished for end in shards):
        return None
    parts = [end.result for end in shards if end.result is not None]
    merged = merge_results(target, parts, duration_s) if parts else None
    statuses = {end.status for end in shards}
    status = next((s for s in _WORST_FIRST if s in statuses), TaskStatus.COMPLETED)
    if merged is not None and status is not TaskStatus.COMPLETED:
        merged = merged.model_copy(update={"partial": True, "hosts_total": max(addresses, merged.hosts_total)})
    errors = sorted({f"shard {i + 1}: {end.error}" for i, end in enumerate(shards) if end.error})
    return ParentVerdict(status, merged, "; ".join(errors) or None)
