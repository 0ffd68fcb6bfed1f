#!/usr/bin/env bash
# Run the service: creates .venv and installs requirements on first use, writes
# config.json with a fresh token when it is missing, then serves (SQLite by default).
# Arguments are passed to server.py (for example: ./run.sh --show-token, ./run.sh -c prod.json).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v nmap >/dev/null 2>&1; then
  echo "nmap is not installed: installing it with apt-get" >&2
  apt-get update -qq && apt-get install -y -qq nmap
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
exec .venv/bin/python server.py "$@"
