"""compose.yaml against the service's settings: one API service and two workers in two pools,
all on the compose file's PostgreSQL, each with a volume of its own, and every NMAP_MCP_
variable a setting with a valid value; and the image's HEALTHCHECK script against real
`server.py` processes. (tests/container/run-container-test.sh builds and runs the image itself;
no compose engine runs here.)"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from config import ENV_PREFIX, Settings
from targets import parse_networks
from tests.support import ROOT, START_UP_SECONDS, ServiceProcess, free_port, server_argv, wait_until, write_config

COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
SERVICES: dict[str, Any] = COMPOSE["services"]
NMAP_MCP = {name: service for name, service in SERVICES.items() if service.get("image") == "nmap-mcp"}
# Compose's ${NAME}, ${NAME:-default} and ${NAME:?message}, each replaced by a test value.
_VARIABLE = re.compile(r"\$\{(\w+)(?::[-?][^}]*)?\}")


def environment(name: str) -> dict[str, str]:
    """A service's environment as compose would pass it, with the variables filled in."""
    declared = SERVICES[name].get("environment", {})
    assert isinstance(declared, dict), f"{name}: write environment as a mapping"
    return {key: _VARIABLE.sub(lambda m: f"test-{m.group(1).lower()}", str(value)) for key, value in declared.items()}


def test_one_api_service_and_two_workers() -> None:
    commands = sorted(service["command"] for service in NMAP_MCP.values())
    assert commands == [["--api"], ["--worker"], ["--worker"]]
    assert all(service["build"] == "." for service in NMAP_MCP.values())


def test_the_workers_serve_two_different_pools_that_every_service_knows() -> None:
    pools = {json.dumps(json.loads(environment(name)["NMAP_MCP_POOLS"]), sort_keys=True) for name in NMAP_MCP}
    assert len(pools) == 1, "the API and every worker need the same pools"
    networks = json.loads(pools.pop())
    for cidrs in networks.values():
        parse_networks(cidrs)
    workers = [environment(name) for name, service in NMAP_MCP.items() if service["command"] == ["--worker"]]
    assert sorted(worker["NMAP_MCP_POOL"] for worker in workers) == sorted(networks)
    assert len(networks) == 2
    assert len({worker["NMAP_MCP_WORKER_NAME"] for worker in workers}) == len(workers)


def test_every_service_uses_the_compose_postgres_after_it_is_healthy() -> None:
    urls = {environment(name)["NMAP_MCP_DATABASE_URL"] for name in NMAP_MCP}
    assert len(urls) == 1, "the API and every worker need the same database"
    url = urlsplit(urls.pop())
    postgres = environment("postgres")
    assert url.scheme == "postgresql"
    assert url.hostname == "postgres"
    assert url.username == postgres["POSTGRES_USER"]
    assert url.password == postgres["POSTGRES_PASSWORD"]
    assert url.path == "/" + postgres["POSTGRES_DB"]
    assert "healthcheck" in SERVICES["postgres"]
    for service in NMAP_MCP.values():
        assert service["depends_on"] == {"postgres": {"condition": "service_healthy"}}


def test_every_nmap_mcp_service_has_a_data_volume_of_its_own() -> None:
    volumes = [volume for service in NMAP_MCP.values() for volume in service["volumes"] if volume.endswith(":/data")]
    assert len(volumes) == len(NMAP_MCP) == len(set(volumes))
    assert {volume.split(":")[0] for volume in volumes} <= set(COMPOSE["volumes"])


@pytest.mark.parametrize("name", sorted(NMAP_MCP))
def test_every_variable_names_a_setting(name: str) -> None:
    keys = [key.removeprefix(ENV_PREFIX).lower() for key in environment(name) if key.startswith(ENV_PREFIX)]
    assert [key for key in keys if key not in Settings.model_fields] == []


@pytest.mark.parametrize("name", sorted(NMAP_MCP))
def test_every_value_is_valid_for_its_setting(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = environment(name)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    if "NMAP_MCP_ALLOWED_HOSTS" in env:
        assert settings.allowed_hosts == ["test-nmap_mcp_public_host"]
    assert settings.database_url == env["NMAP_MCP_DATABASE_URL"]


def healthcheck(monkeypatch: pytest.MonkeyPatch, config: Path, pid1: list[str]) -> ModuleType:
    """deploy/healthcheck.py as the container runs it, with /data/config.json and PID 1's
    command line (what the entrypoint exec'd) replaced by the test's."""
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "deploy" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cmdline = config.with_suffix(".cmdline")
    cmdline.write_bytes(b"".join(arg.encode() + b"\0" for arg in pid1))
    monkeypatch.setattr(module, "CONFIG", config)
    monkeypatch.setattr(module, "PID1_COMMAND_LINE", cmdline)
    for key in ("HOST", "PORT", "METRICS_PORT"):
        monkeypatch.delenv(f"{ENV_PREFIX}{key}", raising=False)
    return module


@pytest.mark.server
def test_the_healthcheck_asks_the_api_on_its_port_and_a_worker_on_its_metrics_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = {"db_path": str(tmp_path / "tasks.db"), "audit_log": str(tmp_path / "audit.jsonl")}
    api_config = write_config(tmp_path / "api.json", **shared)
    worker_config = write_config(tmp_path / "worker.json", metrics_port=free_port(), **shared)
    bare_worker_config = write_config(tmp_path / "bare.json", **shared)
    as_worker = ["/opt/nmap-mcp/bin/python", "/opt/nmap-mcp/bin/nmap-mcp", "-c", "/data/config.json", "--worker"]
    as_api = [*as_worker[:-1], "--api"]
    assert healthcheck(monkeypatch, api_config, as_api).main() == 1, "nothing listens yet"
    api = ServiceProcess(server_argv(api_config, "--api"), tmp_path / "api.log").start()
    worker = ServiceProcess(server_argv(worker_config, "--worker"), tmp_path / "worker.log").start()
    try:
        up = START_UP_SECONDS
        assert wait_until(lambda: healthcheck(monkeypatch, api_config, as_api).main() == 0, up, 0.2), api.log_text()
        assert wait_until(lambda: healthcheck(monkeypatch, worker_config, as_worker).main() == 0, up, 0.2), \
            worker.log_text()
        capsys.readouterr()
        bare = healthcheck(monkeypatch, bare_worker_config, as_worker)
        assert bare.main() == 1
        assert "set metrics_port (NMAP_MCP_METRICS_PORT)" in capsys.readouterr().err
        monkeypatch.setenv(f"{ENV_PREFIX}METRICS_PORT", str(json.loads(worker_config.read_text())["metrics_port"]))
        assert bare.main() == 0, "the variable wins over the file, as compose.yaml sets it"
    finally:
        worker.stop()
        api.stop()
