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
(`efficient_group`); see `shard_size`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from impact import option_values, ports_per_address
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
    given = option_values(options)
    ports = max(ports_per_address(options), 1)
    if "-sn" in given:
        nmap_group = PING_GROUP
    elif "-sU" in given:
        nmap_group = UDP_GROUP
    else:
        nmap_group = max(TCP_GROUP_PROBES // ports, TCP_GROUP_MIN)
    nmap_group = max(nmap_group, int(given.get("--min-hostgroup") or 0))
    return min(_power_of_two_at_least(max(nmap_group, -(-SHARD_MIN_PROBES // ports))), PING_GROUP)


def shard_size(addresses: int, group: int, pool: PoolCapacity, largest: int) -> int | None:
    """How many addresses each shard of a scan of `addresses` holds; None: run it whole.

    - A pool with fewer than two live workers runs every scan whole, however large: shards on
      one machine share its CPU and network, where nmap already runs many hosts in parallel,
      and each costs a start and a merge (a pool with no live worker yet is sized as one).
    - Otherwise about SHARDS_PER_SLOT shards for each slot free now (at least one per
      worker, so that each takes part as its slots free), rounded up to a power of two:
      never below `group` (efficient_group), never above `largest` (config shard_addresses,
      which also lowers `group` when set below it).
    - A scan no larger than its shard runs whole."""
    if pool.workers < 2:
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
