#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs nmap, PostgreSQL and Chromium with its
# chromedriver when missing (as root; otherwise says what to install), keeps .venv in step with
# requirements-dev.txt, then runs pytest against the machine's PostgreSQL when it can be used as it
# is, else against a private cluster started for this run (scripts/with-postgres.sh). Extra
# arguments go to pytest (./test.sh -k auth).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/common.sh
require_python_311
require_packages python nmap postgresql chromium
ensure_venv requirements-dev.txt
exec scripts/with-postgres.sh .venv/bin/python -m pytest "$@"
