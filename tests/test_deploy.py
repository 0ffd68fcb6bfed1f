"""compose.yaml against the service's settings: one API service and two workers in two pools,
all on the compose file's PostgreSQL, each with a volume of its own, and every NMAP_MCP_
variable a setting with a valid value. (tests/container/run-container-test.sh builds and runs
the image itself; no compose engine runs here.)"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from config import ENV_PREFIX, Settings
from targets import parse_networks
from tests.support import ROOT

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
