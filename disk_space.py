"""Whether the filesystem under a directory the service writes to can take more: /healthz asks.

One statvfs(2) and no byte written, so every poll may ask. A filesystem mounted read-only, or
with less than MIN_FREE_BYTES free to this process, counts as unable: a scan's results in the
task database and its audit lines need room, and a scan that starts on a nearly full disk
fails midway.
"""

from __future__ import annotations

import os
from pathlib import Path

MIN_FREE_BYTES = 1 << 20


def disk_problem(directory: Path) -> str | None:
    """'read-only', 'full' or 'not accessible' for the filesystem holding `directory`; None when it has room."""
    try:
        fs = os.statvfs(directory)
    except OSError:
        return "not accessible"
    if fs.f_flag & os.ST_RDONLY:
        return "read-only"
    # root may also use the blocks a filesystem reserves for it (ext4: 5%), others may not.
    blocks = fs.f_bfree if os.geteuid() == 0 else fs.f_bavail
    return "full" if blocks * fs.f_frsize < MIN_FREE_BYTES else None

