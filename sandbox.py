"""How nmap is confined: the commands every nmap argv runs under, chosen once at start-up.

Always (util-linux): `setpriv --pdeathsig KILL`, so that nmap dies with the server even when
the server is killed by SIGKILL, and `prlimit --fsize=0`, so that any file write fails while
the pipes to the server work. A server that is not root runs nmap as itself, as it always did.

A server run as root does not run nmap as root: setpriv switches it to `nmap_user` (`nobody`
unless configured) with no supplementary groups, no_new_privs (no setuid program gives root
back) and no capability but the three that raw-packet scans need when `privileged` is on
(CAP_NET_RAW, CAP_NET_ADMIN, CAP_NET_BIND_SERVICE, as nmap documents for `--privileged`;
ambient, so that they survive the exec of nmap). Where the kernel has Landlock,
`landlock_exec` then lets nmap read only the system's programs, libraries and configuration,
nmap's own data and its own /proc entry, and write nothing but /dev/null.

All of it is done by programs exec'd in turn before nmap, none by Python in the forked child:
a `preexec_fn` (or subprocess's own `user=`) forces a full fork() of the server instead of
vfork, measured here at 7.7 ms of blocked event loop per scan against 2.8 ms for the chain.
The drop costs nothing measurable; Landlock about 15 ms per scan (bench/sandbox_overhead.py),
nearly all of it python3 starting (setpriv has no Landlock options before util-linux 2.40,
and Debian 12 has 2.38).
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import landlock_exec
from scanner import nmap_environment

# nmap_user when none is configured: a user that owns no files. Not the deploy docs' and the
# image's `nmap-mcp`: that user owns the service's config (its tokens), database and audit log.
DEFAULT_USER = "nobody"
# What nmap documents for running privileged scans without root (`nmap --privileged`).
RAW_PACKET_CAPABILITIES = ("net_raw", "net_admin", "net_bind_service")
# What a confined nmap may read: programs and libraries (/lib* are links into /usr on a merged
# Debian, directories elsewhere), nmap's data under /usr/share or /usr/local/share, and /etc
# (passwd and nsswitch.conf for its home, ld.so.cache, localtime, the TLS configuration of its
# scripts). What in /etc is secret is not readable by nmap_user anyway. `/proc/self` is
# resolved by the process that restricts itself, which nmap then replaces: nmap reads its own
# /proc/self/exe and /proc/self/net, and no other process's entries. libpcap reads
# /sys/class/net/INTERFACE/ (wireless, DSA tagging); OpenSSL falls back to /dev/urandom.
SYSTEM_READABLE = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc", "/proc/self", "/sys",
                   "/dev/urandom")


class SandboxUnavailable(RuntimeError):
    """nmap cannot be confined as configured (a command or the user is missing), so no scan may start."""


@dataclass(frozen=True)
class NmapUser:
    """The unprivileged user a root server runs nmap as."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class Sandbox:
    """The commands nmap's argv runs under, and what they do to it."""

    prefix: tuple[str, ...]
    # Who nmap runs as; None: the server's own user.
    user: NmapUser | None = None
    # The Landlock ABI that confines nmap's files; 0: none does.
    landlock_abi: int = 0

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.user is None:
            return "nmap runs as the server's own user"
        files = (f"reads only system files (Landlock ABI {self.landlock_abi})" if self.landlock_abi
                 else "may read what its user may: this kernel has no Landlock")
        return f"nmap runs as user {self.user.name} (uid {self.user.uid}) and {files}"


def confinement(configured_user: str | None, *, privileged: bool, nmap_path: str) -> Sandbox:
    """The sandbox of every nmap this server runs; SandboxUnavailable when it cannot be had."""
    setpriv, prlimit = _util_linux()
    user = nmap_user(configured_user)
    no_writes = ("--", prlimit, "--fsize=0", "--")
    if user is None:
        return Sandbox((setpriv, "--pdeathsig", "KILL", *no_writes))
    abi = landlock_exec.abi_version()
    landlock = _landlock_prefix(nmap_path) if abi else ()
    return Sandbox((setpriv, "--pdeathsig", "KILL", *_drop_to(user, privileged=privileged), *no_writes, *landlock),
                   user, abi)


def nmap_user(configured: str | None) -> NmapUser | None:
    """Who nmap runs as when the server is root: `configured`, else DEFAULT_USER; None when
    nmap runs as the server's own user (the server is not root, or the user is root). A
    configured user must exist even then: a typo is caught on any machine."""
    entry = _user_entry(configured) if configured else None
    if os.geteuid() != 0:
        return None
    entry = entry or _user_entry(DEFAULT_USER)
    return None if entry.pw_uid == 0 else NmapUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def check_runs(sandbox: Sandbox, nmap_path: str) -> None:
    """Start `nmap --version` in the sandbox once, so that a user who may not run nmap (or
    the interpreter Landlock needs) stops the server at start-up, not every scan later."""
    if sandbox.user is None:
        return
    try:
        ran = subprocess.run([*sandbox.prefix, nmap_path, "--version"], stdin=subprocess.DEVNULL,
                             capture_output=True, env=nmap_environment(), cwd="/", timeout=60, check=False)
    except subprocess.TimeoutExpired as e:
        raise SandboxUnavailable(f"nmap did not start as user {sandbox.user.name} within 60 s") from e
    if ran.returncode != 0:
        why = (ran.stderr.decode("utf-8", "replace").strip().splitlines() or [f"exit status {ran.returncode}"])[-1]
        raise SandboxUnavailable(
            f"nmap does not run as user {sandbox.user.name}: {why}. nmap, its libraries and python3 must be "
            "readable and executable by that user; set nmap_user to another user if needed")


@functools.cache
def _util_linux() -> tuple[str, str]:
    tools = {name: shutil.which(name) for name in ("setpriv", "prlimit")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        raise SandboxUnavailable(f"{' and '.join(missing)} not found: install util-linux")
    return tools["setpriv"], tools["prlimit"]  # type: ignore[return-value]


def _user_entry(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError as e:
        raise SandboxUnavailable(
            f"nmap_user '{name}' does not exist on this machine: create it (useradd --system --no-create-home "
            f"--shell /usr/sbin/nologin {name}) or set nmap_user to an existing user") from e


def _drop_to(user: NmapUser, *, privileged: bool) -> tuple[str, ...]:
    """setpriv's options that switch to `user` with only the capabilities scans need."""
    capabilities = ",".join(["-all", *(f"+{name}" for name in RAW_PACKET_CAPABILITIES if privileged)])
    return (f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", "--no-new-privs",
            f"--inh-caps={capabilities}", f"--ambient-caps={capabilities}", f"--bounding-set={capabilities}")


def _landlock_prefix(nmap_path: str) -> tuple[str, ...]:
    """python3 running landlock_exec's text (see there): the system's python3, which any user
    may run, rather than this server's, which may live where nmap_user may not go."""
    python = shutil.which("python3", path=nmap_environment()["PATH"]) or os.path.realpath(sys.executable)
    source = Path(landlock_exec.__file__).read_text(encoding="utf-8")
    return (python, "-I", "-S", "-c", source, *readable_paths(nmap_path), "--")


def readable_paths(nmap_path: str) -> list[str]:
    """What a confined nmap may read: SYSTEM_READABLE, and where an nmap installed elsewhere
    keeps its data (its directory, ../share/nmap beside it, NMAPDIR), those that exist."""
    binary = Path(nmap_path).resolve().parent
    candidates = [*SYSTEM_READABLE, str(binary), str(binary.parent / "share" / "nmap"), os.environ.get("NMAPDIR")]
    kept: list[str] = []
    for path in filter(None, candidates):
        if os.path.exists(path) and not any(Path(path).is_relative_to(parent) for parent in kept):
            kept.append(path)
    return kept
