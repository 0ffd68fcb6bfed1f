#!/usr/bin/env bash
# Build the container image for real and check it: the first start writes a config into an
# empty /data volume (the token's secret in initial-token beside it), /healthz answers 200 (also through the image's HEALTHCHECK),
# test_client.py passes every check against the container, the database and the audit log
# land in the volume, the server runs as the image's non-root user and nmap has no file
# capabilities, no token reaches the container log, SIGTERM stops it with status 0 and a
# restart keeps the config; and a `--worker` container passes the HEALTHCHECK on its
# metrics_port, as compose.yaml runs its workers.
#
#   tests/container/run-container-test.sh [--remove-image]
#
# Needs root (podman, runc and debootstrap are installed when missing). Images live in a
# storage of their own under $NMAP_MCP_CONTAINER_CACHE (default /var/tmp/nmap-mcp-container-test),
# apart from any other podman user here: the debootstrap base image is made once and reused,
# and the built image stays as the layer cache unless --remove-image is given.
set -euo pipefail
cd "$(dirname "$0")/../.."

remove_image=false
case "${1:-}" in
  --remove-image) remove_image=true ;;
  "") ;;
  *) echo "usage: $0 [--remove-image]" >&2; exit 2 ;;
esac

started=${EPOCHREALTIME/./}
elapsed() {
  local micros=$((${EPOCHREALTIME/./} - started))
  echo "$((micros / 1000000)).$((micros / 100000 % 10)) s"
}

missing=()
for tool in podman:podman /usr/sbin/runc:runc debootstrap:debootstrap; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
python=.venv/bin/python
if [ ! -x "$python" ]; then
  python3 -m venv .venv && .venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
fi

cache=${NMAP_MCP_CONTAINER_CACHE:-/var/tmp/nmap-mcp-container-test}
runroot=/run/nmap-mcp-container-test
mkdir -p "$cache" "$runroot"
# podman's default nofile ulimit is refused on this kind of machine.
printf '[containers]\ndefault_ulimits = []\n' >"$cache/containers.conf"
export CONTAINERS_CONF="$cache/containers.conf"
# crun fails on hybrid cgroups; runc works. Without systemd podman cannot schedule health
# timers and says so on every start: the checks below run the HEALTHCHECK themselves.
pm() {
  podman --root "$cache/storage" --runroot "$runroot" --runtime /usr/sbin/runc --events-backend file "$@" \
    2> >(grep -v 'unable to get systemd connection' >&2)
}

image=localhost/nmap-mcp:container-test
name=nmap-mcp-container-test-$$
volume=$(mktemp -d /tmp/nmap-mcp-data.XXXXXX)
worker_volume=$(mktemp -d /tmp/nmap-mcp-worker-data.XXXXXX)
cleanup() {
  pm rm -f -t 0 "$name" "$name-worker" >/dev/null 2>&1 || true
  rm -rf "$volume" "$worker_volume"
  if [ "$remove_image" = true ]; then
    pm rmi -f "$image" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

if ! pm image exists debian:bookworm-slim; then
  echo "== making the base image debian:bookworm-slim with debootstrap (once)"
  rootfs=$(mktemp -d /tmp/nmap-mcp-rootfs.XXXXXX)
  debootstrap --variant=minbase bookworm "$rootfs" >"$cache/debootstrap.log" 2>&1 \
    || { tail -n 20 "$cache/debootstrap.log" >&2; rm -rf "$rootfs"; exit 1; }
  tar -C "$rootfs" -c . | pm import - debian:bookworm-slim >/dev/null
  rm -rf "$rootfs"
  echo "   base image ready after $(elapsed)"
fi

echo "== building $image"
# A machine behind a TLS-intercepting proxy (this one) names the proxy's CA bundle for pip in
# /etc/pip.conf: lend that bundle to pip in the build's RUN steps, without putting it into the
# image, and at a path of its own (ca-certificates, installed by the build, replaces its own).
build_volumes=()
cert=$(sed -n 's/^cert *= *//p' /etc/pip.conf 2>/dev/null)
if [ -n "$cert" ]; then
  printf '[global]\ncert = /run/host-ca/ca.crt\n' >"$cache/pip.conf"
  build_volumes+=(-v "$cache/pip.conf:/etc/pip.conf:ro" -v "$cert:/run/host-ca/ca.crt:ro")
fi
# --format docker keeps the HEALTHCHECK (the OCI image format has no field for it).
previous=$(pm image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
pm build --format docker --network host "${build_volumes[@]}" -q -t "$image" . >/dev/null
# The image the tag pointed to before is now dangling: drop it so the cache does not grow.
if [ -n "$previous" ] && [ "$previous" != "$(pm image inspect --format '{{.Id}}' "$image")" ]; then
  pm rmi "$previous" >/dev/null 2>&1 || true
fi
echo "   image built after $(elapsed)"

failures=0
check() {
  local what=$1
  shift
  if "$@"; then echo "PASS $what"; else echo "FAIL $what"; failures=$((failures + 1)); fi
}
healthz_ok() {
  "$python" - "$1" <<'EOF'
import sys, time, urllib.request
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=2) as reply:
            sys.exit(0 if reply.status == 200 else 1)
    except OSError:
        time.sleep(0.2)
sys.exit(1)
EOF
}
container_exit_code() { pm inspect --format '{{.State.ExitCode}}' "$name"; }

# The image's user must own a bind-mounted volume (a named volume gets this from the image).
uid=$(pm run --rm --entrypoint id "$image" -u)
chown "$uid:$uid" "$volume"
chmod 0700 "$volume"
port=$("$python" -c 'from tests.support import free_port; print(free_port())')
# Host networking on loopback only: the image's default host 0.0.0.0 would listen on every
# interface of this shared machine.
pm run -d --name "$name" --network host -v "$volume:/data" \
  -e NMAP_MCP_HOST=127.0.0.1 -e NMAP_MCP_PORT="$port" "$image" >/dev/null
echo "== container $name on 127.0.0.1:$port"

check "/healthz answers 200" healthz_ok "$port"
check "the first start wrote /data/config.json (mode 600, owned by the image user)" \
  test "$(stat -c '%a %u' "$volume/config.json" 2>/dev/null)" = "600 $uid"
check "the image's HEALTHCHECK passes" pm healthcheck run "$name"
pid=$(pm inspect --format '{{.State.Pid}}' "$name")
check "the server runs as uid $uid, not root" test "$(stat -c %u "/proc/$pid")" = "$uid"
check "nmap has no file capabilities (PRIVILEGED_SCANS defaults to false)" \
  pm exec "$name" python3 -c "
import os, sys
try:
    os.getxattr('/usr/bin/nmap', 'security.capability')
except OSError:
    sys.exit(0)
sys.exit(1)"

check "the first start put the secret in /data/initial-token (mode 600) and only its digest in config.json" \
  test "$(stat -c '%a %u' "$volume/initial-token" 2>/dev/null)" = "600 $uid" -a -n "$(grep secret_sha256 \
  "$volume/config.json")" -a -z "$(grep '"secret"' "$volume/config.json")"
token=$(cat "$volume/initial-token")
check "test_client.py passes every check against the container" \
  "$python" test_client.py "$token" --url "http://127.0.0.1:$port/mcp"
check "the database and the audit log are in the volume" \
  test -s "$volume/nmap_tasks.db" -a -s "$volume/audit.jsonl"
logs=$(pm logs "$name" 2>&1)
check "no token in the container log" test "${logs//"$token"/}" = "$logs"
config_sum=$(sha256sum "$volume/config.json")

pm stop -t 20 "$name" >/dev/null
check "SIGTERM stops the server with exit status 0" test "$(container_exit_code)" = 0
pm start "$name" >/dev/null
check "after a restart /healthz answers 200" healthz_ok "$port"
check "a restart keeps the config" test "$(sha256sum "$volume/config.json")" = "$config_sum"

# A worker has no MCP listener: its HEALTHCHECK asks /healthz on metrics_port.
chown "$uid:$uid" "$worker_volume"
chmod 0700 "$worker_volume"
metrics_port=$("$python" -c 'from tests.support import free_port; print(free_port())')
pm run -d --name "$name-worker" --network host -v "$worker_volume:/data" -e NMAP_MCP_HOST=127.0.0.1 \
  -e NMAP_MCP_PORT="$("$python" -c 'from tests.support import free_port; print(free_port())')" \
  -e NMAP_MCP_METRICS_PORT="$metrics_port" "$image" --worker >/dev/null
check "a --worker container's /healthz on its metrics_port answers 200" healthz_ok "$metrics_port"
check "a --worker container passes the image's HEALTHCHECK" pm healthcheck run "$name-worker"

echo "$failures failed; total $(elapsed)"
[ "$failures" = 0 ]
