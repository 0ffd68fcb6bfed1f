"""task_progress.py: one scale per task across nmap's own tasks and a full scan's two runs,
never going down, with seconds left in every phase (pure, on a fake clock)."""

from __future__ import annotations

from models import Progress
from task_progress import DISCOVERY, VERSION_DETECTION, TaskProgress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def nmap(task: str, percent: float, remaining_s: int | None = None) -> Progress:
    return Progress(percent=percent, phase=task, remaining_s=remaining_s)


def test_a_full_scan_goes_up_across_its_two_runs() -> None:
    clock = Clock()
    progress = TaskProgress(clock)
    progress.begin(DISCOVERY)
    seen = [progress.shown(None), progress.shown(nmap("Connect Scan", 54.0, 8)),
            progress.shown(nmap("Connect Scan", 87.0, 2))]
    clock.now += 1
    progress.begin(VERSION_DETECTION, 100)
    seen += [progress.shown(None), progress.shown(nmap("Service scan", 0.0))]
    percents = [p.percent for p in seen if p is not None]
    assert percents == [0.0, 37.8, 60.9, 70.0, 70.0], "discovery fills 0-70 %, version detection 70-100 %"
    assert seen[1] == nmap("port discovery (1 of 2): Connect Scan", 37.8, 8)
    assert seen[3] == nmap("version detection (2 of 2)", 70.0, 100)


def test_a_version_phase_nmap_holds_at_0_percent_moves_with_its_time_bound() -> None:
    clock = Clock()
    progress = TaskProgress(clock)
    progress.begin(VERSION_DETECTION, 100)
    shown = []
    for _ in range(4):
        clock.now += 25
        shown.append(progress.shown(nmap("Service scan", 0.0)))
    assert [(p.percent, p.remaining_s) for p in shown if p] == [(77.5, 75), (85.0, 50), (92.5, 25), (100.0, 0)]
    assert progress.shown(nmap("Service scan", 50.0, 3)) == nmap("version detection (2 of 2): Service scan", 100.0, 0)


def test_each_nmap_task_of_a_run_continues_where_the_one_before_stopped() -> None:
    progress = TaskProgress(Clock())
    assert progress.shown(None) is None, "nothing to say before nmap reports"
    first = progress.shown(nmap("Ping Scan", 40.0, 10))
    again = progress.shown(nmap("Ping Scan", 30.0, 12))
    second = [progress.shown(nmap("Connect Scan", percent)) for percent in (0.0, 50.0, 100.0)]
    assert [p.percent for p in (first, again, *second) if p] == [40.0, 40.0, 40.0, 70.0, 100.0]
    assert again == nmap("Ping Scan", 40.0, 12), "nmap's own dip within a task is not shown"
