"""nmap itself: pure argv building and verdicts, and the one function that runs nmap.

`build_argv` and `interpret_run` are pure. `run_nmap` owns the process from start to
end: a clean environment, an empty working directory, no stdin, a file-size limit of
zero, its own process group (killed on every exit path), stdout streamed to a sink as it
arrives and stderr read concurrently with a size cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from models import ScanKind, ScanResult, TaskStatus
from nmap_report import RAW_CAP, ReportParser

QUICK_OPTIONS: tuple[str, ...] = ("-T4", "--top-ports", "100")
# A full scan's first phase, port discovery over all ports. -T4 adapts its speed to the
# network; --min-rate 1000 only sets a floor (about 60 kB/s of connection attempts, which a
# real network takes easily) so that a host that drops probes is done in about a minute,
# and --max-retries 2 stops nmap's default of up to 10 retransmissions per port on filtered
# hosts. On loopback it finds the same open ports as -T4 alone, in 1.3 s instead of 1.8-2.9 s.
FULL_OPTIONS: tuple[str, ...] = ("-T4", "-p-", "--min-rate", "1000", "--max-retries", "2")
# Its second phase: version detection, on the ports discovery found open only.
VERSION_OPTIONS: tuple[str, ...] = ("-T4", "-sV")
# nmap writes <taskprogress> into its XML this often; the task records it as progress.
STATS_EVERY = "2s"
STDERR_CAP = 64 * 1024
_CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


class SandboxUnavailable(RuntimeError):
    """The commands that confine nmap are missing, so no scan may start."""


@dataclass(frozen=True)
class NmapRun:
    """How one nmap process ended (its stdout went to the sink)."""

    returncode: int | None
    stderr: bytes
    timed_out: bool
    duration: float


@dataclass(frozen=True)
class ScanOutcome:
    """The verdict on one run: the status to record, the result (possibly partial), an error."""

    status: TaskStatus
    result: ScanResult | None
    error: str | None
    raw_xml: bytes


def interpret_run(run: NmapRun, report: ReportParser, target: str, time_limit: float) -> ScanOutcome:
    """Judge a finished run from the process and from the XML (nmap exits 0 for many
    failures). Errors name what happened, never nmap's raw stderr; hosts finished before a
    failure are kept as a partial result."""
    result = report.result(target)
    error = _failure(run, report, result, time_limit)
    status = TaskStatus.FAILED if error else TaskStatus.COMPLETED
    keep = result if (status is TaskStatus.COMPLETED or result.hosts) else None
    return ScanOutcome(status, keep, error, bytes(report.raw))


def _failure(run: NmapRun, report: ReportParser, result: ScanResult, time_limit: float) -> str | None:
    if run.timed_out:
        return f"the scan ran past its time limit of {time_limit:g} s and was stopped; hosts finished so far are kept"
    if report.truncated:
        return f"nmap wrote more than {RAW_CAP // 2**20} MiB; scan fewer targets or ports"
    if run.returncode != 0:
        return f"nmap exited with status {run.returncode}; details are in the server log"
    if result.exit_status == "error":
        return "nmap stopped with an error: " + (result.errors[0] if result.errors else "no message")
    if not report.complete:
        return "nmap's report ended before it was complete"
    if result.hosts_total == 0:
        return "nmap scanned no hosts: every target was excluded or resolved to nothing"
    return None


def scan_options(kind: ScanKind, *, privileged: bool) -> list[str]:
    """The nmap options of a built-in scan: SYN when privileged, else TCP connect."""
    preset = QUICK_OPTIONS if kind is ScanKind.QUICK else FULL_OPTIONS
    return ["-sS" if privileged else "-sT", *preset]


def build_argv(
    nmap_path: str,
    options: Sequence[str],
    targets: Sequence[str],
    *,
    ipv6: bool,
    privileged: bool,
) -> list[str]:
    """The full argv: validated options, the server's own output flags, `--`, targets.

    `-n` always: targets arrive already resolved, and reverse lookups are surprise traffic.
    `--` ends option parsing, so nothing after it can ever be read as an option.
    """
    argv = [nmap_path, *options, "-n", "-oX", "-", "--stats-every", STATS_EVERY,
            "--privileged" if privileged else "--unprivileged"]
    if ipv6:
        argv.append("-6")
    return [*argv, "--", *targets]


def version_argv(discovery_argv: Sequence[str], discovery: ScanResult) -> list[str] | None:
    """The second phase of a full scan: -sV on each port discovery found open, on the hosts
    that have them, with the first phase's scan type and privileges; None when none is open."""
    open_ports = sorted({(p.protocol, p.port) for h in discovery.hosts for p in h.ports if p.state == "open"})
    hosts = [h.address for h in discovery.hosts if any(p.state == "open" for p in h.ports)]
    if not hosts:
        return None
    ports = ",".join(f"{'U' if protocol == 'udp' else 'T'}:{port}" for protocol, port in open_ports)
    privileged = "--privileged" in discovery_argv
    return build_argv(discovery_argv[0], [discovery_argv[1], *VERSION_OPTIONS, "-p", ports], hosts,
                      ipv6="-6" in discovery_argv, privileged=privileged)


async def nmap_build(nmap_path: str) -> dict[str, object]:
    """What `nmap --version` says of itself: version, platform, libraries, nsock engines."""
    proc = await asyncio.create_subprocess_exec(
        nmap_path, "--version", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, env=nmap_environment())
    async with asyncio.timeout(10):
        out, _ = await proc.communicate()
    return parse_version_output(out.decode("utf-8", "replace"))


def parse_version_output(text: str) -> dict[str, object]:
    """The fields of `nmap --version` output (no URL, nothing else of it)."""
    fields = dict(line.split(":", 1) for line in text.splitlines()[1:] if ":" in line)
    first = text.splitlines()[0] if text else ""
    return {
        "nmap_version": first.removeprefix("Nmap version ").split(" ", 1)[0],
        "platform": fields.get("Platform", "").strip(),
        "compiled_with": fields.get("Compiled with", "").split(),
        "compiled_without": fields.get("Compiled without", "").split(),
        "nsock_engines": fields.get("Available nsock engines", "").split(),
    }


@functools.cache
def sandbox_prefix() -> tuple[str, ...]:
    """util-linux commands that exec nmap with no file writes, dying with the server.

    `prlimit --fsize=0` makes any file write fail (SIGXFSZ) while pipes keep working;
    `setpriv --pdeathsig KILL` kills nmap if the server dies, even by SIGKILL. Doing this
    in a `preexec_fn` instead forces a full fork() of the server: measured here at 7.7 ms
    of blocked event loop per scan, against 2.8 ms for this vfork-friendly chain.
    """
    tools = {name: shutil.which(name) for name in ("setpriv", "prlimit")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        raise SandboxUnavailable(f"{' and '.join(missing)} not found: install util-linux")
    return (tools["setpriv"], "--pdeathsig", "KILL", "--", tools["prlimit"], "--fsize=0", "--")  # type: ignore[return-value]


def watch_children_with_pidfd() -> None:
    """Have asyncio learn of nmap's exit from a pidfd in the event loop. Python 3.11 waits for
    each child in a thread of its own instead (ThreadedChildWatcher): a thread started per scan,
    about a millisecond of the server's CPU each under load. 3.12 uses a pidfd by itself; a
    kernel older than 5.3 has none, and keeps the threads. Called in the loop that runs nmap:
    on 3.11 the watcher belongs to one loop."""
    if sys.version_info >= (3, 12):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.set_child_watcher(watcher)


def nmap_environment() -> dict[str, str]:
    """Nothing of ours (NMAP_ARGS and friends never reach nmap), except the operator's own
    NMAPDIR, where an nmap installed elsewhere keeps its data."""
    nmapdir = os.environ.get("NMAPDIR")
    return _CLEAN_ENV | {"NMAPDIR": nmapdir} if nmapdir else dict(_CLEAN_ENV)


async def run_nmap(argv: Sequence[str], *, time_limit: float, stdout_sink: Callable[[bytes], None]) -> NmapRun:
    """Run nmap once; kill its whole process group on timeout, cancellation or error."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nmap-mcp-") as workdir:
        proc = await asyncio.create_subprocess_exec(
            *sandbox_prefix(),
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=workdir,
            env=nmap_environment(),
            start_new_session=True,
        )
        try:
            stderr, timed_out = await _collect(proc, time_limit, stdout_sink)
        finally:
            _kill_group(proc.pid)
            await proc.wait()
    return NmapRun(proc.returncode, stderr, timed_out, time.monotonic() - started)


async def _collect(
    proc: asyncio.subprocess.Process, time_limit: float, stdout_sink: Callable[[bytes], None]
) -> tuple[bytes, bool]:
    assert proc.stdout is not None and proc.stderr is not None
    readers = asyncio.gather(_stream(proc.stdout, stdout_sink), _read_capped(proc.stderr, STDERR_CAP))
    timed_out = False
    try:
        async with asyncio.timeout(time_limit):
            await proc.wait()
    except TimeoutError:
        timed_out = True
        _kill_group(proc.pid)
    except BaseException:
        _kill_group(proc.pid)
        readers.cancel()
        await asyncio.gather(readers, return_exceptions=True)
        raise
    _, stderr = await readers
    return stderr, timed_out


async def _stream(stream: asyncio.StreamReader, sink: Callable[[bytes], None]) -> None:
    while chunk := await stream.read(65536):
        sink(chunk)


async def _read_capped(stream: asyncio.StreamReader, cap: int) -> bytes:
    """Read to EOF, keeping at most `cap` bytes; draining the rest keeps nmap unblocked."""
    kept = bytearray()
    while chunk := await stream.read(65536):
        kept += chunk[: max(cap - len(kept), 0)]
    return bytes(kept)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
