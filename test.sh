#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs nmap and PostgreSQL when missing,
# starts PostgreSQL when it is down, installs the Python packages into .venv, runs pytest.
# Extra arguments go to pytest (for example: ./test.sh -k auth).
set -euo pipefail
cd "$(dirname "$0")"
missing=()
command -v nmap >/dev/null 2>&1 || missing+=(nmap)
command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  if [[ " ${missing[*]} " == *" postgresql "* ]]; then
    # A PostgreSQL installed just for the tests: let user postgres in over loopback.
    hba=$(ls /etc/postgresql/*/main/pg_hba.conf | sort -V | tail -n 1)
    sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
  fi
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  cluster_version=$(ls /etc/postgresql | sort -V | tail -n 1)
  pg_ctlcluster --skip-systemctl-redirect "$cluster_version" main start
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
exec .venv/bin/python -m pytest "$@"
