"""The target grammar and policy, without nmap: every refusal happens before any process,
and before any DNS lookup."""

from __future__ import annotations

import ipaddress
import re
from functools import partial

import pytest

from resolver import HostResolver
from targets import (
    IPAddress,
    TargetError,
    TargetPolicy,
    parse_networks,
    resolve_targets,
    split_targets,
)

pytestmark = pytest.mark.anyio

# The system resolver, as the server uses it ("localhost" comes from /etc/hosts).
SYSTEM = partial(HostResolver(1, 5.0).addresses, "tests")

OPEN_POLICY = TargetPolicy(
    allowed=parse_networks(["0.0.0.0/0", "::/0"]), allow_loopback=True, max_addresses=256
)

HOSTILE = [
    # option injection, in every spelling nmap would accept
    "--script=/tmp/x.nse", "-oN/tmp/x", "-iL/etc/passwd", "-iL", "--resume", "-oX", "-Fo/p",
    "-sC", "--datadir=/tmp", "-d", "--", "-", "--ser", "-iR", "-iR1000",
    # shell metacharacters and whitespace
    "127.0.0.1;id", "127.0.0.1|id", "127.0.0.1&&id", "$(id)", "`id`", "127.0.0.1 -oN/tmp/x",
    "127.0.0.1\n-oN/tmp/x", "127.0.0.1\t", "127.0.0.1>x", "a'b", 'a"b', "a\\b", "*", "127.0.0.*",
    # odd spellings of IPv4 addresses
    "0177.0.0.1", "127.1", "2130706433", "0x7f000001", "127.000.000.001", "127.0.0.01",
    "2852039166", "0xa9fea9fe", "169.254.43518", "256.1.1.1", "1.2.3", "1.2.3.4.5",
    # metadata, reserved and smuggling addresses
    "169.254.169.254", "169.254.0.0/16", "100.100.100.200", "168.63.129.16", "192.0.0.192",
    "0.0.0.0", "0.1.2.3", "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1",
    "fe80::1", "fe80::1%eth0", "ff02::1", "fd00:ec2::254", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
    "::127.0.0.1", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1", "2001:0:a9fe:a9fe::1", "::",
    "metadata.google.internal", "METADATA.GOOGLE.INTERNAL", "metadata", "instance-data",
    # malformed networks, ranges and hostnames
    "127.0.0.1/33", "127.0.0.1/24", "10.0.0.0/7", "127.0.0.5-1", "127.0.0.1-256", "127.0-1.0.1",
    "-host", "host-", "a..b", ".", "a" * 64 + ".com", "xn--", "exa_mple.com", "ex ample.com", "", "id", "router",
    "127.43.1.1-300", "1.2.3.4-5-6", "10.0.0.1-10.0.0.5", "1.2.3.4-", "1..2.3", "300.1.1.1-2",
    # too many addresses
    "10.0.0.0/16", "127.0.0.0/8", "::1/64",
]

LEGITIMATE = {
    "127.0.0.1": ("127.0.0.1",),
    "127.0.0.0/24": ("127.0.0.0/24",),
    "127.0.0.1-8": ("127.0.0.1-8",),
    "::1": ("::1",),
    "0:0:0:0:0:0:0:1": ("::1",),
    "localhost": ("127.0.0.1",),
    "10.1.2.3": ("10.1.2.3",),
}


class Recording:
    """A lookup that answers from a table and records each name it is asked."""

    def __init__(self, answers: dict[str, tuple[str, ...]] | None = None) -> None:
        self.answers = answers or {}
        self.asked: list[str] = []

    async def __call__(self, hostname: str) -> tuple[IPAddress, ...]:
        self.asked.append(hostname)
        return tuple(ipaddress.ip_address(a) for a in self.answers.get(hostname, ("10.1.1.1",)))


@pytest.mark.parametrize("target", HOSTILE)
async def test_hostile_targets_are_refused_without_a_lookup(target: str) -> None:
    lookup = Recording()
    with pytest.raises(TargetError):
        await resolve_targets([target], OPEN_POLICY, lookup)
    assert lookup.asked == []


@pytest.mark.parametrize(("target", "why"), [
    ("127.43.1.1-300", "'300' is not a number from 0 to 255"),
    ("256.1.1.1", "'256' is not a number from 0 to 255"),
    ("0177.0.0.1", "'0177' is not a number from 0 to 255 without leading zeros"),
    ("1.2.3.4-5-6", "only the last octet may be a range, with one '-'"),
    ("10.0.0.1-10.0.0.5", "only the last octet may be a range"),
    ("1.2.3", "an address is four numbers from 0 to 255 separated by dots, such as 192.168.1.10; this has 3"),
    ("2130706433", "an address is four numbers from 0 to 255 separated by dots, such as 192.168.1.10; this has 1"),
    ("1..2.3", "an empty part is not a number"),
])
async def test_a_malformed_ipv4_address_or_range_is_never_a_hostname(target: str, why: str) -> None:
    with pytest.raises(TargetError, match=re.escape(f"'{target}' is not a valid IPv4 address or range: {why}")):
        await resolve_targets([target], OPEN_POLICY, Recording())


async def test_a_token_that_may_not_resolve_names_is_refused_without_a_lookup() -> None:
    lookup = Recording()
    held = TargetPolicy(allowed=parse_networks(["10.0.0.0/8"]), token_allowed=parse_networks(["10.1.2.0/24"]),
                        resolve_names=False)
    with pytest.raises(TargetError, match=r"'side-channel\.example\.com' is a hostname, and this token may not have "
                                          r"names resolved"):
        await resolve_targets(["side-channel.example.com"], held, lookup)
    assert lookup.asked == []
    assert (await resolve_targets(["10.1.2.3"], held, lookup)).nmap_targets == ("10.1.2.3",)


@pytest.mark.parametrize("refused", ["256.1.1.1", "169.254.169.254", "10.0.0.0/16", "-oN/tmp/x", "metadata"])
async def test_no_name_is_looked_up_when_another_target_of_the_call_is_refused(refused: str) -> None:
    lookup = Recording()
    with pytest.raises(TargetError):
        await resolve_targets(["first.example.com", refused], OPEN_POLICY, lookup)
    assert lookup.asked == []


async def test_every_address_of_a_name_must_pass() -> None:
    lookup = Recording({"trap.example.com": ("10.1.1.1", "169.254.169.254"), "both.example.com": ("::1", "127.0.0.1")})
    with pytest.raises(TargetError, match=r"'trap\.example\.com' reaches 169\.254\.0\.0/16"):
        await resolve_targets(["trap.example.com"], OPEN_POLICY, lookup)
    assert (await resolve_targets(["both.example.com"], OPEN_POLICY, lookup)).nmap_targets == ("127.0.0.1",)


@pytest.mark.parametrize(("target", "expected"), LEGITIMATE.items())
async def test_legitimate_targets_become_canonical_nmap_targets(target: str, expected: tuple[str, ...]) -> None:
    resolved = await resolve_targets([target], OPEN_POLICY, SYSTEM)
    assert resolved.nmap_targets == expected


async def test_hostnames_are_resolved_here_and_remembered() -> None:
    resolved = await resolve_targets(["localhost"], OPEN_POLICY, SYSTEM)
    assert resolved.hostnames == {"127.0.0.1": "localhost"}
    assert resolved.address_count == 1


async def test_loopback_needs_to_be_allowed() -> None:
    strict = TargetPolicy(allowed=parse_networks(["0.0.0.0/0"]), allow_loopback=False)
    with pytest.raises(TargetError, match="loopback"):
        await resolve_targets(["127.0.0.1"], strict, SYSTEM)
    with pytest.raises(TargetError, match="loopback"):
        await resolve_targets(["localhost"], strict, SYSTEM)


async def test_allow_and_deny_lists_and_token_lists() -> None:
    policy = TargetPolicy(
        allowed=parse_networks(["10.0.0.0/8"]),
        denied=parse_networks(["10.9.0.0/16"]),
        token_allowed=parse_networks(["10.1.0.0/16"]),
    )
    assert (await resolve_targets(["10.1.2.0/24"], policy, SYSTEM)).address_count == 256
    with pytest.raises(TargetError, match="policy denies"):
        await resolve_targets(["10.9.0.1"], policy, SYSTEM)
    with pytest.raises(TargetError, match="this token"):
        await resolve_targets(["10.2.0.1"], policy, SYSTEM)
    with pytest.raises(TargetError, match="outside the networks this server"):
        await resolve_targets(["192.168.1.1"], policy, SYSTEM)


async def test_builtin_deny_list_wins_over_any_allowlist() -> None:
    everything = TargetPolicy(allowed=parse_networks(["0.0.0.0/0", "::/0"]), allow_loopback=True)
    with pytest.raises(TargetError, match="never scanned"):
        await resolve_targets(["169.254.169.254"], everything, SYSTEM)


async def test_caps_on_addresses_and_target_count() -> None:
    with pytest.raises(TargetError, match="more than 256 addresses"):
        await resolve_targets(["127.0.0.0/24", "127.0.1.1"], OPEN_POLICY, SYSTEM)
    with pytest.raises(TargetError, match="at most 16"):
        await resolve_targets([f"127.0.0.{i}" for i in range(1, 18)], OPEN_POLICY, SYSTEM)


async def test_ipv4_and_ipv6_cannot_be_mixed() -> None:
    with pytest.raises(TargetError, match="cannot be mixed"):
        await resolve_targets(["127.0.0.1", "::1"], OPEN_POLICY, SYSTEM)


def test_network_boundary_error_suggests_the_network() -> None:
    with pytest.raises(TargetError, match=r"did you mean 127\.0\.0\.0/24"):
        from targets import parse_literal

        parse_literal("127.0.0.1/24")


def test_split_targets_uses_no_shell_rules() -> None:
    assert split_targets(" 127.0.0.1, 127.0.0.2\t::1 ") == ["127.0.0.1", "127.0.0.2", "::1"]


def test_bad_configured_network_is_named() -> None:
    with pytest.raises(ValueError, match=r"'10\.0\.0\.1/8'"):
        parse_networks(["10.0.0.1/8"])


def test_builtin_denials_cover_ipv4_mapped_loopback() -> None:
    mapped = ipaddress.ip_network("::ffff:127.0.0.1")
    from targets import BUILTIN_DENIED_NETWORKS

    assert any(mapped.subnet_of(net) for net in BUILTIN_DENIED_NETWORKS if net.version == 6)
