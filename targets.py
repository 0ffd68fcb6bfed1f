"""Target policy: what a caller may ask nmap to scan.

Every target string is parsed by a strict grammar, hostnames are resolved here (not by
nmap, which would resolve them again and open a DNS-rebinding gap), every address is
checked against a built-in deny list that always wins, then against the configured
allow and deny lists. nmap receives only canonical addresses and networks, with `-n`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = re.compile(rf"^{_OCTET}(?:\.{_OCTET}){{3}}$")
_IPV4_CIDR = re.compile(rf"^({_OCTET}(?:\.{_OCTET}){{3}})/([0-9]{{1,2}})$")
_IPV4_RANGE = re.compile(rf"^((?:{_OCTET}\.){{3}})({_OCTET})-({_OCTET})$")
_IPV6_CHARS = re.compile(r"^[0-9A-Fa-f:.]+(?:/[0-9]{1,3})?$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")

# Addresses no configuration can allow: cloud metadata services, unspecified, link-local,
# multicast and reserved space, and IPv6 forms that smuggle an IPv4 address through.
_IPV4_COMPATIBLE_EXCEPT_LOOPBACK = tuple(
    ipaddress.IPv6Network("::/96").address_exclude(ipaddress.IPv6Network("::1/128"))
)
BUILTIN_DENIED_NETWORKS: tuple[IPNetwork, ...] = _IPV4_COMPATIBLE_EXCEPT_LOOPBACK + tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8",
        "169.254.0.0/16",
        "100.100.100.200/32",
        "168.63.129.16/32",
        "192.0.0.192/32",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::ffff:0:0/96",
        "64:ff9b::/96",
        "64:ff9b:1::/48",
        "100::/64",
        "2001::/32",
        "2002::/16",
        "fe80::/10",
        "fd00:ec2::254/128",
        "ff00::/8",
    )
)
BUILTIN_DENIED_HOSTNAMES: frozenset[str] = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.com",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.tencentyun.com",
        "metadata.platformequinix.com",
    }
)
LOOPBACK_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


class TargetError(ValueError):
    """A target was refused; the message names it and says what to change."""


@dataclass(frozen=True)
class TargetPolicy:
    """Which addresses may be scanned; built from settings and the caller's token."""

    allowed: tuple[IPNetwork, ...]
    denied: tuple[IPNetwork, ...] = ()
    allow_loopback: bool = False
    max_addresses: int = 256
    max_targets: int = 16
    resolve_timeout_s: float = 5.0
    # A token's own narrower allowlist; None means the global one alone decides.
    token_allowed: tuple[IPNetwork, ...] | None = None


@dataclass(frozen=True)
class ResolvedTargets:
    """Validated targets: what nmap gets after `--`, and the facts callers report."""

    nmap_targets: tuple[str, ...]
    ipv6: bool
    address_count: int
    hostnames: dict[str, str] = field(default_factory=dict)
    # The networks each of nmap_targets covers, in the same order.
    networks: tuple[tuple[IPNetwork, ...], ...] = ()


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parse configured CIDR strings; raise ValueError naming a bad one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=True))
        except ValueError as e:
            raise ValueError(f"'{value}' is not a network in CIDR form ({e})") from e
    return tuple(networks)


def split_targets(text: str) -> list[str]:
    """Split a target string on whitespace and commas (no quoting, no shell)."""
    return [part for part in re.split(r"[\s,]+", text.strip()) if part]


async def resolve_targets(tokens: Sequence[str], policy: TargetPolicy) -> ResolvedTargets:
    """Validate each target token, resolve hostnames, and apply the policy."""
    if not tokens:
        raise TargetError("no target given")
    if len(tokens) > policy.max_targets:
        raise TargetError(f"{len(tokens)} targets given; at most {policy.max_targets} per call")
    nmap_targets: list[str] = []
    covered: list[tuple[IPNetwork, ...]] = []
    hostnames: dict[str, str] = {}
    families: set[int] = set()
    total = 0
    for token in tokens:
        nmap_target, network_list, hostname = await _resolve_one(token, policy)
        for network in network_list:
            _check_allowed(token, network, policy)
            families.add(network.version)
        total += sum(network.num_addresses for network in network_list)
        if total > policy.max_addresses:
            raise TargetError(
                f"the targets cover more than {policy.max_addresses} addresses; "
                "scan a smaller range (for example a /24 or less)"
            )
        nmap_targets.append(nmap_target)
        covered.append(tuple(network_list))
        if hostname:
            hostnames[nmap_target] = hostname
    if len(families) > 1:
        raise TargetError("IPv4 and IPv6 targets cannot be mixed in one scan; split the call")
    return ResolvedTargets(tuple(nmap_targets), 6 in families, total, hostnames, tuple(covered))


async def _resolve_one(token: str, policy: TargetPolicy) -> tuple[str, list[IPNetwork], str]:
    """Return (what nmap scans, the networks it covers, the hostname if one was given)."""
    literal = parse_literal(token)
    if literal is not None:
        nmap_target, networks = literal
        return nmap_target, networks, ""
    hostname = _parse_hostname(token)
    address = await _resolve_hostname(hostname, policy)
    return str(address), [ipaddress.ip_network(address)], hostname


def parse_literal(token: str) -> tuple[str, list[IPNetwork]] | None:
    """Parse an address, CIDR or last-octet range; None when the token is not one."""
    if _IPV4.match(token):
        return token, [ipaddress.ip_network(token)]
    if match := _IPV4_CIDR.match(token):
        return _network_target(token, match.group(1), int(match.group(2)), 32)
    if match := _IPV4_RANGE.match(token):
        return _range_target(token, match.group(1), int(match.group(2)), int(match.group(3)))
    if ":" in token:
        return _ipv6_target(token)
    return None


def _network_target(token: str, address: str, prefix: int, width: int) -> tuple[str, list[IPNetwork]]:
    if prefix > width:
        raise TargetError(f"'{token}': prefix /{prefix} is longer than /{width}")
    try:
        network = ipaddress.ip_network(f"{address}/{prefix}", strict=True)
    except ValueError as e:
        base = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
        raise TargetError(f"'{token}' is not on a network boundary; did you mean {base}?") from e
    return str(network), [network]


def _range_target(token: str, prefix: str, first: int, last: int) -> tuple[str, list[IPNetwork]]:
    if first > last:
        raise TargetError(f"'{token}': the range runs backwards ({first} > {last})")
    hosts = [ipaddress.IPv4Network(f"{prefix}{octet}/32") for octet in range(first, last + 1)]
    return token, list(ipaddress.collapse_addresses(hosts))


def _ipv6_target(token: str) -> tuple[str, list[IPNetwork]]:
    if not _IPV6_CHARS.match(token):
        raise TargetError(f"'{token}' is not a valid IPv6 address (zone ids are not accepted)")
    address, _, prefix = token.partition("/")
    try:
        parsed = ipaddress.IPv6Address(address)
    except ValueError as e:
        raise TargetError(f"'{token}' is not a valid IPv6 address") from e
    if not prefix:
        return str(parsed), [ipaddress.ip_network(parsed)]
    return _network_target(token, str(parsed), int(prefix), 128)


def _parse_hostname(token: str) -> str:
    if not _HOSTNAME.match(token):
        raise TargetError(
            f"'{token}' is not a valid target: give an IPv4 or IPv6 address, a CIDR network, "
            "a last-octet range such as 192.168.1.1-20, or a hostname (letters, digits, '-', '.')"
        )
    if _looks_numeric(token):
        raise TargetError(
            f"'{token}' is an unusual spelling of an IPv4 address; "
            "write it as a dotted quad without leading zeros, such as 192.168.1.10"
        )
    name = token.lower()
    if name in BUILTIN_DENIED_HOSTNAMES:
        raise TargetError(f"'{token}' is a cloud metadata hostname and is never scanned")
    if "." not in name and name != "localhost":
        # A single label would be completed by the resolver's search domains: a surprise.
        raise TargetError(f"'{token}' is a single-label name; give a fully qualified hostname such as host.example.com")
    return name


def _looks_numeric(name: str) -> bool:
    """True for names glibc or nmap would read as an IPv4 address (127.1, 0x7f000001...)."""
    try:
        socket.inet_aton(name)
    except OSError:
        return name.rsplit(".", 1)[-1].isdigit()
    return True


async def _resolve_hostname(hostname: str, policy: TargetPolicy) -> IPAddress:
    """Resolve with a timeout; prefer IPv4, as nmap does without -6."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(policy.resolve_timeout_s):
            infos = await loop.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise TargetError(f"'{hostname}' does not resolve") from e
    except TimeoutError as e:
        raise TargetError(f"resolving '{hostname}' took more than {policy.resolve_timeout_s:g} s") from e
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    for address in addresses:
        # Every answer must pass: a name that mixes a permitted and a denied address is a trap.
        _check_allowed(hostname, ipaddress.ip_network(address), policy)
    return next((a for a in addresses if a.version == 4), addresses[0])


def _check_allowed(token: str, network: IPNetwork, policy: TargetPolicy) -> None:
    for denied in BUILTIN_DENIED_NETWORKS:
        if _overlaps(network, denied):
            raise TargetError(f"'{token}' reaches {denied}, which is never scanned (reserved or metadata)")
    for denied in policy.denied:
        if _overlaps(network, denied):
            raise TargetError(f"'{token}' reaches {denied}, which this server's policy denies")
    if _within(network, LOOPBACK_NETWORKS):
        if not policy.allow_loopback:
            raise TargetError(f"'{token}' is a loopback address; this server does not allow loopback scans")
    elif not _within(network, policy.allowed):
        raise TargetError(f"'{token}' is outside the networks this server may scan")
    if policy.token_allowed is not None and not _within(network, policy.token_allowed):
        raise TargetError(f"'{token}' is outside the networks this token may scan")


def _overlaps(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version and a.overlaps(b)


def _within(network: IPNetwork, allowed: Iterable[IPNetwork]) -> bool:
    return any(network.version == a.version and network.subnet_of(a) for a in allowed)  # type: ignore[arg-type]
