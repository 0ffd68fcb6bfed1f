#!/usr/bin/env bash
# Run the lint and type gate and the whole test suite on a fresh machine: installs nmap,
# PostgreSQL, Chromium with its chromedriver, Node.js 20 or newer with the test OpenID
# provider (tests/oidc), git, libfaketime and, for the tests that need root, iproute2
# when missing (as root; otherwise says what to install), keeps .venv in step with
# requirements-dev.txt, runs ruff and mypy, then runs pytest against the machine's PostgreSQL
# when it can be used as it is, else against a private cluster started for this run
# (scripts/with-postgres.sh). As any other user than root, the tests that need root are
# skipped, each naming what for. Extra arguments go to pytest (./test.sh -k auth).
#
# ./test.sh --fast runs the gate and the fast tier only (pytest.ini's markers): no server
# process, browser, root or test that waits 5 s by design, and PostgreSQL only when one answers
# (its tests are skipped, saying why, otherwise). It needs python3 (3.11 or newer), nmap and
# git, nothing else.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/common.sh
require_python_311
fast=false
if [ "${1:-}" = --fast ]; then
  fast=true
  shift
fi
needs=(python nmap sandbox git)
if ! $fast; then
  needs+=(postgresql chromium npm faketime)
  # The tests that need root are skipped under any other user, who needs nothing for them.
  if [ "$(id -u)" -eq 0 ]; then
    needs+=(root-tests)
  fi
fi
require_packages "${needs[@]}"
ensure_venv requirements-dev.txt
if ! $fast; then
  ensure_node_tools
fi
# The gate first: lint and types, with the rules and files pyproject.toml names.
.venv/bin/ruff check --quiet .
.venv/bin/mypy
if $fast; then
  # Two pytest processes per CPU: these tests mostly wait (on nmap, a call's timeout, leases).
  exec .venv/bin/python -m pytest -n "$((2 * $(nproc)))" \
    -m "not server and not browser and not requires_root and not slow" "$@"
fi
exec scripts/with-postgres.sh .venv/bin/python -m pytest "$@"
