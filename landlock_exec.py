"""Run a command that may read and execute only beneath given paths and write nowhere (Landlock).

The server runs this module's text as `python3 -I -S -c TEXT PATH... -- COMMAND...` between
setpriv and nmap, when it starts nmap as another user: the text is passed rather than a file,
for that user may not be able to read the server's own files. So it uses the standard library
only. Landlock (Linux 5.13 and later) is an unprivileged stacking security module: once a
process restricts itself, it and everything it executes keep the restriction.
"""

from __future__ import annotations

import ctypes
import os
import sys

# Landlock's system calls have the same numbers on every architecture.
_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR, _TRUNCATE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 14
_READ = _EXECUTE | _READ_FILE | _READ_DIR
# The one file that may be written: nmap opens it (O_TRUNC) to silence its own stdout.
_NULL = "/dev/null"
# No signals to, and no abstract unix sockets of, processes outside the domain (ABI 6).
_SCOPES = 1 << 0 | 1 << 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = (("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64))


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


def _syscall(number: int, *args: object) -> int:
    result: int = ctypes.CDLL(None, use_errno=True).syscall(number, *args)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


def abi_version() -> int:
    """The Landlock ABI this kernel offers; 0 when it has none (too old, or turned off)."""
    try:
        return _syscall(_CREATE_RULESET, None, 0, _CREATE_RULESET_VERSION)
    except OSError:
        return 0


def handled_rights(abi: int) -> int:
    """Every file-system right the ABI knows: all are handled, so any not granted is denied.
    ABI 1 has 13; ABI 2 adds renaming across directories, 3 truncating, 5 device ioctls."""
    count = 13 + (abi >= 2) + (abi >= 3) + (abi >= 5)
    return (1 << count) - 1


def restrict(readable: list[str]) -> None:
    """From now on this process may read and execute beneath `readable` only, and write
    nowhere (files open already stay usable: the pipes to the server). Needs no_new_privs
    (setpriv --no-new-privs) or CAP_SYS_ADMIN."""
    abi = abi_version()
    if abi == 0:
        raise OSError("Landlock is not available on this kernel")
    attr = _RulesetAttr(handled_rights(abi), 0, _SCOPES if abi >= 6 else 0)
    ruleset = _syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    for path in readable:
        _allow(ruleset, path, _READ if os.path.isdir(path) else _READ_FILE | _EXECUTE, abi)
    _allow(ruleset, _NULL, _READ_FILE | _WRITE_FILE | _TRUNCATE, abi)
    _syscall(_RESTRICT_SELF, ruleset, 0)
    os.close(ruleset)


def _allow(ruleset: int, path: str, rights: int, abi: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        rule = _PathBeneath(rights & handled_rights(abi), fd)
        _syscall(_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0)
    finally:
        os.close(fd)


def main(args: list[str]) -> None:
    """`PATH... -- COMMAND...`: restrict to reading the paths, then become the command."""
    split = args.index("--")
    readable, command = args[:split], args[split + 1:]
    restrict(readable)
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
