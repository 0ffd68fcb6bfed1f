#!/bin/sh
# The container's entrypoint: on the first start (an empty /data volume) write a config
# with a fresh token, then run nmap-mcp on it with the container's arguments (--api, ...).
# /data is the working directory, so the SQLite file and the audit log land there too.
set -eu
config=/data/config.json
if [ ! -e "$config" ]; then
  nmap-mcp --init -c "$config"
fi
exec nmap-mcp -c "$config" "$@"
