"""What nmap's sandbox costs a root server: one quick scan run by run_nmap in each sandbox.

    sudo .venv/bin/python bench/sandbox_overhead.py [--runs 20]

Alternates, so that machine noise hits each alike, one SYN quick scan (`-sS --top-ports 100`)
of a listener on 127.46.0.1 in: the sandbox of a server that is not root (setpriv and prlimit:
nmap as root here), the drop to nmap_user without Landlock, and the drop with Landlock (what a
root server runs). Prints the median time of each run and the time the event loop was blocked
starting nmap (subprocess.Popen), and the difference to the first. Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import ScanKind  # noqa: E402
from sandbox import Sandbox, confinement  # noqa: E402
from scanner import build_argv, run_nmap, scan_options  # noqa: E402
from server import find_nmap  # noqa: E402
from tests.support import Listeners, free_port, own_user_sandbox  # noqa: E402

TARGET = "127.46.0.1"


class TimedPopen(subprocess.Popen[bytes]):
    """subprocess.Popen that adds the time each start took (the event loop waits for it)."""

    started_s: list[float] = []  # noqa: RUF012 - one list for the whole run, on purpose

    def __init__(self, *args: object, **kwargs: object) -> None:
        began = time.perf_counter()
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        TimedPopen.started_s.append(time.perf_counter() - began)


async def one_scan(argv: list[str], sandbox: Sandbox) -> float:
    started = time.perf_counter()
    run = await run_nmap(argv, sandbox=sandbox.prefix, time_limit_s=60, xml_sink=lambda _: None,
                         output_sink=lambda _: None)
    assert run.returncode == 0, run.stderr
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run it as root: the drop to nmap_user is what it measures")
    nmap = find_nmap("nmap")
    with mock.patch("landlock_exec.abi_version", return_value=0):
        dropped = confinement(None, privileged=True, nmap_path=nmap)
    sandboxes = {
        "server not root (setpriv, prlimit)": Sandbox(own_user_sandbox()),
        "drop to nobody, no Landlock": dropped,
        "drop to nobody and Landlock": confinement(None, privileged=True, nmap_path=nmap),
    }
    listeners = Listeners()
    listeners.open(free_port(TARGET), TARGET)
    argv = build_argv(nmap, scan_options(ScanKind.QUICK, privileged=True), [TARGET], ipv6=False, privileged=True)
    subprocess.Popen = TimedPopen  # type: ignore[misc]
    runs: dict[str, list[float]] = {name: [] for name in sandboxes}
    starts: dict[str, list[float]] = {name: [] for name in sandboxes}
    try:
        for _ in range(args.runs):
            for name, sandbox in sandboxes.items():
                runs[name].append(asyncio.run(one_scan(argv, sandbox)))
                starts[name].append(TimedPopen.started_s[-1])
    finally:
        listeners.stop()
    base = statistics.median(runs[next(iter(runs))])
    print(f"{args.runs} SYN quick scans of {TARGET} per sandbox, alternated; medians")
    for name in sandboxes:
        run_ms, start_ms = statistics.median(runs[name]) * 1000, statistics.median(starts[name]) * 1000
        print(f"{name:36} scan {run_ms:6.1f} ms (+{run_ms - base * 1000:5.1f})   Popen {start_ms:4.1f} ms")


if __name__ == "__main__":
    main()
