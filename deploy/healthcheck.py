"""The container's HEALTHCHECK: GET /healthz where the server listens; exit 0 on a 200.

It reads `host` and `port` the way the server does (an NMAP_MCP_ variable wins over
/data/config.json, then the default) with the standard library only, because it runs every
30 seconds and importing the server's settings would cost more than the check itself.
"""

import json
import os
import sys
import urllib.request
from pathlib import Path

CONFIG = Path("/data/config.json")
# An address that means "every interface" is reached over loopback.
ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def setting(key: str, default: str) -> str:
    """The value the server uses for `key`: its environment variable, else the file."""
    if f"NMAP_MCP_{key.upper()}" in os.environ:
        return os.environ[f"NMAP_MCP_{key.upper()}"]
    try:
        return str(json.loads(CONFIG.read_text(encoding="utf-8")).get(key, default))
    except (OSError, ValueError):
        return default


def main() -> int:
    host = setting("host", "127.0.0.1")
    host = ANY_ADDRESS.get(host, host)
    url_host = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{url_host}:{setting('port', '3004')}/healthz", timeout=4) as reply:
            return 0 if reply.status == 200 else 1
    except OSError as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
