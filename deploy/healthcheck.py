"""The container's HEALTHCHECK: GET /healthz where the server listens; exit 0 on a 200.

The API (and the default role) answer on `port`; a `--worker` has no MCP listener and answers
on its `metrics_port`. Which one this container runs is read from PID 1's command line (the
entrypoint execs nmap-mcp with the container's arguments). Settings are read the way the
server reads them (an NMAP_MCP_ variable wins over /data/config.json, then the default) with
the standard library only, because this runs every 30 seconds and importing the server's
settings would cost more than the check itself.
"""

import json
import os
import sys
import urllib.request
from pathlib import Path

CONFIG = Path("/data/config.json")
PID1_COMMAND_LINE = Path("/proc/1/cmdline")
# An address that means "every interface" is reached over loopback.
ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def setting(key: str) -> str | None:
    """The value the server uses for `key`: its environment variable, else the file's; None
    when neither sets it (or the file says null)."""
    if f"NMAP_MCP_{key.upper()}" in os.environ:
        return os.environ[f"NMAP_MCP_{key.upper()}"]
    try:
        value = json.loads(CONFIG.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError):
        return None
    return None if value is None else str(value)


def runs_a_worker() -> bool:
    try:
        return b"--worker" in PID1_COMMAND_LINE.read_bytes().split(b"\0")
    except OSError:
        return False


def main() -> int:
    host = setting("host") or "127.0.0.1"
    host = ANY_ADDRESS.get(host, host)
    url_host = f"[{host}]" if ":" in host else host
    port = setting("metrics_port") if runs_a_worker() else setting("port") or "3004"
    if port is None:
        print("unhealthy: a --worker answers /healthz only on its metrics_port; set metrics_port "
              "(NMAP_MCP_METRICS_PORT)", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(f"http://{url_host}:{port}/healthz", timeout=4) as reply:
            return 0 if reply.status == 200 else 1
    except OSError as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
