"""A scan's impact: the probes an argv sends, counted as nmap counts its ports (checked against
the `numservices` of real nmap runs of the argvs the server builds), and the rate cap every argv
carries, which real nmap accepts and obeys."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import pytest

from config import Settings
from impact import ports_per_address, probes, rated
from models import ScanKind
from nmap_options import CommandError
from policy import Policy
from scanner import NmapRun, build_argv, run_nmap, scan_options
from scans import ScanRequest, ScanService, TypedScan
from stores import Stores
from tests.conftest import OpenClient
from tests.support import SECRETS, answer_of, own_user_sandbox

NMAP = "/usr/bin/nmap"
TARGET = "127.0.21.9"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScanService]:
    """A scan service whose checks build argvs (they read no table)."""
    stores = Stores.open(f"sqlite:///{tmp_path_factory.mktemp('db') / 'tasks.db'}", max_queued=10)
    settings = Settings(allow_loopback=True, nmap_path=NMAP)
    yield ScanService(stores, Policy(settings, NMAP), settings, NMAP, None, sandbox=own_user_sandbox())
    stores.db.engine.dispose()


def built(service: ScanService, request: ScanRequest) -> list[str]:
    return asyncio.run(service.check("alice", request)).argv


async def nmap_counts(argv: list[str]) -> tuple[int, int]:
    """(addresses, ports per address) as nmap's own XML reports them for `argv`."""
    xml = bytearray()
    run = await run_nmap(argv, sandbox=own_user_sandbox(), time_limit_s=60, xml_sink=xml.extend,
                         output_sink=lambda _: None)
    assert run.returncode == 0, run.stderr
    text = xml.decode()
    ports = sum(int(n) for n in re.findall(r'<scaninfo [^>]*numservices="(\d+)"', text))
    return int(re.search(r'<hosts up="\d+" down="\d+" total="(\d+)"', text).group(1)), ports  # type: ignore[union-attr]


REQUESTS = {
    "quick": (lambda s: s.quick(TARGET), 100),
    "full": (lambda s: s.full(TARGET), 65535),
    "ranges, prefixes, repeats": (lambda s: s.custom(f"-p 1-10,5,20,T:30-32,U:40 {TARGET}"), 14),
    "excluded ports": (lambda s: s.custom(f"-p 1-2000 --exclude-ports 5-10,T:20 {TARGET}"), 1993),
    "open ranges": (lambda s: s.custom(f"-p -10,65530- {TARGET}"), 16),
    "top ports": (lambda s: s.custom(f"--top-ports 250 {TARGET}"), 250),
    "fast": (lambda s: s.custom(f"-F {TARGET}"), 100),
    "nmap's default": (lambda s: s.custom(TARGET), 1000),
    "typed ports": (lambda s: s.typed(TypedScan(TARGET, ports="22,80,1000-1010")), 13),
    "typed top ports": (lambda s: s.typed(TypedScan(TARGET, top_ports=20)), 20),
    "a network": (lambda s: s.custom("-p 1-5 127.0.21.0/30"), 5),
}


@pytest.mark.parametrize("name", REQUESTS)
@pytest.mark.anyio
async def test_ports_per_address_are_the_ports_nmap_scans(service: ScanService, name: str) -> None:
    make, ports = REQUESTS[name]
    argv = (await service.check("alice", make(service))).argv
    end = argv.index("--")
    assert ports_per_address(argv[1:end]) == ports
    addresses, scanned = await nmap_counts(argv)
    assert scanned == ports and probes(argv) == addresses * ports


def test_a_ping_scan_probes_each_address_once_and_udp_counts_apart(service: ScanService) -> None:
    assert probes(built(service, service.typed(TypedScan("127.0.21.0/28", scan_type="ping")))) == 16
    # Recorded from nmap 7.93 as root: `-sS -sU -p U:53,T:22,80,U:1-3,5` scans TCP 22,80 and UDP
    # 1-3,5,53; `-sS -sU --top-ports 5` scans 5 of each.
    assert ports_per_address(["-sS", "-sU", "-p", "U:53,T:22,80,U:1-3,5"]) == 7
    assert ports_per_address(["-sS", "-sU", "--top-ports", "5"]) == 10
    assert ports_per_address(["-sS", "-sU"]) == 2000


def test_every_argv_carries_the_rate_cap_and_a_lower_own_rate_stays() -> None:
    assert rated(["-sT", "-T4", "--top-ports", "100"], 500, built_in=True)[-2:] == ["--max-rate", "500"]
    assert rated(["-sT", "--max-rate", "20", "--script=(banner) and x"], 500, built_in=False) == [
        "-sT", "--max-rate", "20", "--script=(banner) and x"]
    assert rated(["-sT", "--script=(banner) and x"], 500, built_in=False) == [
        "-sT", "--max-rate", "500", "--script=(banner) and x"]
    with pytest.raises(CommandError, match=r"^'--max-rate 600' is above this token's cap of 500 packets per second"):
        rated(["-sT", "--max-rate", "600"], 500, built_in=False)
    with pytest.raises(CommandError, match=r"^'--min-rate 900' is above the 500 packets per second"):
        rated(["-sT", "--min-rate", "900"], 500, built_in=False)


async def started(argv: list[str]) -> NmapRun:
    """Run `argv` for at most a second: nmap refuses bad options at once, before scanning."""
    return await run_nmap(argv, sandbox=own_user_sandbox(), time_limit_s=1, xml_sink=lambda _: None,
                          output_sink=lambda _: None)


@pytest.mark.anyio
async def test_full_scan_s_floor_never_passes_a_lower_cap_which_nmap_would_refuse() -> None:
    """full_scan asks for --min-rate 1000; under a cap of 500 it gets 500, which nmap takes (it
    scans until the time limit stops it), where 1000 above 500 makes nmap quit at once."""
    options = rated(scan_options(ScanKind.FULL, privileged=False), 500, built_in=True)
    assert options[options.index("--min-rate") + 1] == "500" and options[-2:] == ["--max-rate", "500"]
    assert (await started(build_argv(NMAP, options, [TARGET], ipv6=False, privileged=False))).timed_out
    unlowered = [*scan_options(ScanKind.FULL, privileged=False), "--max-rate", "500"]
    refused = await started(build_argv(NMAP, unlowered, [TARGET], ipv6=False, privileged=False))
    assert not refused.timed_out and refused.returncode != 0
    assert b"--min-rate=1000 must be less than or equal to --max-rate=500" in refused.stderr


@pytest.mark.anyio
async def test_a_token_s_rate_cap_holds_its_nmap_to_it(in_memory: OpenClient) -> None:
    """300 probes at a cap of 100 packets per second take nmap at least 3 s (-Pn: no host
    discovery packets); the same scan under the default cap takes a fraction of that."""
    tokens = {"slow": {"secret": SECRETS["alice"], "limits": {"max_rate": 100}},
              "alice": {"secret": SECRETS["bob"]}}
    command = {"command": "-Pn -p 1-300 127.0.21.7"}
    async with in_memory("slow", tokens=tokens) as slow, in_memory(tokens=tokens) as alice:
        capped = (await answer_of(slow, "custom_scan", **command))["result"]["scan_time"]
        free = (await answer_of(alice, "custom_scan", **command))["result"]["scan_time"]
    assert capped >= 300 / 100 * 0.95 and free < capped / 3, (capped, free)
