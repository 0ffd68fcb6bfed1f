"""A scan's impact, without I/O: the probes an argv sends (addresses x ports per address), which
the probes_per_day budget counts, the packet rate every argv is capped at (--max-rate), and what
a planned scan may take and send, estimated from the fleet's history (plan_scan).

Both read the canonical options the server writes (nmap_options.parse_command, scanner.scan_options),
never a caller's spelling: an option's value is the word after it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from models import PlanEstimate
from nmap_options import ALLOWED_OPTIONS, CommandError, ParsedCommand
from scanner import scanned_addresses

# nmap's own choice when a scan names no ports: its 1,000 most common of each protocol scanned.
DEFAULT_PORTS = 1000
FAST_PORTS = 100  # -F
ALL_PORTS = 65535
_TCP_TYPES = frozenset({"-sT", "-sS"})
# Host discovery's probes per address, before any port is scanned (nmap's manual, Host
# Discovery): without privileges a TCP connection to ports 80 and 443; with raw packets an ICMP
# echo, a SYN to 443, an ACK to 80 and an ICMP timestamp request (on a local Ethernet segment,
# an ARP request instead).
DISCOVERY_PROBES = {False: 2, True: 4}


def option_values(options: Sequence[str]) -> dict[str, str | None]:
    """Each option of canonical `options` with its value (None for a flag)."""
    values: dict[str, str | None] = {}
    words = iter(options)
    for word in words:
        option = ALLOWED_OPTIONS.get(word)
        values[word] = next(words, None) if option is not None and option.value is not None else None
    return values


def ports_per_address(options: Sequence[str]) -> int:
    """The ports nmap probes on each address for these options: a ping scan (-sn) probes once;
    else -p counted exactly (ranges, T:/U: prefixes, for each protocol scanned, less
    --exclude-ports), --top-ports N or -F of each protocol, and nmap's default 1,000 otherwise."""
    given = option_values(options)
    if "-sn" in given:
        return 1
    protocols = ("tcp",) * bool(_TCP_TYPES & given.keys()) + ("udp",) * ("-sU" in given)
    if (spec := given.get("-p")) is not None:
        excluded = port_sets(given.get("--exclude-ports") or "")
        listed = port_sets(spec)
        return sum(len(listed[protocol] - excluded[protocol]) for protocol in protocols)
    if (top := given.get("--top-ports")) is not None:
        return int(top) * len(protocols)
    return (FAST_PORTS if "-F" in given else DEFAULT_PORTS) * len(protocols)


def port_sets(spec: str) -> dict[str, set[int]]:
    """The ports of an nmap port list, by protocol: a T: or U: prefix holds for the items after it
    until the next one; items before any prefix are ports of both. An open range runs from 1 or
    to 65535 (port_spec has checked the list)."""
    ports: dict[str, set[int]] = {"tcp": set(), "udp": set()}
    protocols: tuple[str, ...] = ("tcp", "udp")
    for item in filter(None, spec.split(",")):
        prefix, _, span = item.rpartition(":")
        if prefix:
            protocols = ("tcp",) if prefix == "T" else ("udp",)
        low, dash, high = span.partition("-")
        first = int(low) if low else 1
        last = (int(high) if high else ALL_PORTS) if dash else first
        for protocol in protocols:
            ports[protocol].update(range(first, last + 1))
    return ports


def options_of(argv: Sequence[str]) -> list[str]:
    """The words of an argv between the program and `--` (the options, the server's included)."""
    return list(argv[1:list(argv).index("--") if "--" in argv else len(argv)])


def probes(argv: Sequence[str]) -> int:
    """The probes an argv the server built sends: its addresses times the ports of each."""
    return scanned_addresses(argv) * ports_per_address(options_of(argv))


def rated(options: Sequence[str], cap: int, *, built_in: bool) -> list[str]:
    """`options` under a rate cap of `cap` packets per second: the caller's own --max-rate when
    it is not above the cap (CommandError when it is), else `--max-rate cap`. A --min-rate above
    that rate is lowered to it in a built-in scan (full_scan's floor of 1000) and refused in the
    caller's own command (nmap itself refuses a minimum above the maximum)."""
    parsed = ParsedCommand(options=list(options))
    given = option_values(options)
    own = given.get("--max-rate")
    if own is None:
        parsed.add_default("--max-rate", str(cap))
    elif float(own) > cap:
        raise CommandError(f"'--max-rate {own}' is above this token's cap of {cap} packets per second; "
                           f"give at most --max-rate {cap}, or leave it out to get {cap}")
    rate = float(own) if own is not None else cap
    floor = given.get("--min-rate")
    if floor is not None and float(floor) > rate:
        if not built_in:
            raise CommandError(f"'--min-rate {floor}' is above the {rate:g} packets per second this scan may "
                               f"send (--max-rate); give at most --min-rate {rate:g}")
        at = parsed.options.index("--min-rate") + 1
        parsed.options[at] = f"{rate:g}"
    return parsed.options


def max_rate_of(argv: Sequence[str]) -> float | None:
    """The --max-rate an argv carries (among its options, before `--`); None without one."""
    value = option_values(options_of(argv)).get("--max-rate")
    return None if value is None else float(value)


def packets(argv: Sequence[str]) -> int:
    """The probes an argv sends to its targets, each counted once: one per address and port
    (none for a ping scan), plus host discovery's for each address unless -Pn. nmap reports no
    packet count for connect scans (its "Raw packets sent" is for raw-packet scans only), so this
    is a lower bound: retransmissions, version detection and scripts send more."""
    given = option_values(options_of(argv))
    port_probes = 0 if "-sn" in given else probes(argv)
    discovery = 0 if "-Pn" in given else scanned_addresses(argv) * DISCOVERY_PROBES["--privileged" in argv]
    return port_probes + discovery


def seconds_per_probe(probe_count: int, history: Sequence[tuple[int, float]]) -> float | None:
    """The weighted median of past scans' seconds per probe, each of (probes, seconds) weighted
    by how near its size is to `probe_count` (1 for the same size, 1/2 for e times more or
    fewer): small scans spend most of their time starting nmap, large ones probing. None
    without history."""
    rates = sorted((seconds / count, 1 / (1 + abs(math.log(count / max(probe_count, 1)))))
                   for count, seconds in history)
    half, running = sum(weight for _, weight in rates) / 2, 0.0
    for rate, weight in rates:
        running += weight
        if running >= half:
            return rate
    return None


def estimate(argv: Sequence[str], history: Sequence[tuple[int, float]], similar: str) -> PlanEstimate:
    """How long `argv` may take, from `history` (probes and seconds of completed `similar`
    scans), and the packets it sends; never faster than its packets at its --max-rate."""
    sent, rate = packets(argv), max_rate_of(argv)
    floor_s = round(sent / rate, 2) if rate else 0.0
    spp = seconds_per_probe(probes(argv), history)
    if spp is None:
        return PlanEstimate(duration_s=None, min_duration_s=floor_s, packets=sent, based_on=0, method=(
            f"no completed {similar} yet, so no estimate from history; its packets at its --max-rate are a floor"))
    return PlanEstimate(
        duration_s=round(max(spp * probes(argv), floor_s), 2), min_duration_s=floor_s, packets=sent,
        based_on=len(history), method=(
            f"this scan's probes times the median seconds per probe of the last {len(history)} completed "
            f"{similar}, weighted toward scans of a similar number of probes; at least its packets at its --max-rate"))
