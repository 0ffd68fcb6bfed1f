# shellcheck shell=bash
# Sourced by run.sh and test.sh (from the checkout's root): what both need on a fresh
# Debian/Ubuntu machine, a recent python3, the apt packages they rely on, and a working .venv.

# Stop unless python3 is 3.11 or newer; a python3 that is absent is installed by require_packages.
require_python_311() {
  local version
  command -v python3 >/dev/null 2>&1 || return 0
  version=$(python3 --version 2>&1 || true)
  if [[ ! $version =~ ^Python\ ([0-9]+)\.([0-9]+) ]] ||
    ((BASH_REMATCH[1] < 3 || (BASH_REMATCH[1] == 3 && BASH_REMATCH[2] < 11))); then
    echo "nmap-mcp needs Python 3.11 or newer, but $(command -v python3) is: ${version:-unknown}" >&2
    exit 1
  fi
}

# The directory of the newest PostgreSQL server programs (initdb, pg_ctl): Debian keeps them off PATH.
postgres_bindir() {
  local dir candidates
  candidates=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r)
  if command -v initdb >/dev/null 2>&1; then
    candidates+=" $(dirname "$(command -v initdb)")"
  fi
  for dir in $candidates; do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
      echo "$dir"
      return 0
    fi
  done
  return 1
}

# PACKAGE, unless every PROGRAM is on PATH.
package_for() {
  local package=$1 program
  shift
  for program in "$@"; do
    if ! command -v "$program" >/dev/null 2>&1; then
      echo "$package"
      return
    fi
  done
}

# The apt packages missing for what the caller needs: any of python, nmap, sandbox (the
# util-linux programs the server runs nmap under), postgresql, chromium (the browser and its
# driver, for the operator page's browser test), npm (Node.js and npm, for the tests that run
# an OpenID provider and mcp-remote), root-tests (what the tests that need root run:
# network namespaces, other users, mounts), git (tests list the checkout's files) and faketime
# (libfaketime: a server process whose clock a test sets, for engagements' time windows).
missing_packages() {
  local need
  for need in "$@"; do
    case $need in
      python)
        if ! command -v python3 >/dev/null 2>&1; then
          echo python3 python3-venv
        elif ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
          echo python3-venv  # Debian ships ensurepip, which `python3 -m venv` needs, in python3-venv
        fi ;;
      nmap) package_for nmap nmap ;;
      sandbox) package_for util-linux setpriv prlimit ;;
      postgresql) { command -v psql >/dev/null 2>&1 && postgres_bindir >/dev/null; } || echo postgresql ;;
      chromium) { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || echo chromium chromium-driver ;;
      root-tests)
        package_for iproute2 ip
        package_for util-linux runuser unshare nsenter
        package_for mount mount umount
        package_for nftables nft ;;
      git) package_for git git ;;
      faketime) package_for faketime faketime ;;
      npm) command -v npm >/dev/null 2>&1 || echo nodejs npm ;;
    esac
  done
}

# Install with apt-get what is missing for NEEDS (see missing_packages). Without root, stop at
# once and say what to install, rather than fail later on something else.
require_packages() {
  local packages
  read -r -a packages <<<"$(missing_packages "$@" | tr '\n' ' ')"
  if [ ${#packages[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
      echo "$0: missing ${packages[*]}. Install with: sudo apt-get install -y ${packages[*]}" \
        "(or rerun as root: sudo $0)" >&2
      exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
      echo "$0: missing ${packages[*]}, and there is no apt-get: install them by hand" >&2
      exit 1
    fi
    echo "installing ${packages[*]} with apt-get" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
  fi
  require_python_311
}

# Make .venv hold REQUIREMENTS (a requirements file). It is rebuilt when its python cannot run,
# it has no pip (what `python3 -m venv` leaves without ensurepip), or an earlier creation or
# pip install stopped mid-way: the flag .venv/.incomplete is removed only after a successful
# install. The stamp of each requirements file records what was installed, so that an
# unchanged file costs no pip run and a changed one is installed again.
ensure_venv() {
  local requirements=$1 stamp=".venv/.installed-${1%.txt}" wanted
  if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
    [ ! -x .venv/bin/pip ] || [ -e .venv/.incomplete ]; then
    if [ -e .venv ] || [ -L .venv ]; then
      echo "rebuilding .venv: its python or pip does not work, or an earlier install did not finish" >&2
    fi
    rm -rf .venv
    mkdir .venv
    touch .venv/.incomplete
    python3 -m venv .venv
  fi
  wanted=$(cat "$requirements" requirements.txt | sha256sum)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    echo "installing the Python packages of $requirements into .venv" >&2
    touch .venv/.incomplete
    .venv/bin/pip install -q --disable-pip-version-check -r "$requirements"
    echo "$wanted" >"$stamp"
    rm -f .venv/.incomplete
  fi
}

# Put Node.js 20 or newer first on PATH, for the tests that run Node.js programs (the OpenID
# provider of tests/oidc, mcp-remote): the machine's when it is new enough, else Node.js 22 from
# the npm registry in .venv/node (Debian 12 ships 18, on which both fail at start). Then install
# the provider's packages as tests/oidc/package-lock.json pins them, again only when it changed.
ensure_node_tools() {
  local major stamp=tests/oidc/node_modules/.installed wanted
  major=$(node --version 2>/dev/null | sed -E 's/^v([0-9]+).*/\1/')
  if [ "${major:-0}" -lt 20 ]; then
    if [ ! -x .venv/node/node_modules/.bin/node ]; then
      echo "installing Node.js 22 into .venv/node (this machine's node is ${major:-absent})" >&2
      npm install --prefix .venv/node --no-save --no-audit --no-fund -q node@22 >&2
    fi
    export PATH="$PWD/.venv/node/node_modules/.bin:$PATH"
  fi
  wanted=$(sha256sum tests/oidc/package-lock.json)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    echo "installing the test OpenID provider's packages into tests/oidc/node_modules" >&2
    npm ci --prefix tests/oidc --no-audit --no-fund -q >&2
    echo "$wanted" >"$stamp"
  fi
}
