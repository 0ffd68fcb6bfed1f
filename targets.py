"""Target policy: what a caller may ask nmap to scan.

Every target string is parsed by a strict grammar, hostnames are resolved here (not by
nmap, which would resolve them again and open a DNS-rebinding gap), every address is
checked against a built-in deny list that always wins, then against the configured
allow and deny lists. nmap receives only canonical addresses and networks, with `-n`.

Every target of a call passes the grammar and the checks that need no DNS (deny lists,
literal addresses against the policy, the size of the scan, whether the caller may have
names resolved) before any name is looked up: a refused call costs no DNS query.
How names are looked up (which threads, how many at once, what is cached) is
resolver.py's; this module only asks, through a `Lookup`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Resolves one hostname for the caller: its addresses, or TargetError saying why not.
Lookup = Callable[[str], Awaitable[tuple[IPAddress, ...]]]

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = re.compile(rf"^{_OCTET}(?:\.{_OCTET}){{3}}$")
_IPV4_CIDR = re.compile(rf"^({_OCTET}(?:\.{_OCTET}){{3}})/([0-9]{{1,2}})$")
_IPV4_RANGE = re.compile(rf"^((?:{_OCTET}\.){{3}})({_OCTET})-({_OCTET})$")
_OCTET_ONLY = re.compile(rf"^{_OCTET}$")
# Digits, dots and dashes only: an IPv4 address or range, well written or not; never a hostname.
_IPV4_SHAPED = re.compile(r"^[0-9.-]+$")
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
    # A token's own narrower allowlist; None means the global one alone decides.
    token_allowed: tuple[IPNetwork, ...] | None = None
    # Whether hostnames are looked up for this caller; when not, a hostname is refused
    # without a DNS query (the names a caller picks would otherwise reach the resolver).
    resolve_names: bool = True


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


@dataclass(frozen=True)
class _Target:
    """One target after the checks that need no DNS: a literal with its networks, or a
    hostname still to look up."""

    nmap_target: str = ""
    networks: tuple[IPNetwork, ...] = ()
    hostname: str = ""


async def resolve_targets(tokens: Sequence[str], policy: TargetPolicy, lookup: Lookup) -> ResolvedTargets:
    """Validate each target token, then resolve hostnames with `lookup`, and apply the policy."""
    if not tokens:
        raise TargetError("no target given")
    if len(tokens) > policy.max_targets:
        raise TargetError(f"{len(tokens)} targets given; at most {policy.max_targets} per call")
    checked = [_check_without_dns(token, policy) for token in tokens]
    # A hostname becomes one address, so the size is known before any lookup.
    total = sum(network.num_addresses for target in checked for network in target.networks)
    if total + sum(1 for target in checked if target.hostname) > policy.max_addresses:
        raise TargetError(
            f"the targets cover more than {policy.max_addresses} addresses; "
            "scan a smaller range (for example a /24 or less)"
        )
    targets = [await _resolved(target, policy, lookup) if target.hostname else target for target in checked]
    if len({network.version for target in targets for network in target.networks}) > 1:
        raise TargetError("IPv4 and IPv6 targets cannot be mixed in one scan; split the call")
    return ResolvedTargets(
        nmap_targets=tuple(target.nmap_target for target in targets),
        ipv6=any(network.version == 6 for target in targets for network in target.networks),
        address_count=sum(network.num_addresses for target in targets for network in target.networks),
        hostnames={target.nmap_target: target.hostname for target in targets if target.hostname},
        networks=tuple(target.networks for target in targets),
    )


def _check_without_dns(token: str, policy: TargetPolicy) -> _Target:
    """The grammar, the deny lists and the policy for a literal; for a name, whether it may
    be looked up at all."""
    literal = parse_literal(token)
    if literal is not None:
        nmap_target, networks = literal
        for network in networks:
            _check_allowed(token, network, policy)
        return _Target(nmap_target, tuple(networks))
    hostname = _parse_hostname(token)
    if not policy.resolve_names:
        raise TargetError(
            f"'{token}' is a hostname, and this token may not have names resolved (resolve_names is off); "
            "give its IP address or network"
        )
    return _Target(hostname=hostname)


async def _resolved(target: _Target, policy: TargetPolicy, lookup: Lookup) -> _Target:
    """Look the name up; every address it has must pass, and nmap gets one of them,
    IPv4 first, as nmap itself prefers without -6."""
    addresses = await lookup(target.hostname)
    for address in addresses:
        # Every answer must pass: a name that mixes a permitted and a denied address is a trap.
        _check_allowed(target.hostname, ipaddress.ip_network(address), policy)
    chosen = next((a for a in addresses if a.version == 4), addresses[0])
    return _Target(str(chosen), (ipaddress.ip_network(chosen),), target.hostname)


def parse_literal(token: str) -> tuple[str, list[IPNetwork]] | None:
    """Parse an address, CIDR or last-octet range; None when the token is not one."""
    if _IPV4.match(token):
        return token, [ipaddress.ip_network(token)]
    if match := _IPV4_CIDR.match(token):
        return _network_target(token, match.group(1), int(match.group(2)), 32)
    if match := _IPV4_RANGE.match(token):
        return _range_target(token, match.group(1), int(match.group(2)), int(match.group(3)))
    if _IPV4_SHAPED.match(token):
        raise TargetError(f"'{token}' is not a valid IPv4 address or range: {_ipv4_problem(token)}")
    if ":" in token:
        return _ipv6_target(token)
    return None


def address_count(nmap_targets: Iterable[str]) -> int:
    """How many addresses targets as the server gives them to nmap cover (resolved literals:
    a word that is not one counts nothing)."""
    literals = (parse_literal(target) for target in nmap_targets)
    return sum(network.num_addresses for literal in literals if literal for network in literal[1])


def _ipv4_problem(token: str) -> str:
    """What is wrong with a token of digits, dots and dashes that none of the IPv4 forms matched."""
    address, dash, last = token.partition("-")
    octets = address.split(".")
    if dash and not last.isdigit():
        return ("only the last octet may be a range, with one '-', such as 192.168.1.1-20; "
                "for a wider span give a CIDR network")
    if len(octets) != 4:
        return ("an address is four numbers from 0 to 255 separated by dots, such as 192.168.1.10; "
                f"this has {len(octets)}")
    # There is one: had every part been an octet, the token would have matched _IPV4 or _IPV4_RANGE.
    bad = next(part for part in ([*octets, last] if dash else octets) if not _OCTET_ONLY.match(part))
    shown = f"'{bad}'" if bad else "an empty part"
    return f"{shown} is not a number from 0 to 255 without leading zeros"


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
