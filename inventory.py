"""The inventory across scans: the latest known state of every host and port a token's scans
have seen, and what one completed scan changes in it. Pure functions over rows (dicts);
inventory_store.py reads and writes the rows, a batch of the scan's hosts per transaction
(a batch plans from the known rows of its span of addresses: see fold_next).

A completed scan knows its scope: the networks it targeted, less those it excluded, and, per
protocol, the ports it scanned (nmap's <scaninfo>). Inside that scope, a host it did not find
up is marked down, and a known port of a host it did find up, scanned but not reported, takes
the state nmap gave the unlisted ports (its `extraports`, closed when mixed). Every change records when it
happened; what was only seen again just gets a newer `last_seen`.

Observations merge rather than overwrite: what only some scans look at (a port's service,
product, version, extra info and CPE; its NSE scripts; a host's OS) stays as the last scan that
looked found it, with when and by which task that was, until another look finds something else.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from models import HostDetail, PortDetail, PortText, ScanKind, ScanResult
from targets import IPNetwork, parse_literal

Row = dict[str, Any]
# A row as read from the database (keyed by column name): only looked up, never changed.
Stored = Mapping[Any, Any]
PortKey = tuple[str, str, int]
# top_values fields: where each lives and how it is named in an answer.
TOP_FIELDS = ("port", "service", "product", "version", "os", "status")
# What version detection reports of a port, kept together: from one look, or from none.
_SERVICE = ("service", "product", "version", "extrainfo", "cpe", "version_confirmed_at", "version_task_id")
_SCRIPTS = ("scripts", "scripts_confirmed_at", "scripts_task_id")
_OS = ("os", "os_confirmed_at", "os_task_id")
_DURATION = re.compile(r"^([0-9]{1,6})\s*(m|h|d|w)$")
_UNITS = {"m": 60, "h": 3600, "d": 86_400, "w": 604_800}


class InventoryQueryError(ValueError):
    """A find_hosts or top_values argument was refused; the message says what to write."""


@dataclass(frozen=True)
class HostQuery:
    """What find_hosts looks for; port-level filters select the ports shown, too."""

    network: tuple[str, str] | None = None
    port: int | None = None
    protocol: str | None = None
    state: str | None = None
    service: str | None = None
    product: str | None = None
    version_prefix: str | None = None
    cpe: str | None = None
    script: str | None = None
    seen_since: float | None = None
    changed_since: float | None = None

    @property
    def by_port(self) -> bool:
        """True when hosts are chosen by their ports rather than listed as they are: a port
        filter, or a state other than 'any' (which only widens the ports shown)."""
        fields = (self.port, self.protocol, self.service, self.product, self.version_prefix, self.cpe, self.script)
        return any(value is not None for value in fields) or self.state not in (None, "any")

    @property
    def port_state(self) -> str | None:
        """The state ports must be in: as asked ('any': every state), else open."""
        return None if self.state == "any" else (self.state or "open")


@dataclass(frozen=True)
class InventoryUpdate:
    """Rows to write: every host and port this scan reported or changed, whole."""

    hosts: list[Row]
    ports: list[Row]


def address_key(address: str) -> str:
    """A text key that sorts addresses of one family numerically: '4' + 8 or '6' + 32 hex."""
    parsed = ipaddress.ip_address(address)
    return f"{parsed.version}{int(parsed):0{8 if parsed.version == 4 else 32}x}"


def network_bounds(network: IPNetwork) -> tuple[str, str]:
    """The first and last address_key of a network."""
    return address_key(str(network.network_address)), address_key(str(network.broadcast_address))


def parse_network(text: str) -> tuple[str, str]:
    try:
        return network_bounds(ipaddress.ip_network(text, strict=False))
    except ValueError as e:
        raise InventoryQueryError(f"network {text[:64]!r} is not an address or CIDR network, such as 10.0.0.0/24") \
            from e


def parse_since(text: str, now: float) -> float:
    """'24h', '7d', '90m', '2w' ago, or an ISO date or time ('2026-11-24', '2026-11-24T08:00Z')."""
    if match := _DURATION.match(text.strip()):
        return now - int(match.group(1)) * _UNITS[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError as e:
        raise InventoryQueryError(f"{text[:64]!r} is neither a duration such as 24h or 7d nor an ISO date "
                                  "such as 2026-11-24") from e
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


@functools.lru_cache(maxsize=64)
def port_set(services: str) -> frozenset[int]:
    """The ports of nmap's scaninfo list '1-1024,3389'. Kept for the lists seen last: the
    same few (a scan kind's ports) come back with every scan."""
    ports: set[int] = set()
    for part in filter(None, services.split(",")):
        first, _, last = part.partition("-")
        ports.update(range(int(first), int(last or first) + 1))
    return frozenset(ports)


@dataclass(frozen=True)
class Scope:
    """Where a scan looked: the networks it targeted, less those it was told to skip."""

    targets: list[IPNetwork]
    excluded: list[IPNetwork]

    def __contains__(self, address: object) -> bool:
        return isinstance(address, str) and _within(address, self.targets) and not _within(address, self.excluded)


def scope_of(argv: Sequence[str]) -> Scope:
    """The scope of the scan of this stored argv: its targets (after `--`, resolved literals
    only) and its --exclude list."""
    end = argv.index("--")
    skipped = [argv[i + 1] for i in range(end - 1) if argv[i] == "--exclude"]
    return Scope(_networks(argv[end + 1:]), _networks(item for value in skipped for item in value.split(",")))


def _networks(literals: Iterable[str]) -> list[IPNetwork]:
    return [network for literal in literals for network in (parse_literal(literal) or ("", []))[1]]


def looks_at_versions(kind: ScanKind, argv: Sequence[str]) -> bool:
    """Whether the scan of this stored argv ran version detection: -sV, or a full scan (its
    second phase is a version scan of the open ports). Only version detection needs the argv
    to tell: every scan names a port's service (without -sV, nmap's guess from the port
    number), while script output and OS matches come only from a scan that ran scripts (-sC,
    --script) or OS detection (-O), and one of those that reports none on a port or host is no
    evidence against an earlier one: scans select their scripts, and OS detection often names
    nothing."""
    return kind is ScanKind.FULL or "-sV" in argv[:argv.index("--")]


def recorded_hosts(result: ScanResult, known_hosts: Mapping[str, Stored]) -> dict[str, HostDetail]:
    """The hosts of a scan the inventory records, by address: those nmap found up, except an
    address it called up only because it was told to (-Pn: reason user-set) that showed no
    open port and is not known up. Such an address never answered: its closed or filtered
    ports come as readily from a firewall, or the loopback interface, as from a machine (one
    -Pn scan of a /24 with 8 machines listed 256 hosts up)."""
    return {h.address: h for h in result.hosts if h.status == "up" and (
        h.reason != "user-set" or any(p.state == "open" for p in h.ports)
        or known_hosts.get(h.address, {}).get("status") == "up")}


def plan_update(
    owner: str, task_id: str, result: ScanResult, scope: Scope,
    known_hosts: Mapping[str, Stored], known_ports: Mapping[PortKey, Stored], now: float, *, versions: bool,
) -> InventoryUpdate:
    """What a completed scan of `scope` writes, given the rows known before it; `versions`:
    the scan ran version detection (looks_at_versions)."""
    listed_up = {h.address for h in result.hosts if h.status == "up"}
    up = recorded_hosts(result, known_hosts)
    hosts = [_host_row(owner, task_id, host, known_hosts.get(host.address), now) for host in up.values()]
    hosts += [
        {**row, "status": "down", "changed_at": now, "last_task_id": task_id}
        for address, row in known_hosts.items()
        if address not in listed_up and row["status"] != "down" and address in scope
    ]
    scanned = {s.protocol: port_set(s.services) for s in result.scanned}
    # The known ports by host, in one pass: a scan of 4,096 hosts over 20,480 known rows spent
    # 8.6 s looking through all of them for each host.
    known_by_host: dict[str, list[tuple[str, int, Stored]]] = defaultdict(list)
    for (address, protocol, port), row in known_ports.items():
        known_by_host[address].append((protocol, port, row))
    ports: list[Row] = []
    for host in up.values():
        reported = {(p.protocol, p.port) for p in host.ports}
        key = address_key(host.address)  # once per host: parsing the address was a fifth of a fold
        ports += [_port_row(owner, task_id, (host.address, key), p,
                            known_ports.get((host.address, p.protocol, p.port)), versions, now) for p in host.ports]
        if host.timed_out:  # nmap gave up on it: a port it did not list was not looked at
            continue
        unlisted = _unlisted_state(host)
        ports += [
            _seen(row, unlisted, task_id, now) for protocol, port, row in known_by_host[host.address]
            if (protocol, port) not in reported and port in scanned.get(protocol, ())
        ]
    return InventoryUpdate(hosts, ports)


def _host_row(owner: str, task_id: str, host: HostDetail, known: Stored | None, now: float) -> Row:
    os_found = _os(host, known, task_id, now)
    changed = known is None or known["status"] != "up" or (
        known["os_confirmed_at"] is not None and known["os"] != os_found["os"])
    return {
        "owner": owner, "address": host.address, "address_key": address_key(host.address), "status": "up",
        "hostnames": json.dumps(host.hostnames or json.loads((known or {}).get("hostnames", "[]"))),
        **os_found, "first_seen": known["first_seen"] if known else now, "last_seen": now,
        "changed_at": now if changed else known["changed_at"], "last_task_id": task_id,  # type: ignore[index]
    }


def _os(host: HostDetail, known: Stored | None, task_id: str, now: float) -> Row:
    """nmap's best OS match when OS detection named one, else what an earlier one named."""
    if host.os_matches:
        return {"os": host.os_matches[0].name, "os_confirmed_at": now, "os_task_id": task_id}
    return {key: known[key] for key in _OS} if known else {"os": "", "os_confirmed_at": None, "os_task_id": None}


def _port_row(owner: str, task_id: str, address: tuple[str, str], port: PortDetail, known: Stored | None,
              versions: bool, now: float) -> Row:
    """The row of a port the scan listed; `address`: its host's address and address_key."""
    row = {
        "owner": owner, "address": address[0], "protocol": port.protocol, "port": port.port,
        "address_key": address[1], "state": port.state,
        # Version detection probes open ports only.
        **_service(port, known, versions and port.state == "open", task_id, now),
        **_scripts(port, known, task_id, now),
        "first_seen": known["first_seen"] if known else now, "last_seen": now, "last_task_id": task_id,
    }
    changed = known is None or known["state"] != port.state or _service_changed(known, row)
    return row | {"changed_at": now if changed else known["changed_at"]}  # type: ignore[index]


def _service(port: PortDetail, known: Stored | None, looked: bool, task_id: str, now: float) -> Row:
    """What runs on the port: what this scan's version detection found, else what the last
    one found, else nmap's latest guess from the port number."""
    if known is not None and not looked and known["version_confirmed_at"] is not None:
        return {key: known[key] for key in _SERVICE}
    text = port.untrusted or PortText()
    return {"service": port.service, "product": text.product, "version": text.version,
            "extrainfo": text.extrainfo, "cpe": json.dumps(text.cpe),
            "version_confirmed_at": now if looked else None, "version_task_id": task_id if looked else None}


def _service_changed(known: Stored, row: Row) -> bool:
    """Learning what runs on a port is no change of it; version detection finding something
    other than it found before is (and so is a guess that differs from the last guess)."""
    first_look = known["version_confirmed_at"] is None and row["version_confirmed_at"] is not None
    return not first_look and any(known[key] != row[key] for key in ("service", "product", "version", "extrainfo"))


def _scripts(port: PortDetail, known: Stored | None, task_id: str, now: float) -> Row:
    """The NSE scripts that reported on the port in the last scan where any did."""
    if port.untrusted and port.untrusted.scripts:
        return {"scripts": json.dumps([s.id for s in port.untrusted.scripts]), "scripts_confirmed_at": now,
                "scripts_task_id": task_id}
    return {key: known[key] for key in _SCRIPTS} if known else {
        "scripts": "[]", "scripts_confirmed_at": None, "scripts_task_id": None}


def _seen(row: Stored, state: str, task_id: str, now: float) -> Row:
    """A known port that this scan scanned but did not list: it is in the unlisted state."""
    changed = row["state"] != state
    return {**row, "state": state, "last_seen": now, "last_task_id": task_id,
            "changed_at": now if changed else row["changed_at"]}


def _unlisted_state(host: HostDetail) -> str:
    states = {e.state for e in host.extraports}
    return states.pop() if len(states) == 1 else "closed"


def _within(address: str, scope: Iterable[IPNetwork]) -> bool:
    parsed = ipaddress.ip_address(address)
    return any(parsed.version == n.version and parsed in n for n in scope)
