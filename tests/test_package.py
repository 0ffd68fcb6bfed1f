"""The distribution: pyproject.toml lists every module of the flat layout and the pins of
requirements.txt, and a wheel built from the checkout installs into a fresh venv whose
`nmap-mcp` command initialises a config and serves."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from config import load_settings
from tests.support import ROOT, START_UP_SECONDS, LiveServer, stdio_initialize, write_config

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
VERSION = (ROOT / "VERSION").read_text(encoding="utf-8").strip()


@dataclass(frozen=True)
class Installed:
    """A wheel built from the checkout, installed into a venv of its own."""

    wheel: Path
    venv: Path

    @property
    def command(self) -> str:
        return str(self.venv / "bin" / "nmap-mcp")


def tracked_files() -> list[str]:
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, text=True)
    return [name for name in listing.stdout.split("\0") if name]


def test_every_top_level_module_is_packaged() -> None:
    modules = {Path(name).stem for name in tracked_files() if "/" not in name and name.endswith(".py")}
    listed = set(PYPROJECT["tool"]["setuptools"]["py-modules"])
    assert not modules - listed, f"add to py-modules in pyproject.toml: {sorted(modules - listed)}"
    assert not listed - modules, f"py-modules names modules that are not in the repository: {sorted(listed - modules)}"


def test_requirements_txt_and_pyproject_pin_the_same_packages() -> None:
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    pins = [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]
    assert pins == PYPROJECT["project"]["dependencies"]
    assert all("==" in pin for pin in pins), "requirements.txt pins every runtime dependency exactly"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build a wheel from the tracked files (so that the build's own files stay out of the
    checkout), install it with --no-deps into a fresh venv, and let that venv find the
    dependencies in this test venv's site-packages through a .pth file."""
    work = tmp_path_factory.mktemp("package")
    source = work / "source"
    for name in tracked_files():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(work / "dist"), str(source)], check=True, timeout=300)
    (wheel,) = (work / "dist").glob("nmap_mcp-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    site_packages = subprocess.run(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    (Path(site_packages) / "test-venv-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", str(wheel)],
                   check=True, timeout=120)
    return Installed(wheel, venv)


@pytest.mark.server
def test_the_wheel_holds_the_modules_and_the_command(installed: Installed) -> None:
    assert installed.wheel.name == f"nmap_mcp-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
        entry_points = wheel.read(f"nmap_mcp-{VERSION}.dist-info/entry_points.txt").decode()
    modules = sorted(name.removesuffix(".py") for name in names if "/" not in name)
    assert modules == sorted(PYPROJECT["tool"]["setuptools"]["py-modules"])
    assert not [name for name in names if name.startswith(("tests/", "bench/"))]
    assert "nmap-mcp = server:main" in entry_points


@pytest.mark.server
def test_the_installed_command_prints_help_and_writes_a_config(installed: Installed, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([installed.command, *args], check=False, cwd=tmp_path, capture_output=True, text=True,
                              timeout=START_UP_SECONDS)

    shown = run("--help")
    assert shown.returncode == 0, shown.stderr
    assert "--init" in shown.stdout
    version = run("--version")
    assert (version.returncode, version.stdout) == (0, f"nmap-mcp {VERSION}\n")
    config = tmp_path / "config.json"
    init = run("--init", "-c", str(config))
    assert init.returncode == 0, init.stderr
    assert config.stat().st_mode & 0o777 == 0o600
    assert load_settings(config).named_tokens()


@pytest.mark.server
def test_a_desktop_app_starts_the_installed_command_it_was_given(installed: Installed, tmp_path: Path) -> None:
    """Desktop apps start local servers from their own directory, and with the system's PATH,
    on which a command installed by pipx or into a venv is not."""
    config = write_config(tmp_path / "config.json")
    printed = subprocess.run([installed.command, "-c", str(config), "--print-config", "claude-desktop"], check=True,
                             cwd=tmp_path, capture_output=True, text=True, timeout=START_UP_SECONDS)
    local = json.loads(printed.stdout)["mcpServers"]["nmap-local"]
    assert local["command"] == installed.command
    info = stdio_initialize([local["command"], *local["args"]], cwd=Path("/"))["serverInfo"]
    assert (info["name"], info["version"]) == ("nmap-mcp", VERSION)


@pytest.mark.server
def test_the_installed_server_serves_and_knows_its_version(installed: Installed, tmp_path: Path) -> None:
    located = subprocess.run(
        [installed.venv / "bin" / "python", "-c", "import server; print(server.__file__)"],
        cwd=tmp_path, check=True, capture_output=True, text=True,
    )
    module = Path(located.stdout.strip())
    # Not the checkout's server.py, and no VERSION file beside it: the version comes from metadata.
    assert module.is_relative_to(installed.venv)
    assert not module.with_name("VERSION").exists()
    config = write_config(tmp_path / "config.json")
    server = LiveServer(config, tmp_path / "server.log", load_settings(config).port, program=(installed.command,))
    server.start()
    try:
        health = httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
        script = httpx.get(f"http://127.0.0.1:{server.port}/ui/dashboard.js", timeout=5)
    finally:
        server.stop()
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "version": VERSION}
    # The operator page's files travel in the wheel too.
    assert script.status_code == 200 and script.content == (ROOT / "dashboard_assets/dashboard.js").read_bytes()
