#!/bin/sh
# The container's entrypoint: nmap-mcp with the container's arguments (--api, ...) in /data.
# Without -c it reads /data/config.json; on the first start (an empty /data volume) it writes
# one with a fresh token, and the token's secret to /data/initial-token (mode 0600), never to
# the container's log. /data is the working directory, so the SQLite file and the audit log
# land there too.
set -eu
cd /data
exec nmap-mcp "$@"
