"""sharding.py, pure: how a big scan is cut, and what its parent shows of its shards."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from models import Progress, ScanResult, TaskStatus
from nmap_report import ReportParser
from sharding import (
    PoolCapacity,
    ShardEnd,
    efficient_group,
    least_group,
    parent_verdict,
    shard,
    shard_size,
    shards_progress,
    waits_on_network,
)

FIXTURES = Path(__file__).parent / "fixtures"


def result_of(name: str) -> ScanResult:
    report = ReportParser()
    report.feed((FIXTURES / name).read_bytes())
    return report.result("127.0.0.1")


def test_shards_cover_every_address_once() -> None:
    argv = ["nmap", "-sT", "-p", "22", "--", "10.0.0.0/22"]
    shards = shard(argv, [[ipaddress.ip_network("10.0.0.0/22")]], 64)
    assert len(shards) == 16 and all(s.argv[:5] == argv[:5] for s in shards)
    covered = [a for s in shards for t in s.argv[5:] for a in ipaddress.ip_network(t)]
    assert sorted(covered) == list(ipaddress.ip_network("10.0.0.0/22")) and len(set(covered)) == 1024
    mixed = shard(argv, [[ipaddress.ip_network("10.0.0.1/32")], [ipaddress.ip_network("10.0.1.0/26")]], 64)
    assert [s.target for s in mixed] == ["10.0.0.1/32", "10.0.1.0/26"]




@pytest.mark.parametrize(("options", "group"), [
    (["-sT", "--top-ports", "100"], 256),          # quick_scan: 256 x 100 ports, nmap's "Class C sized chunks"
    (["-sS", "-F"], 256),
    (["-sT", "-p", "1-1000"], 64),                 # nmap's own TCP group: 1,024 / ports, at least 64
    (["-sT"], 64),                                 # nmap's default 1,000 ports
    (["-sT", "-p", "1-65535"], 64),                # full_scan's discovery
    (["-sT", "-p", "1-200"], 128),                 # 25,600 probes / 200 ports
    (["-sT", "-p", "1-50"], 512),
    (["-sT", "-p", "22"], 4096),                   # a few ports: 2,048 or more (nmap's manual), capped
    (["-sT", "-p", "22,80,443"], 4096),
    (["-sn"], 4096),                               # host discovery's group, PING_GROUP_SZ
    (["-sU", "--top-ports", "20"], 2048),
    (["-sU", "-sS", "--top-ports", "1000"], 128),  # nmap's UDP group
    (["-sT", "-p", "1-1000", "--min-hostgroup", "200"], 256),
])
def test_the_efficient_group_is_nmap_s_own_host_group_or_enough_probes_a_power_of_two(
    options: list[str], group: int
) -> None:
    assert efficient_group(options) == group


IDLE_ONE = PoolCapacity(workers=1, slots=10, running=0)
IDLE_TWO = PoolCapacity(workers=2, slots=8, running=0)


@pytest.mark.parametrize(("addresses", "group", "pool", "largest", "size"), [
    # One live worker (or none yet): one nmap run, however large the scan.
    (65_536, 256, IDLE_ONE, 4096, None),
    (65_536, 256, PoolCapacity(1, 1, 0), 4096, None),
    (65_536, 256, PoolCapacity(0, 0, 0), 4096, None),
    # Two workers: two shards per slot free, a power of two, within [group, largest].
    (1024, 256, IDLE_TWO, 4096, 256),               # 1024 / 16 = 64, never below the group
    (65_536, 256, IDLE_TWO, 4096, 4096),            # 65536 / 16 = 4096
    (16_384, 256, IDLE_TWO, 4096, 1024),
    (65_536, 64, PoolCapacity(2, 40, 0), 4096, 1024),
    (65_536, 64, PoolCapacity(8, 80, 0), 4096, 512),
    (65_536, 256, PoolCapacity(2, 8, 0), 2048, 2048),  # shard_addresses bounds a shard
    # Busy slots: fewer, larger shards, at least one per worker.
    (4096, 64, PoolCapacity(2, 8, 8), 4096, 1024),
    (4096, 64, PoolCapacity(2, 8, 12), 4096, 1024),
    (4096, 64, PoolCapacity(2, 8, 4), 4096, 512),
    # A scan no larger than its shard runs whole.
    (256, 256, IDLE_TWO, 4096, None),
    (300, 256, IDLE_TWO, 4096, 256),
    (4096, 4096, IDLE_TWO, 4096, None),
    # shard_addresses below the group lowers it (an operator's choice, and the tests').
    (128, 4096, IDLE_TWO, 32, 32),
    (64, 4096, IDLE_TWO, 16, 16),
])
def test_a_shard_is_sized_from_the_pool_s_capacity_within_the_efficient_group_and_shard_addresses(
    addresses: int, group: int, pool: PoolCapacity, largest: int, size: int | None
) -> None:
    assert shard_size(addresses, group, pool, largest) == size


@pytest.mark.parametrize(("options", "group"), [
    (["-sT", "-p", "22,80,443,8080,8443"], 256),   # 1,024 / 5 ports: 204, a power of two
    (["-sT", "--top-ports", "100"], 64),           # nmap's least TCP group
    (["-sT", "-p", "22"], 1024),
    (["-sU", "--top-ports", "20"], 128),
    (["-sn"], 4096),
    (["-sT", "-p", "1-1000", "--min-hostgroup", "200"], 256),
])
def test_the_least_group_is_nmap_s_own_host_group_without_counting_probes(options: list[str], group: int) -> None:
    assert least_group(options) == group


# (probes, seconds) of nmap runs: a /22 of 5 ports on a network of 100 ms round trips (12 s),
# and its shards of 256 there; on loopback, a /18 of 5 ports (4.3 s; 13 s on a busy machine),
# a /22 quick scan (0.6 s), one address's quick scan (0.05 s; 0.4 s busy).
SLOW_RUNS = [(5120, 12.0), (1280, 3.4), (1280, 3.1)]
FAST_RUNS = [(81_920, 4.3), (81_920, 13.0), (102_400, 0.6)]
SMALL_FAST_RUNS = [(100, 0.05), (100, 0.4), (500, 0.45)]


@pytest.mark.parametrize(("probes", "runs", "slow"), [
    (5120, SLOW_RUNS, True),
    (81_920, SLOW_RUNS, True),
    (2560, SLOW_RUNS, True),              # 5.7 s at that pace: long enough to cut
    (640, SLOW_RUNS, False),              # 1.4 s: not worth the shards' starts and merges
    (81_920, FAST_RUNS, False),
    (409_600, FAST_RUNS, False),          # long, but nmap is busy, not waiting
    (81_920, SMALL_FAST_RUNS, False),     # small runs are all start: no pace read from them
    (81_920, [], False),                  # no runs yet: nothing says it waits
])
def test_a_scan_waits_on_its_network_when_the_pool_s_runs_were_slow_per_probe_and_it_is_long(
    probes: int, runs: list[tuple[int, float]], slow: bool
) -> None:
    assert waits_on_network(probes, runs) is slow


@pytest.mark.parametrize(("addresses", "group", "pool", "largest", "size"), [
    # One worker's free slots take two shards each, down to the least group.
    (1024, 256, PoolCapacity(1, 4, 0), 65_536, 256),
    (4096, 256, PoolCapacity(1, 4, 0), 4096, 512),
    (4096, 256, PoolCapacity(2, 8, 0), 4096, 256),
    (4096, 64, PoolCapacity(2, 8, 0), 4096, 256),
    (65_536, 64, PoolCapacity(2, 8, 0), 4096, 4096),   # shard_addresses bounds it still
    (1024, 64, PoolCapacity(1, 4, 3), 65_536, 512),   # one slot free: at least one shard per worker
    (256, 256, PoolCapacity(1, 4, 0), 65_536, None),
    (65_536, 64, PoolCapacity(0, 0, 0), 4096, None),   # no live worker: whole
])
def test_a_scan_that_waits_on_its_network_is_cut_for_every_free_slot_one_worker_s_included(
    addresses: int, group: int, pool: PoolCapacity, largest: int, size: int | None
) -> None:
    assert shard_size(addresses, group, pool, largest, slow=True) == size
    if pool.workers == 1:
        assert shard_size(addresses, group, pool, largest) is None, "not slow: one worker runs it whole"


def test_a_parent_s_progress_is_the_mean_of_its_shards() -> None:
    progress = shards_progress([(TaskStatus.COMPLETED, None), (TaskStatus.RUNNING, Progress(percent=50.0, phase="x")),
                                (TaskStatus.QUEUED, None), (TaskStatus.FAILED, None)])
    assert progress == Progress(percent=62.5, phase="2 of 4 shards finished")


def test_a_parent_has_no_verdict_while_a_shard_runs() -> None:
    done = ShardEnd(TaskStatus.COMPLETED, result_of("quick_loopback.xml"), None)
    assert parent_verdict("127.0.0.0/24", 1.0, [done, ShardEnd(TaskStatus.RUNNING, None, None)], 256) is None


def test_a_parent_merges_its_shards_results_and_takes_their_worst_status_partial_unless_completed() -> None:
    quick, multi = result_of("quick_loopback.xml"), result_of("multi_host.xml")
    completed = parent_verdict("t", 2.5, [ShardEnd(TaskStatus.COMPLETED, quick, None),
                                          ShardEnd(TaskStatus.COMPLETED, multi, None)], 9)
    assert completed is not None and completed.status is TaskStatus.COMPLETED and completed.error is None
    assert completed.result is not None and not completed.result.partial and completed.result.hosts_total == 9
    assert [h.address for h in completed.result.hosts] == [*(h.address for h in quick.hosts),
                                                           *(h.address for h in multi.hosts)]
    mixed = parent_verdict("t", 2.5, [ShardEnd(TaskStatus.CANCELLED, None, "cancelled"),
                                      ShardEnd(TaskStatus.INTERRUPTED, quick, "stopped"),
                                      ShardEnd(TaskStatus.COMPLETED, multi, None)], 20)
    assert mixed is not None and mixed.status is TaskStatus.INTERRUPTED
    assert mixed.error == "shard 1: cancelled; shard 2: stopped"
    assert mixed.result is not None and mixed.result.partial, "a verdict other than completed is partial"
    assert mixed.result.hosts_total == 20, "the addresses the scan covers, not only those of shards with a result"
    nothing = parent_verdict("t", 2.5, [ShardEnd(TaskStatus.FAILED, None, "nmap exited"),
                                        ShardEnd(TaskStatus.INTERRUPTED, None, "stopped")], 20)
    assert nothing == (TaskStatus.FAILED, None, "shard 1: nmap exited; shard 2: stopped")


def test_a_parent_s_seconds_left_are_its_slowest_shard_s_while_every_unfinished_shard_has_an_estimate() -> None:
    running = [(TaskStatus.RUNNING, Progress(percent=50.0, phase="x", remaining_s=30)),
               (TaskStatus.RUNNING, Progress(percent=20.0, phase="x", remaining_s=90)), (TaskStatus.COMPLETED, None)]
    assert shards_progress(running).remaining_s == 90
    assert shards_progress([*running, (TaskStatus.QUEUED, None)]).remaining_s is None
