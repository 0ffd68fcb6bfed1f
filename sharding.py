"""Big scans as shards, without I/O: how a scan is cut into shards, and what a parent task
shows of its shards (their progress while they run, their merged verdict once all ended).

A sharded scan is a parent task (never claimed) and one task per shard, each with its own
argv; the stores keep the rows, this module decides what they mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from models import Progress, ScanResult, TaskStatus
from nmap_report import merge_results
from targets import IPNetwork

# A parent's verdict is the first of these its shards ended in; completed when none did.
_WORST_FIRST = (TaskStatus.FAILED, TaskStatus.INTERRUPTED, TaskStatus.CANCELLED)


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
    """A running parent's progress: the mean of its shards' (a finished one counts 100%), each
    of which never goes down; seconds left are the longest of its shards' while every shard
    not finished has an estimate (they run in parallel)."""
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
