# nmap-mcp in a container: Debian's nmap and python3, the package in a venv, a non-root user,
# everything it writes (config.json, nmap_tasks.db, audit.jsonl) in the /data volume.
#   docker build -t nmap-mcp .                                    (podman build: add --format docker,
#   docker build --build-arg PRIVILEGED_SCANS=true -t nmap-mcp .   else the HEALTHCHECK is dropped)
# docs/deploy.md explains running it, allowed_hosts and the compose file.
FROM debian:bookworm-slim AS base
# util-linux (setpriv and prlimit, which confine every nmap run) is part of every Debian system.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nmap python3 \
    && rm -rf /var/lib/apt/lists/*

FROM base AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/nmap-mcp
# The pinned dependencies first, so that their layer stays cached while only the code changes.
COPY requirements.txt /src/requirements.txt
RUN /opt/nmap-mcp/bin/pip install --no-cache-dir --disable-pip-version-check -r /src/requirements.txt
COPY . /src
RUN /opt/nmap-mcp/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps /src

FROM base
# true: nmap gets the raw-socket capabilities that SYN, UDP and OS scans need. The container must
# then be run with --cap-add NET_RAW --cap-add NET_ADMIN (the kernel refuses to start a binary whose
# file capabilities exceed the container's), and the server with privileged: true.
ARG PRIVILEGED_SCANS=false
RUN case "$PRIVILEGED_SCANS" in \
      true) apt-get update \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libcap2-bin \
            && setcap cap_net_raw,cap_net_admin+eip /usr/bin/nmap \
            && apt-get purge -y libcap2-bin && rm -rf /var/lib/apt/lists/* ;; \
      false) ;; \
      *) echo "PRIVILEGED_SCANS must be true or false, not '$PRIVILEGED_SCANS'" >&2; exit 1 ;; \
    esac \
    && useradd --uid 10001 --user-group --home-dir /data --no-create-home --shell /usr/sbin/nologin nmap-mcp \
    && install -d -o nmap-mcp -g nmap-mcp -m 0700 /data
COPY --from=build /opt/nmap-mcp /opt/nmap-mcp
COPY deploy/docker-entrypoint.sh deploy/healthcheck.py /usr/local/lib/nmap-mcp/
# All interfaces inside the container (the port is published or proxied from outside); clients
# that connect by a name other than localhost need that name in allowed_hosts.
ENV PATH=/opt/nmap-mcp/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NMAP_MCP_HOST=0.0.0.0
# The server, and so nmap, run as nmap-mcp. Run as root instead (--user root), the server would
# start each nmap as nobody (nmap_user), never as root: docs/deploy.md, "When the server runs as root".
USER nmap-mcp
WORKDIR /data
VOLUME /data
EXPOSE 3004
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/opt/nmap-mcp/bin/python", "/usr/local/lib/nmap-mcp/healthcheck.py"]
ENTRYPOINT ["/usr/local/lib/nmap-mcp/docker-entrypoint.sh"]
