"""custom_scan's allowlist parser and the NSE policy, without starting nmap scans."""

from __future__ import annotations

import asyncio
import fnmatch
import re
import shlex
import shutil
import subprocess
from functools import partial

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nmap_options import (
    ALLOWED_OPTIONS,
    CommandError,
    describe_allowlist,
    parse_command,
)
from nse_policy import (
    BUILTIN_DENIED_SCRIPTS,
    EXCLUDED_CATEGORIES,
    ScriptPolicy,
    ScriptPolicyError,
    find_script_db,
    load_catalog,
)
from resolver import HostResolver
from scanner import XML_OUTPUT, build_argv
from targets import (
    TargetError,
    TargetPolicy,
    parse_literal,
    parse_networks,
    resolve_targets,
)
from tests.commands import HOSTILE_COMMANDS, LEGITIMATE_COMMANDS, PRIVILEGED_COMMANDS

NMAP = shutil.which("nmap") or "/usr/bin/nmap"
CATALOG = load_catalog(find_script_db(NMAP, None))  # type: ignore[arg-type]
SCRIPTS = ScriptPolicy(catalog=CATALOG)
POLICY = TargetPolicy(allowed=parse_networks(["0.0.0.0/0", "::/0"]), allow_loopback=True)
LOOKUP = partial(HostResolver(1, 5.0).addresses, "tests")
PORTS = {"tmp": "/tmp/nmap-mcp-test", "p1": "10001", "p2": "10002", "banner": "10003"}


def accept(command: str, *, privileged: bool = False) -> list[str]:
    """The full pipeline a custom_scan call goes through before nmap, returning the argv."""
    parsed = parse_command(command, SCRIPTS, privileged=privileged)
    resolved = asyncio.run(resolve_targets(parsed.targets, POLICY, LOOKUP))
    return build_argv(NMAP, parsed.options, resolved.nmap_targets, ipv6=resolved.ipv6, privileged=privileged)


def test_there_are_at_least_150_hostile_commands_and_20_legitimate_ones() -> None:
    assert len(set(HOSTILE_COMMANDS)) == len(HOSTILE_COMMANDS) >= 150
    assert len(LEGITIMATE_COMMANDS) + len(PRIVILEGED_COMMANDS) >= 20


@pytest.mark.parametrize("command", HOSTILE_COMMANDS)
def test_hostile_commands_are_refused(command: str) -> None:
    with pytest.raises((CommandError, TargetError)):
        accept(command.format(**PORTS))


@pytest.mark.parametrize(("command", "_open"), LEGITIMATE_COMMANDS)
def test_legitimate_commands_become_canonical_argv(command: str, _open: list[str]) -> None:
    argv = accept(command.format(**PORTS))
    separator = argv.index("--")
    assert argv[0] == NMAP and argv[separator + 1:] and "--unprivileged" in argv
    assert argv[1] in ("-sT", "-sn")


@pytest.mark.parametrize(("command", "_open"), PRIVILEGED_COMMANDS)
def test_raw_packet_options_need_the_privileged_setting(command: str, _open: list[str]) -> None:
    formatted = command.format(**PORTS)
    argv = accept(formatted, privileged=True)
    assert "--privileged" in argv and "--unprivileged" not in argv
    if any(o in formatted for o in ("-sS", "-sU", "-O", "--traceroute")):
        with pytest.raises(CommandError, match="needs raw packets"):
            accept(formatted)


@pytest.mark.parametrize(("command", "message"), [
    ("--ser /etc/passwd 127.0.0.1",
     "'--ser' is not allowed: nmap accepts unambiguous prefixes and single-dash long options, "
     "and this one means --servicedb; it reads a local file"),
    ("-Fo/tmp/x 127.0.0.1", "'-Fo/tmp/x' is not allowed: nmap reads it as a cluster of short options"),
    ("-oN /tmp/x 127.0.0.1", "'-oN' is not allowed: it writes files"),
    ("-iL /etc/passwd", "'-iL' is not allowed: it reads a local file"),
    ("--datad /tmp 127.0.0.1", "this one means --datadir; it can load and run code"),
    ("-T5 127.0.0.1", "only -T2, -T3 and -T4 are allowed"),
    ("--top 10 127.0.0.1", "nmap would read it as --top-ports; write that spelling in full"),
    ("-sS 127.0.0.1", "'-sS' needs raw packets"),
    ("-p 70000 127.0.0.1", "'-p 70000': port 70000 is out of range 1-65535"),
    ("--host-timeout 5 127.0.0.1", "must be a time with a unit"),
    ("--script jdwp-info 127.0.0.1", "script 'jdwp-info' is denied"),
    ("--script ssh-brute 127.0.0.1", "script 'ssh-brute' is in excluded categories: brute, intrusive"),
    ("--script /tmp/x.nse 127.0.0.1", "without paths"),
    ("-sC --script-args newtargets=1 127.0.0.1", "script argument 'newtargets' is not allowed"),
    ("-p 80 -p 443 127.0.0.1", "'-p' conflicts with '-p' given earlier"),
    ("-sV", "names no target"),
])
def test_refusals_name_the_token_and_the_reason(command: str, message: str) -> None:
    with pytest.raises(CommandError) as caught:
        parse_command(command, SCRIPTS, privileged=False)
    assert message in str(caught.value)


def test_the_server_adds_the_scan_type_and_keeps_canonical_spellings() -> None:
    parsed = parse_command("--top-ports=20 --max-retries=02 --min-rate 100.5 --host-timeout 1.5m 127.0.0.1",
                           SCRIPTS, privileged=False)
    assert parsed.options == ["-sT", "--top-ports", "20", "--max-retries", "2", "--min-rate", "100.5",
                              "--host-timeout", "90000ms"]
    assert parse_command("-p80,443 127.0.0.1", SCRIPTS, privileged=False).options == ["-sT", "-p", "80,443"]
    assert parse_command("-p - 127.0.0.1", SCRIPTS, privileged=True).options == ["-sS", "-p", "1-65535"]


def test_a_pasted_command_line_may_start_with_nmap() -> None:
    assert parse_command("nmap -p 22 127.0.0.1", SCRIPTS, privileged=False) == parse_command(
        "-p 22 127.0.0.1", SCRIPTS, privileged=False)
    with pytest.raises(CommandError, match="names no target"):
        parse_command("nmap", SCRIPTS, privileged=False)
    assert parse_command("-p 22 127.0.0.1 nmap", SCRIPTS, privileged=False).targets == ["127.0.0.1", "nmap"]


def test_script_categories_and_names_are_case_insensitive() -> None:
    upper = parse_command("--script DEFAULT,Safe,BANNER -p 22 127.0.0.1", SCRIPTS, privileged=False)
    lower = parse_command("--script default,safe,banner -p 22 127.0.0.1", SCRIPTS, privileged=False)
    assert upper.options == lower.options and "(banner or default or safe)" in " ".join(upper.options)
    with pytest.raises(CommandError, match="'intrusive' is not allowed"):
        parse_command("--script INTRUSIVE 127.0.0.1", SCRIPTS, privileged=False)


def test_allowlisted_script_arguments_with_a_matching_value() -> None:
    policy = ScriptPolicy(catalog=CATALOG, args_allowed={"http.useragent": re.compile(r"[A-Za-z0-9 ./-]{1,40}")})
    parsed = parse_command("--script http-title --script-args http.useragent=Scanner/1.0 127.0.0.1", policy,
                           privileged=False)
    assert parsed.options[-3:-1] == ["--script-args", "http.useragent=Scanner/1.0"]
    with pytest.raises(CommandError, match="does not match"):
        parse_command("-sC --script-args http.useragent=a{b} 127.0.0.1", policy, privileged=False)


def scripts_selected_by(expression: str) -> set[str]:
    """Ask nmap itself which scripts an expression selects."""
    out = subprocess.run([NMAP, "--script-help", expression], capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines() if re.fullmatch(r"[a-z0-9][a-z0-9_-]*", line)}


@pytest.mark.parametrize("picks", [["default"], ["default", "safe", "discovery", "version"], ["banner", "http-title"]])
def test_the_emitted_expression_selects_no_excluded_or_denied_script(picks: list[str]) -> None:
    selected = scripts_selected_by(SCRIPTS.expression(picks))
    assert selected
    for name in selected:
        assert not CATALOG[name] & set(EXCLUDED_CATEGORIES), name
        assert not any(fnmatch.fnmatchcase(name, pattern) for pattern in BUILTIN_DENIED_SCRIPTS), name
    assert "jdwp-info" not in selected and "http-open-proxy" not in selected


def test_every_denied_pattern_names_installed_scripts() -> None:
    for pattern in BUILTIN_DENIED_SCRIPTS:
        assert any(fnmatch.fnmatchcase(name, pattern) for name in CATALOG), pattern


def test_configured_categories_and_denials_apply() -> None:
    narrow = ScriptPolicy(catalog=CATALOG, allowed_categories=("version",), operator_denied=("banner",))
    with pytest.raises(ScriptPolicyError, match="not allowed; allowed: version"):
        narrow.expression(["default"])
    with pytest.raises(ScriptPolicyError, match="denied"):
        narrow.expression(["banner"])


def test_the_published_allowlist_matches_what_is_enforced() -> None:
    unprivileged = describe_allowlist(privileged=False)
    for name, option in ALLOWED_OPTIONS.items():
        assert (f"  {name}" in unprivileged) is not option.privileged
    assert "-sS" in describe_allowlist(privileged=True)


# ---- property: whatever is accepted, nmap gets only allowlisted options and checked targets

VALID_VALUES = {
    "-p": ["80", "22,80", "1-1024", "-", "T:80,U:53", "8000-"], "--top-ports": ["10", "100"],
    "--exclude-ports": ["22", "1-10"], "--version-intensity": ["0", "9"], "--max-retries": ["0", "3"],
    "--host-timeout": ["30s", "5m"], "--script-timeout": ["10s"], "--min-rate": ["10", "100.5"],
    "--max-rate": ["1000"], "--min-parallelism": ["1"], "--max-parallelism": ["10"], "--min-hostgroup": ["1"],
    "--max-hostgroup": ["8"], "--initial-rtt-timeout": ["100ms"], "--max-rtt-timeout": ["1s"],
    "--scan-delay": ["10ms"], "--max-scan-delay": ["100ms"], "--exclude": ["127.0.0.5", "127.0.0.0/30"],
    "--script": ["default", "banner,http-title", "safe,version"], "--script-args": ["a=b"],
}
JUNK = st.text(alphabet=st.sampled_from(list("-=,;/.:aoNiLsSpT0123456789 $`'\"")), min_size=1, max_size=12)


@st.composite
def option_phrase(draw: st.DrawFn) -> str:
    """An allowlisted option, usually with a valid value, sometimes with junk or an odd form."""
    name = draw(st.sampled_from(sorted(ALLOWED_OPTIONS)))
    if ALLOWED_OPTIONS[name].value is None:
        return name
    value = draw(st.one_of(st.sampled_from(VALID_VALUES[name]), JUNK) if draw(st.booleans()) else
                 st.sampled_from(VALID_VALUES[name]))
    joiner = draw(st.sampled_from([" ", "="])) if name.startswith("--") else " "
    return f"{name}{joiner}{shlex.quote(value)}"


TARGETS = st.sampled_from(["127.0.0.1", "127.0.0.2", "127.0.0.0/30", "127.0.0.1-3", "::1", "localhost",
                           "0177.0.0.1", "169.254.169.254", "-oN/x", "10.0.0.0/8"])
COMMAND = st.tuples(
    st.lists(option_phrase(), max_size=5), st.lists(TARGETS, min_size=1, max_size=3), st.lists(JUNK, max_size=1),
).flatmap(lambda parts: st.permutations(parts[0] + parts[1] + parts[2])).map(" ".join)
SERVER_FLAGS = {"-n", "-v", "-oX", "--unprivileged", "--privileged", "-6"}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command=COMMAND, privileged=st.booleans())
def test_accepted_commands_emit_only_allowlisted_options_and_validated_targets(command: str, privileged: bool) -> None:
    try:
        parsed = parse_command(command, SCRIPTS, privileged=privileged)
        # No DNS from tests: only literal targets and localhost (/etc/hosts) get resolved.
        assume(all(target == "localhost" or parse_literal(target) is not None for target in parsed.targets))
        resolved = asyncio.run(resolve_targets(parsed.targets, POLICY, LOOKUP))
    except (CommandError, TargetError):
        return
    argv = build_argv(NMAP, parsed.options, resolved.nmap_targets, ipv6=resolved.ipv6, privileged=privileged)
    separator = argv.index("--")
    assert argv[separator + 1:] == list(resolved.nmap_targets)
    for target in resolved.nmap_targets:
        assert not target.startswith("-") and re.fullmatch(r"[0-9a-f.:/-]+", target)
    position = 1
    while position < separator:
        token = argv[position]
        if token.startswith("--script="):
            assert token.startswith("--script=(") and "and not (intrusive or exploit" in token
        elif token in ("-oX", "--stats-every"):
            assert argv[position + 1] in (XML_OUTPUT, "2s")
            position += 1
        elif token not in SERVER_FLAGS:
            option = ALLOWED_OPTIONS[token]
            assert privileged or not option.privileged
            if option.value is not None:
                position += 1
                assert not argv[position].startswith("-") or token in ("--exclude-ports",)
        position += 1
