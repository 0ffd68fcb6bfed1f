"""nmap itself: pure argv building, the one function that runs nmap, and the facts of a run.

`build_argv` and `run_problem` are pure; what a run's facts mean for its task is decided by
worker.judge, not here. `run_nmap` owns the process from start to end: under the commands of
its sandbox (sandbox.py: no file writes, death with the server, another user when the server
is root), a clean environment, an empty working directory, its own process group (killed on
every exit path), its XML report and its normal output each streamed to a sink as they
arrive, and stderr read concurrently with a size cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict

from findings import address_key
from models import ScanKind, ScanResult
from nmap_report import RAW_CAP, ReportParser
from targets import address_count

QUICK_OPTIONS: tuple[str, ...] = ("-T4", "--top-ports", "100")
# A full scan's first phase, port discovery over all ports. -T4 adapts its speed to the
# network; --min-rate 1000 only sets a floor (about 60 kB/s of connection attempts, which a
# real network takes easily) so that a host that drops probes is done in about a minute,
# and --max-retries 2 stops nmap's default of up to 10 retransmissions per port on filtered
# hosts. On loopback it finds the same open ports as -T4 alone, in 1.3 s instead of 1.8-2.9 s.
# Its ports are written as custom_scan's allowlist writes -p- (argv_check compares word for word).
FULL_OPTIONS: tuple[str, ...] = ("-T4", "-p", "1-65535", "--min-rate", "1000", "--max-retries", "2")
# Its second phase: version detection, on the ports discovery found open only.
VERSION_OPTIONS: tuple[str, ...] = ("-T4", "-sV")
# nmap writes <taskprogress> into its XML this often; the task records it as progress.
STATS_EVERY = "2s"
# Where nmap writes its XML: its stdin, which run_nmap makes the write end of a pipe. With
# `-oX -` nmap silences its normal output on stdout, and that output (with -v) is where it
# says "Discovered open port ..." the moment it finds one; the XML holds a host only once its
# host group is done. nmap never reads stdin here (-iL is not allowed) and its run-time
# keyboard input comes from /dev/tty. /proc rather than /dev/fd: a minimal /dev may lack it.
XML_OUTPUT = "/proc/self/fd/0"
STDERR_CAP = 64 * 1024
_CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@dataclass(frozen=True)
class NmapRun:
    """How one nmap process ended (its stdout went to the sink)."""

    returncode: int | None
    stderr: bytes
    timed_out: bool
    duration_s: float


def run_problem(run: NmapRun, report: ReportParser, result: ScanResult, time_limit_s: float) -> str | None:
    """What went wrong with a finished run, in words for the caller (never nmap's raw stderr);
    None when nothing did. nmap exits 0 for many failures, so the XML is read too: `result` is
    the report's result for the scan's target."""
    if run.timed_out:
        return f"the scan ran past its time limit of {time_limit_s:g} s and was stopped; what it found so far is kept"
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


def scan_options(kind: ScanKind, *, privileged: bool, skip_host_discovery: bool = False) -> list[str]:
    """The nmap options of a built-in scan: SYN when privileged, else TCP connect; with
    `skip_host_discovery`, -Pn (every target is scanned as up, also one that drops pings)."""
    preset = QUICK_OPTIONS if kind is ScanKind.QUICK else FULL_OPTIONS
    return ["-sS" if privileged else "-sT", *["-Pn"] * skip_host_discovery, *preset]


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
    `-v` for the open ports nmap announces as it finds them (see XML_OUTPUT).
    `--` ends option parsing, so nothing after it can ever be read as an option.
    """
    argv = [nmap_path, *options, "-n", "-v", "-oX", XML_OUTPUT, "--stats-every", STATS_EVERY,
            "--privileged" if privileged else "--unprivileged"]
    if ipv6:
        argv.append("-6")
    return [*argv, "--", *targets]


def scanned_addresses(argv: Sequence[str]) -> int:
    """How many addresses an argv the server built asks nmap to scan (its targets after `--`)."""
    return address_count(argv[list(argv).index("--") + 1:]) if "--" in argv else 0


def version_argv(discovery_argv: Sequence[str],
                 open_by_host: Mapping[str, Sequence[tuple[str, int]]]) -> list[str] | None:
    """The second phase of a full scan: -sV on each port discovery found open (`open_by_host`:
    each host's open ports, as protocol and port), on the hosts that have them, with the first
    phase's scan type, rate cap (--max-rate) and privileges; None when none is open."""
    open_ports = sorted({port for ports in open_by_host.values() for port in ports})
    hosts = sorted((address for address, ports in open_by_host.items() if ports), key=address_key)
    if not hosts:
        return None
    ports = ",".join(f"{'U' if protocol == 'udp' else 'T'}:{port}" for protocol, port in open_ports)
    privileged = "--privileged" in discovery_argv
    at = discovery_argv.index("--max-rate") if "--max-rate" in discovery_argv else len(discovery_argv)
    rate = list(discovery_argv[at:at + 2])
    return build_argv(discovery_argv[0], [discovery_argv[1], *VERSION_OPTIONS, "-p", ports, *rate], hosts,
                      ipv6="-6" in discovery_argv, privileged=privileged)


class NmapBuild(TypedDict):
    """What `nmap --version` says of the nmap that runs scans."""

    nmap_version: str
    platform: str
    compiled_with: list[str]
    compiled_without: list[str]
    nsock_engines: list[str]


async def nmap_build(nmap_path: str, sandbox: Sequence[str]) -> NmapBuild:
    """What `nmap --version` says of itself: version, platform, libraries, nsock engines."""
    proc = await asyncio.create_subprocess_exec(
        *sandbox, nmap_path, "--version", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, env=nmap_environment())
    async with asyncio.timeout(10):
        out, _ = await proc.communicate()
    return parse_version_output(out.decode("utf-8", "replace"))


def parse_version_output(text: str) -> NmapBuild:
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


def nmap_environment() -> dict[str, str]:
    """Nothing of ours (NMAP_ARGS and friends never reach nmap), except the operator's own
    NMAPDIR, where an nmap installed elsewhere keeps its data."""
    nmapdir = os.environ.get("NMAPDIR")
    return _CLEAN_ENV | {"NMAPDIR": nmapdir} if nmapdir else dict(_CLEAN_ENV)


async def run_nmap(
    argv: Sequence[str], *, sandbox: Sequence[str], time_limit_s: float, xml_sink: Callable[[bytes], None],
    output_sink: Callable[[bytes], None],
) -> NmapRun:
    """Run nmap once, its argv after `sandbox` (the prefix of sandbox.Sandbox), its XML report to
    `xml_sink` (through its stdin, see XML_OUTPUT) and its normal output to `output_sink`; kill
    its whole process group on timeout, cancellation or error."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nmap-mcp-") as workdir:
        xml_fd, xml_end = os.pipe()
        # nmap opens its report at /proc/self/fd/0 anew, which checks the pipe's mode: made by
        # this process, it is 0600 and ours, and an nmap dropped to nmap_user could not write it.
        # Only processes that hold the pipe, or may trace nmap (its own user), can reach it.
        os.fchmod(xml_end, 0o622)
        try:
            # Returns once setpriv runs (vfork and exec), as asyncio's own subprocess start does.
            # The sandbox's commands are exec'd in turn, so the process started is nmap's in the end.
            proc = subprocess.Popen(  # noqa: ASYNC220
                [*sandbox, *argv],
                stdin=xml_end,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=nmap_environment(),
                # A process group to kill, in the server's session: a session of its own is also
                # a scheduling group of its own under the kernel's autogroup (on by default in
                # many kernels), where each nmap weighs as much as the whole server.
                process_group=0,
            )
        except BaseException:
            os.close(xml_fd)
            raise
        finally:
            os.close(xml_end)  # nmap's alone now: its report ends when nmap (and its group) is gone
        try:
            child = _Child(proc, xml_fd, xml_sink, output_sink)
        except BaseException:  # no descriptor left for its pidfd: it must not run on unwatched
            _kill_group(proc.pid)
            proc.wait()
            _close_pipes(proc, xml_fd)
            raise
        try:
            timed_out = await child.finished(time_limit_s)
        finally:
            await child.close()
    return NmapRun(proc.returncode, bytes(child.stderr), timed_out, time.monotonic() - started)


class _Child:
    """A started nmap, followed by the event loop itself: its XML and its normal output to
    their sinks as they arrive, stderr kept up to STDERR_CAP (the rest drained, so nmap never
    blocks on it), the exit heard from a pidfd. asyncio's own subprocess transport took six
    turns of the event loop to start a process and two reader tasks to follow it: on a busy
    server each turn waits behind everything else that is ready, about 40 ms of every quick
    scan's latency.

    Its process group is killed when it exits, before it is reaped (the group id cannot have
    been reused yet), or when the scan is cut short."""

    def __init__(self, proc: subprocess.Popen[bytes], xml_fd: int, xml_sink: Callable[[bytes], None],
                 output_sink: Callable[[bytes], None]) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self._loop = asyncio.get_running_loop()
        self._proc = proc
        self._xml_fd = xml_fd
        self.stderr = bytearray()
        self._timed_out = False
        self._pidfd = _pidfd(proc.pid)  # first: if it fails, nothing is registered yet
        self._exited = self._loop.create_future()  # exited, its group killed, reaped
        self._done = self._loop.create_future()  # exited and every pipe read to its end; or a sink failed
        self._open = {xml_fd: xml_sink, proc.stdout.fileno(): output_sink, proc.stderr.fileno(): self._to_stderr}
        for fd in self._open:
            os.set_blocking(fd, False)
            self._loop.add_reader(fd, self._read, fd)
        if self._pidfd is not None:
            self._loop.add_reader(self._pidfd, self._on_exit)
        else:  # a kernel before 5.3: a thread waits, without reaping, for the exit
            self._loop.run_in_executor(None, _wait_exit, proc.pid).add_done_callback(lambda _: self._on_exit())

    async def finished(self, time_limit_s: float) -> bool:
        """Wait for the exit and the end of every pipe; after `time_limit_s` kill the group
        and wait for that. True when the time limit cut the run."""
        timer = self._loop.call_later(time_limit_s, self._time_out)
        try:
            await asyncio.shield(self._done)
        finally:
            timer.cancel()
        return self._timed_out

    async def close(self) -> None:
        """Kill what is still running, wait until it has exited and been reaped, let go of
        the pipes."""
        if not self._exited.done():
            _kill_group(self._proc.pid)
        await asyncio.shield(self._exited)
        for fd in list(self._open):
            self._stop_reading(fd)
        _close_pipes(self._proc, self._xml_fd)

    def _time_out(self) -> None:
        self._timed_out = True
        _kill_group(self._proc.pid)

    def _read(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self._stop_reading(fd)
            self._settle()
            return
        try:
            self._open[fd](chunk)
        except Exception as e:  # noqa: BLE001 - a failing sink (a bug) fails the run; nmap is killed on the way out
            if not self._done.done():
                self._done.set_exception(e)

    def _to_stderr(self, chunk: bytes) -> None:
        self.stderr += chunk[: max(STDERR_CAP - len(self.stderr), 0)]

    def _stop_reading(self, fd: int) -> None:
        if self._open.pop(fd, None) is not None:
            self._loop.remove_reader(fd)

    def _on_exit(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        _kill_group(self._proc.pid)  # what it left behind, while its group id is still its own
        self._proc.wait()  # a zombie by now: reaped at once
        self._exited.set_result(None)
        self._settle()

    def _settle(self) -> None:
        if self._exited.done() and not self._open and not self._done.done():
            self._done.set_result(None)


def _close_pipes(proc: subprocess.Popen[bytes], xml_fd: int) -> None:
    for stream in (proc.stdout, proc.stderr):
        assert stream is not None
        stream.close()
    os.close(xml_fd)


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when the process exits; None on a kernel without."""
    try:
        return os.pidfd_open(pid)
    except OSError as e:
        if e.errno == errno.ENOSYS:
            return None
        raise


def _wait_exit(pid: int) -> None:
    """Block until the process has exited, leaving it to be reaped (WNOWAIT)."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
