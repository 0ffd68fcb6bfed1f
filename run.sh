#!/usr/bin/env bash
# Run the service: installs nmap and python3-venv when missing (as root; otherwise says what to
# install), keeps .venv in step with requirements.txt (rebuilt when broken), writes config.json
# with a fresh token when it is missing, then serves (SQLite by default).
# Arguments are passed to server.py (for example: ./run.sh --api, ./run.sh -c prod.json).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/common.sh
require_python_311
require_packages python nmap sandbox
ensure_venv requirements.txt
exec .venv/bin/python server.py "$@"
