"""One progress scale per task: a percent from 0 to 100 across everything the task runs, that
never goes down (the MCP spec: each progress notification's value increases).

nmap starts each of its own tasks (Ping Scan, Connect Scan, Service scan, NSE, ...) at 0 % again,
and a full scan runs nmap twice. `TaskProgress` puts them on one scale:
- each nmap run of a task fills a span of it: a full scan's port discovery 0-70 %, its version
  detection 70-100 % (discovery is usually seconds, version detection runs up to its
  time bound; weights in DISCOVERY, VERSION_DETECTION); any other scan's one run 0-100 %;
- within a run, each nmap task fills what is left of the run's span from where the one before it
  stopped (nmap does not say how many tasks follow);
- a run with a time bound of its own (version detection) is at least as far as the share of its
  bound already used: nmap counts version detection in services finished, so a few slow services
  stay at 0 % until they end; its seconds left are then at most what the bound leaves;
- the percent never goes below one it showed before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from models import Progress


@dataclass(frozen=True)
class Span:
    """The part of a task's scale one nmap run fills: `width` % from `start` %, shown as `label`."""

    label: str
    start: float
    width: float


WHOLE = Span("", 0.0, 100.0)
# A full scan's phases: discovery is usually seconds, version detection up to its time bound.
DISCOVERY = Span("port discovery (1 of 2)", 0.0, 70.0)
VERSION_DETECTION = Span("version detection (2 of 2)", 70.0, 30.0)


@dataclass
class _Run:
    """One nmap run's span of the task's scale, and how far within it nmap's tasks got."""

    span: Span
    bound_s: float | None
    began: float
    nmap_task: str = ""
    # Of the run (0-100): where nmap's current task began, and the most any of its tasks reached.
    task_base: float = 0.0
    reached: float = 0.0


class TaskProgress:
    """The progress shown for one task, fed nmap's own reports (ReportParser.progress)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._run = _Run(WHOLE, None, clock())
        self._shown = 0.0

    def begin(self, span: Span, bound_s: float | None = None) -> None:
        """A new nmap run of the task, filling `span`, within `bound_s` if given."""
        self._run = _Run(span, bound_s, self._clock())

    def shown(self, nmap: Progress | None) -> Progress | None:
        """The task's progress now, from nmap's latest report of its current task (None: none
        yet); None only while an unnamed run has had no report."""
        run = self._run
        if nmap is None and not run.span.label:
            return None
        if nmap is not None:
            self._follow(run, nmap)
        elapsed_s = self._clock() - run.began
        within = max(run.reached, 100.0 * elapsed_s / run.bound_s if run.bound_s else 0.0)
        self._shown = max(self._shown, round(run.span.start + run.span.width * min(within, 100.0) / 100.0, 1))
        bound_left_s = max(int(run.bound_s - elapsed_s), 0) if run.bound_s else None
        left = [s for s in (nmap.remaining_s if nmap else None, bound_left_s) if s is not None]
        phase = ": ".join(part for part in (run.span.label, nmap.phase if nmap else "") if part)
        return Progress(percent=self._shown, phase=phase, remaining_s=min(left) if left else None)

    @staticmethod
    def _follow(run: _Run, nmap: Progress) -> None:
        if nmap.phase != run.nmap_task:
            run.nmap_task, run.task_base = nmap.phase, run.reached
        run.reached = max(run.reached, run.task_base + (100.0 - run.task_base) * min(nmap.percent, 100.0) / 100.0)
