"""sharding.py, pure: how a big scan is cut, and what its parent shows of its shards."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from models import Progress, ScanResult, TaskStatus
from nmap_report import ReportParser
from sharding import ShardEnd, parent_verdict, shard, shards_progress

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
