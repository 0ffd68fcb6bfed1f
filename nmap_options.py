"""custom_scan's command line: an allowlist of exact nmap option spellings.

The caller's string is split without a shell (shlex, POSIX rules) and every token must be
an allowlisted option, its validated value, or a target. The server then emits nmap's
argv itself from canonical spellings, so the caller's spellings never reach nmap.
nmap accepts option prefixes, clusters, `=` forms and single-dash long options (see
docs/nmap-safety.md), which is why nothing here is a denylist: refusals only explain.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field

from nse_policy import ScriptPolicy, ScriptPolicyError
from targets import TargetError, parse_literal

MAX_COMMAND_LENGTH = 2000


class CommandError(ValueError):
    """A custom_scan command was refused; the message names the token and why."""


@dataclass(frozen=True)
class Option:
    """One allowlisted option: its canonical spelling and how its value is checked."""

    name: str
    summary: str
    value: Callable[[str], str] | None = None
    privileged: bool = False
    group: str = ""


@dataclass
class ParsedCommand:
    """A validated command: canonical nmap options, and the targets still to resolve."""

    options: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    scripts: list[str] = field(default_factory=list)

    def add_default(self, name: str, value: str) -> None:
        """Add an allowlisted option the caller did not give, spelled and placed as
        parse_command would have had the caller written it last: before the `--script`
        expression, which the parse writes last (argv_check compares word for word)."""
        at = next((i for i, word in enumerate(self.options) if word.startswith("--script=")), len(self.options))
        self.options[at:at] = [name, _value(ALLOWED_OPTIONS[name], value)]


def _integer(low: int, high: int) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not re.fullmatch(r"[0-9]{1,6}", value) or not low <= int(value) <= high:
            raise ValueError(f"must be a whole number from {low} to {high}")
        return str(int(value))

    return check


def _number(low: float, high: float) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not re.fullmatch(r"[0-9]{1,7}(\.[0-9]{1,3})?", value) or not low <= float(value) <= high:
            raise ValueError(f"must be a number from {low:g} to {high:g}")
        return f"{float(value):g}"

    return check


_TIME_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


def _duration(low_ms: int, high_ms: int) -> Callable[[str], str]:
    def check(value: str) -> str:
        match = re.fullmatch(r"([0-9]{1,6}(?:\.[0-9]{1,3})?)(ms|s|m|h)", value)
        if not match:
            raise ValueError("must be a time with a unit, such as 500ms, 30s, 5m or 1h")
        millis = round(float(match.group(1)) * _TIME_UNITS_MS[match.group(2)])
        if not low_ms <= millis <= high_ms:
            raise ValueError(f"must be from {low_ms}ms to {high_ms // 1000}s")
        return f"{millis}ms"

    return check


_PORT_ITEM = re.compile(r"^(?:([TU]):)?([0-9]{1,5})?(?:(-)([0-9]{1,5})?)?$")


def port_spec(value: str) -> str:
    """nmap port list: 22,80,8000-8100, T:/U: prefixes, open ranges; every port 1-65535."""
    if value == "-":
        return "1-65535"
    if not value or len(value) > 500:
        raise ValueError("must be a port list such as 22,80,443 or 1-1024")
    for item in value.split(","):
        match = _PORT_ITEM.match(item)
        if not match or not (match.group(2) or match.group(3)):
            raise ValueError(f"'{item}' is not a port or port range")
        ports = [int(p) for p in (match.group(2), match.group(4)) if p]
        if any(not 1 <= p <= 65535 for p in ports):
            raise ValueError(f"port {max(ports)} is out of range 1-65535")
        if len(ports) == 2 and ports[0] > ports[1]:
            raise ValueError(f"range '{item}' runs backwards")
    return value


def exclude_spec(value: str) -> str:
    """Addresses and networks to skip; literals only, so nmap resolves nothing."""
    items = [item for item in value.split(",") if item]
    if not items or len(items) > 64:
        raise ValueError("must list 1 to 64 addresses or networks, separated by commas")
    for item in items:
        try:
            literal = parse_literal(item)
        except TargetError as e:
            raise ValueError(str(e)) from e
        if literal is None:
            raise ValueError(f"'{item}' is not an address or network (hostnames are not accepted here)")
    return ",".join(items)


def _checked_by_script_policy(value: str) -> str:
    """--script and --script-args take their value as given; ScriptPolicy checks it next."""
    return value


def _options() -> dict[str, Option]:
    options = [
        Option("-sT", "TCP connect scan (the default without privileges)", group="scan type"),
        Option("-sS", "TCP SYN scan (the default with privileges)", privileged=True, group="scan type"),
        Option("-sn", "host discovery only, no port scan", group="scan type"),
        Option("-sU", "UDP scan", privileged=True),
        Option("-sV", "service and version detection"),
        Option("-sC", "run the allowed default scripts (same as --script default)"),
        Option("-O", "operating system detection", privileged=True),
        Option("--traceroute", "trace the path to each host", privileged=True),
        Option("-p", "ports to scan, such as 22,80,443 or 1-1024 (- for all)", port_spec, group="ports"),
        Option("--top-ports", "the N most common ports (1-65535)", _integer(1, 65535), group="ports"),
        Option("-F", "the 100 most common ports", group="ports"),
        Option("--exclude-ports", "ports not to scan", port_spec),
        Option("-r", "scan ports in order, not randomly"),
        Option("--version-intensity", "version probe intensity 0-9", _integer(0, 9), group="version"),
        Option("--version-light", "version intensity 2", group="version"),
        Option("--version-all", "version intensity 9", group="version"),
        Option("-T2", "timing: polite", group="timing"),
        Option("-T3", "timing: normal", group="timing"),
        Option("-T4", "timing: aggressive", group="timing"),
        Option("-Pn", "skip host discovery, treat every host as up"),
        Option("-n", "no DNS resolution (always on)"),
        Option("--max-retries", "probe retransmissions 0-10", _integer(0, 10)),
        Option("--host-timeout", "give up on a host after this long (1s-1h)", _duration(1000, 3_600_000)),
        Option("--script-timeout", "give up on a script after this long (1s-30m)", _duration(1000, 1_800_000)),
        Option("--min-rate", "at least N packets per second (1-10000)", _number(1, 10_000)),
        Option("--max-rate", "at most N packets per second (1-100000)", _number(1, 100_000)),
        Option("--min-parallelism", "at least N probes in flight (1-256)", _integer(1, 256)),
        Option("--max-parallelism", "at most N probes in flight (1-256)", _integer(1, 256)),
        Option("--min-hostgroup", "scan at least N hosts at once (1-256)", _integer(1, 256)),
        Option("--max-hostgroup", "scan at most N hosts at once (1-256)", _integer(1, 256)),
        Option("--initial-rtt-timeout", "first probe timeout (10ms-10s)", _duration(10, 10_000)),
        Option("--max-rtt-timeout", "longest probe timeout (10ms-10s)", _duration(10, 10_000)),
        Option("--scan-delay", "wait between probes (0-1s)", _duration(0, 1000)),
        Option("--max-scan-delay", "longest wait between probes (0-1s)", _duration(0, 1000)),
        Option("--open", "show only open (or possibly open) ports"),
        Option("--reason", "show why each port is in its state"),
        Option("--exclude", "addresses or networks to skip, comma-separated", exclude_spec),
        Option("--script", "scripts or categories, comma-separated, under the script policy",
               _checked_by_script_policy),
        Option("--script-args", "key=value script arguments the operator allowlisted", _checked_by_script_policy),
        Option("--osscan-limit", "OS detection only on promising hosts", privileged=True),
        Option("--osscan-guess", "guess OS more aggressively", privileged=True),
    ]
    return {option.name: option for option in options}


ALLOWED_OPTIONS: dict[str, Option] = _options()

# Why the options people reach for most are refused (prefixes resolve to these too).
READS_FILE = "it reads a local file"
WRITES_FILE = "it writes files; the server returns the XML report itself"
RUNS_CODE = "it can load and run code on the server"
RAW_PACKETS = "it forges or shapes raw packets, which this server never does"
CONSOLE_ONLY = "it only changes nmap's console output, which the server does not return"
THIRD_PARTY = "it sends traffic to third parties"
LONG_OPTION_RISKS: dict[str, str] = {
    **dict.fromkeys(("iL", "excludefile", "servicedb", "versiondb", "script-args-file"), READS_FILE),
    **dict.fromkeys(("oA", "oN", "oM", "oG", "oS", "oH", "oX", "append-output", "stylesheet", "webxml",
                     "script-updatedb"), WRITES_FILE),
    "resume": "it reads a saved log and replays its options, and appends to it",
    **dict.fromkeys(("datadir", "script-help"), RUNS_CODE),
    **dict.fromkeys(("sI", "source-port", "data", "data-string", "data-length", "send-eth", "send-ip",
                     "spoof-mac", "badsum", "ttl", "ip-options", "scanflags", "mtu", "adler32", "privileged",
                     "unprivileged"), RAW_PACKETS),
    "iR": "it scans random hosts on the internet",
    **dict.fromkeys(("proxies", "proxy", "dns-servers", "system-dns"), THIRD_PARTY),
    **dict.fromkeys(("verbose", "debug", "packet-trace", "version-trace", "script-trace", "log-errors",
                     "iflist", "help", "version", "noninteractive", "stats-every", "vv", "ff", "rH",
                     "no-stylesheet", "deprecated-xml-osclass", "route-dst", "nsock-engine",
                     "release-memory", "nogcc", "thc"), CONSOLE_ONLY),
}
# nmap 7.93's long options (nmap.cc), for explaining what an abbreviation would have meant.
NMAP_LONG_OPTIONS: tuple[str, ...] = (
    "version", "verbose", "datadir", "servicedb", "versiondb", "debug", "help", "iflist", "release-memory",
    "nogcc", "max-os-tries", "max-parallelism", "min-parallelism", "timing", "max-rtt-timeout",
    "min-rtt-timeout", "initial-rtt-timeout", "excludefile", "exclude", "max-hostgroup", "min-hostgroup",
    "open", "scanflags", "defeat-rst-ratelimit", "host-timeout", "scan-delay", "max-scan-delay",
    "max-retries", "oA", "oN", "oM", "oG", "oS", "oH", "oX", "iL", "iR", "sI", "source-port",
    "randomize-hosts", "nsock-engine", "proxies", "proxy", "osscan-limit", "osscan-guess", "fuzzy",
    "packet-trace", "version-trace", "data", "data-string", "data-length", "send-eth", "send-ip",
    "stylesheet", "no-stylesheet", "webxml", "rH", "vv", "ff", "privileged", "unprivileged", "mtu",
    "append-output", "noninteractive", "spoof-mac", "thc", "badsum", "ttl", "traceroute", "reason",
    "allports", "version-intensity", "version-light", "version-all", "system-dns", "log-errors",
    "deprecated-xml-osclass", "dns-servers", "port-ratio", "top-ports", "script", "script-trace",
    "script-updatedb", "script-args", "script-args-file", "script-help", "noscript", "ip-options",
    "min-rate", "max-rate", "adler32", "stats-every", "disable-arp-ping", "route-dst", "resume",
)
SHORT_OPTION_RISKS: dict[str, str] = {
    "o": WRITES_FILE, "m": WRITES_FILE, "i": READS_FILE,
    "S": RAW_PACKETS, "D": RAW_PACKETS, "e": RAW_PACKETS, "g": RAW_PACKETS, "f": RAW_PACKETS,
    "b": "it bounces scans through an FTP server (a third party)",
    "v": CONSOLE_ONLY, "d": CONSOLE_ONLY, "h": CONSOLE_ONLY, "V": CONSOLE_ONLY,
    "6": "IPv6 is chosen from the targets; give IPv6 addresses",
    "T": "only -T2, -T3 and -T4 are allowed: slower templates stall for hours, -T5 floods and misses ports",
    "s": "of the scan types only -sT, -sn, -sV, -sC (and -sS, -sU with privileges) are allowed",
    "P": "of the host discovery options only -Pn is allowed",
    "R": "it looks up every address in DNS, which is third-party traffic; results use addresses",
    "M": "write it as --max-parallelism",
    "O": "write OS detection as -O alone",
    "A": "it turns on -O and --traceroute, which need privileges; ask for -sV -sC instead",
}


def parse_command(command: str, scripts: ScriptPolicy, *, privileged: bool) -> ParsedCommand:
    """Validate a custom_scan command; raise CommandError naming the first bad token."""
    if len(command) > MAX_COMMAND_LENGTH:
        raise CommandError(f"the command is longer than {MAX_COMMAND_LENGTH} characters")
    try:
        tokens = shlex.split(command, comments=False, posix=True)
    except ValueError as e:
        raise CommandError(f"the command could not be split into words: {e}") from e
    parsed = ParsedCommand()
    seen: dict[str, str] = {}
    # People paste whole command lines: a leading `nmap` is the program, not a target.
    position = 1 if tokens and tokens[0] == "nmap" else 0
    while position < len(tokens):
        token = tokens[position]
        if token == "--":
            parsed.targets.extend(tokens[position + 1:])
            break
        if token.startswith("-"):
            option, value, position = _take_option(tokens, position)
            _check_unique(option, token, seen)
            _apply(parsed, option, value, scripts, privileged=privileged)
        else:
            parsed.targets.append(token)
            position += 1
    if not parsed.targets:
        raise CommandError("the command names no target; add one, such as 192.168.1.10")
    _finish(parsed, scripts, privileged=privileged, seen=seen)
    return parsed


def _take_option(tokens: list[str], position: int) -> tuple[Option, str | None, int]:
    token = tokens[position]
    name, equals, inline = token.partition("=")
    option = ALLOWED_OPTIONS.get(name if name.startswith("--") else token)
    if option is None and token.startswith("-p") and not token.startswith("--") and len(token) > 2:
        option, inline, equals = ALLOWED_OPTIONS["-p"], token[2:], "="
    if option is None or (equals and option.value is None):
        raise CommandError(f"'{token}' is not allowed: {explain_refusal(token)}")
    if option.value is None:
        return option, None, position + 1
    if equals:
        return option, inline, position + 1
    if position + 1 >= len(tokens):
        raise CommandError(f"'{option.name}' needs a value: {option.summary}")
    return option, tokens[position + 1], position + 2


def _check_unique(option: Option, token: str, seen: dict[str, str]) -> None:
    key = option.group or option.name
    if key in seen:
        raise CommandError(f"'{token}' conflicts with '{seen[key]}' given earlier; give one {key} option")
    seen[key] = option.name


def _apply(parsed: ParsedCommand, option: Option, value: str | None, scripts: ScriptPolicy,
           *, privileged: bool) -> None:
    if option.privileged and not privileged:
        raise CommandError(f"'{option.name}' needs raw packets; this server runs nmap without privileges")
    if option.name == "-sC":
        parsed.scripts.append("default")
    elif option.name == "--script":
        parsed.scripts.extend((value or "").split(","))
    elif option.name == "--script-args":
        parsed.options += [option.name, _script_args(scripts, value or "")]
    elif option.name != "-n":
        parsed.options += [option.name] if value is None else [option.name, _value(option, value)]


def _value(option: Option, value: str) -> str:
    assert option.value is not None
    try:
        return option.value(value)
    except ValueError as e:
        raise CommandError(f"'{option.name} {value}': {e}") from e


def _script_args(scripts: ScriptPolicy, value: str) -> str:
    try:
        return scripts.script_args(value)
    except ScriptPolicyError as e:
        raise CommandError(str(e)) from e


def _finish(parsed: ParsedCommand, scripts: ScriptPolicy, *, privileged: bool, seen: dict[str, str]) -> None:
    """Add the server's defaults: an explicit scan type, and one `--script` expression."""
    if "scan type" not in seen:
        parsed.options.insert(0, "-sS" if privileged else "-sT")
    if "--script-args" in parsed.options and not parsed.scripts:
        raise CommandError("'--script-args' needs '--script' or '-sC'")
    if parsed.scripts:
        try:
            parsed.options.append("--script=" + scripts.expression(parsed.scripts))
        except ScriptPolicyError as e:
            raise CommandError(str(e)) from e


def explain_refusal(token: str) -> str:
    """Why a token that looks like an option is refused, in nmap's own terms."""
    name = token.lstrip("-").partition("=")[0]
    meant = _long_option_meant(name)
    if meant is not None:
        if f"--{meant}" in ALLOWED_OPTIONS:
            return f"nmap would read it as --{meant}; write that spelling in full"
        reason = LONG_OPTION_RISKS.get(meant, "it is not in the allowlist (see the tool description)")
        if token.lstrip("-").partition("=")[0] == meant:
            return reason
        return f"nmap accepts unambiguous prefixes and single-dash long options, and this one means --{meant}; {reason}"
    if token.startswith("--") or len(token) < 2:
        return "it is not an nmap option this server knows"
    letter = token[1]
    if letter in SHORT_OPTION_RISKS:
        return SHORT_OPTION_RISKS[letter]
    if len(token) > 2 and token[:3] not in ALLOWED_OPTIONS:
        return "nmap reads it as a cluster of short options; write each allowed option separately"
    return "it is not in the allowlist (see the tool description)"


def _long_option_meant(name: str) -> str | None:
    normalized = name.replace("_", "-")
    if not normalized:
        return None
    if normalized in NMAP_LONG_OPTIONS:
        return normalized
    matches = {option for option in NMAP_LONG_OPTIONS if option.startswith(normalized)}
    return matches.pop() if len(matches) == 1 else None


def describe_allowlist(*, privileged: bool) -> str:
    """The allowlist as published in the custom_scan tool description."""
    lines = []
    for option in ALLOWED_OPTIONS.values():
        if option.privileged and not privileged:
            continue
        spelling = option.name if option.value is None else f"{option.name} VALUE"
        lines.append(f"  {spelling}: {option.summary}")
    return "\n".join(lines)
