"""Rules of engagement: what scans an engagement allows, and when, decided without I/O.

An engagement is a named set of rules a team signs off on: the scope (networks and host
names) and what is excluded from it, the scan kinds, nmap options and script categories it
allows, its time windows in a named time zone, its first and last day, who answers for it,
and the tokens and roles that may scan under it. A scan names one (or its caller's token or
role has a default one); `check_*` below refuse a scan that breaks a rule with an
EngagementRefused whose `code` is stable and whose words say what to change, and, for a time
rule, when scans may run again.

Times: `windows` are wall-clock times in `timezone` (an IANA name), so a window keeps its
local hours across daylight saving changes; a window whose end is not after its start runs
past midnight and belongs to the day it starts on. `starts` and `ends` are dates (the whole
day, in `timezone`) or moments with a zone.
"""

from __future__ import annotations

import ipaddress
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as wall_time
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models import ScanKind
from nmap_options import ALLOWED_OPTIONS
from targets import IPNetwork

Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ENGAGEMENT_NAME = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
# A host name of the scope: exact, or `*.example.com` for every name under example.com.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_SCOPE_NAME = re.compile(rf"^(\*\.)?(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
# Options every scan may carry whatever an engagement's `options` say: the scan type the
# server picks when none is given, and what the server itself adds.
SERVER_OPTIONS = frozenset({"-sT", "-sS", "-n", "--host-timeout", "--exclude", "--max-rate"})
# What nmap can only do with raw packets (nmap_options marks them privileged).
RAW_PACKET_OPTIONS = frozenset(name for name, option in ALLOWED_OPTIONS.items() if option.privileged)
# How far ahead the next window is looked for: every weekly pattern repeats within a week.
_DAYS_AHEAD = 8


class EngagementRefused(PermissionError):
    """A scan breaks a rule of its engagement. `code` is stable; `opens_at` (epoch seconds)
    is when the engagement next allows scans, where waiting helps."""

    def __init__(self, code: str, message: str, opens_at: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.opens_at = opens_at


class Window(BaseModel):
    """Hours in which scans may run, on some days of the week."""

    model_config = ConfigDict(extra="forbid")

    days: list[Day] = Field(default_factory=lambda: list(DAYS), min_length=1)
    start: wall_time
    end: wall_time

    @model_validator(mode="after")
    def _not_empty(self) -> Window:
        if self.start == self.end:
            raise ValueError("a window's start and end are the same time; give different times")
        return self

    def spans(self, day: date, zone: ZoneInfo) -> tuple[float, float] | None:
        """The window's span (epoch seconds) that starts on `day`, if it runs on that day."""
        if DAYS[day.weekday()] not in self.days:
            return None
        end_day = day if self.end > self.start else day + timedelta(days=1)
        return (datetime.combine(day, self.start, zone).timestamp(),
                datetime.combine(end_day, self.end, zone).timestamp())

    def described(self) -> str:
        days = ",".join(self.days) if set(self.days) != set(DAYS) else "daily"
        return f"{days} {self.start:%H:%M}-{self.end:%H:%M}"


class ApprovalRules(BaseModel):
    """Which scans of an engagement wait for a person's yes (approvals.py): any one rule that
    matches is enough, and each that matches is named to the approver."""

    model_config = ConfigDict(extra="forbid")

    # A scan of more addresses than this.
    addresses_over: int | None = Field(default=None, ge=1)
    # Raw-packet scans: SYN, UDP, OS detection, traceroute.
    raw_packets: bool = False
    # Picking scripts of these NSE categories.
    script_categories: list[str] = Field(default_factory=list)
    # Business hours (in the engagement's zone): a scan outside all of them waits for approval.
    business_hours: list[Window] = Field(default_factory=list, max_length=32)
    # The first scan of a network (a /24, or /64 for IPv6) in which the caller's inventory holds no host yet.
    new_networks: bool = False
    # An approval not given within this long is denied.
    expires_after_seconds: int = Field(default=3600, ge=5, le=7 * 86_400)


class EngagementRules(BaseModel):
    """What an engagement allows; see the module docstring."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field(default="", max_length=500)
    # Who answers for the engagement (a person's email or a token's name); shown, never a grant.
    owner: str = Field(default="", max_length=320)
    # Networks (CIDR or single addresses) and host names (exact, or *.example.com).
    scope: list[str] = Field(min_length=1, max_length=256)
    # Networks and addresses never scanned under it: nmap gets them as --exclude.
    exclude: list[str] = Field(default_factory=list, max_length=64)
    kinds: list[ScanKind] = Field(default_factory=lambda: list(ScanKind), min_length=1)
    # The nmap options a custom or typed scan may use (custom_scan's spelling); None: any the
    # server allows.
    options: list[str] | None = None
    # The NSE script categories its scans may pick from; None: the server's.
    script_categories: list[str] | None = None
    timezone: str = "UTC"
    # When scans may run; empty: at any time between starts and ends.
    windows: list[Window] = Field(default_factory=list, max_length=32)
    starts: date | datetime | None = None
    ends: date | datetime | None = None
    # Token names (or people's emails) and roles that may scan under it.
    tokens: list[str] = Field(default_factory=list)
    roles: list[str] = Field(default_factory=list)
    # Which scans need a person's yes first; None: none do.
    approval: ApprovalRules | None = None
    # Probes (addresses x ports) all its scans may send in 24 hours, whoever sends them; None: no budget.
    probes_per_day: int | None = Field(default=None, ge=1)

    @field_validator("scope")
    @classmethod
    def _scope(cls, values: list[str]) -> list[str]:
        for value in values:
            if _network(value) is None and not _SCOPE_NAME.match(value.lower()):
                raise ValueError(f"{value[:64]!r} is neither a network (10.0.0.0/24), an address nor a host name "
                                 "(host.example.com, *.example.com)")
        return [value.lower() for value in values]

    @field_validator("exclude")
    @classmethod
    def _exclude(cls, values: list[str]) -> list[str]:
        for value in values:
            if _network(value) is None:
                raise ValueError(f"{value[:64]!r} is not a network or address; exclusions are given as addresses")
        return values

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"{value[:64]!r} is not an IANA time zone name (Europe/Berlin, America/New_York, UTC)") \
                from e
        return value

    @field_validator("starts", "ends")
    @classmethod
    def _zoned(cls, value: date | datetime | None) -> date | datetime | None:
        if isinstance(value, datetime) and value.tzinfo is None:
            raise ValueError("a moment needs its zone: add Z (UTC) or an offset such as +02:00, or give a date")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> EngagementRules:
        if self.starts is not None and self.ends is not None and self.first_moment() >= self.last_moment():
            raise ValueError("'ends' is not after 'starts'")
        return self

    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def first_moment(self) -> float:
        """When scans may start (epoch seconds): the first moment of `starts`."""
        if self.starts is None:
            return -math.inf
        return _moment(self.starts, self.zone(), next_day=False)

    def last_moment(self) -> float:
        """When scans must have stopped: the end of `ends` (a date's whole day counts)."""
        if self.ends is None:
            return math.inf
        return _moment(self.ends, self.zone(), next_day=True)

    def networks(self) -> tuple[IPNetwork, ...]:
        return tuple(n for n in map(_network, self.scope) if n is not None)

    def names(self) -> tuple[str, ...]:
        return tuple(value for value in self.scope if _network(value) is None)

    def excluded(self) -> tuple[IPNetwork, ...]:
        return tuple(n for n in map(_network, self.exclude) if n is not None)


@dataclass(frozen=True)
class Engagement:
    """An engagement as stored: its name, rules, who made it and how (config or a tool)."""

    name: str
    rules: EngagementRules
    created_by: str
    created_at: float
    source: Literal["config", "tool"]


@dataclass(frozen=True)
class Opening:
    """Whether an engagement allows scans at a moment: if so until when (`closes_at`), if
    not why (`code`) and when it next does (`opens_at`, None when never again)."""

    open: bool
    closes_at: float | None = None
    code: str | None = None
    opens_at: float | None = None


def opening(rules: EngagementRules, now: float) -> Opening:
    """Whether `rules` allow scans at `now` (epoch seconds); see Opening."""
    first, last = rules.first_moment(), rules.last_moment()
    if now >= last:
        return Opening(False, code="engagement_ended")
    spans = [(max(start, first), min(end, last)) for start, end in _spans(rules, now) if end > first and start < last]
    current = next((span for span in spans if span[0] <= now < span[1]), None)
    if current is not None:
        return Opening(True, closes_at=None if math.isinf(current[1]) else current[1])
    upcoming = min((start for start, _ in spans if start > now), default=None)
    return Opening(False, code="engagement_not_started" if now < first else "outside_window", opens_at=upcoming)


def _spans(rules: EngagementRules, now: float) -> Iterator[tuple[float, float]]:
    """The windows' spans from the day before `now` to a week after (one endless span
    without windows)."""
    if not rules.windows:
        yield -math.inf, math.inf
        return
    zone = rules.zone()
    today = datetime.fromtimestamp(now, zone).date()
    horizon = max(today, datetime.fromtimestamp(rules.first_moment(), zone).date()) \
        if not math.isinf(rules.first_moment()) else today
    for offset in range(-1, (horizon - today).days + _DAYS_AHEAD):
        for window in rules.windows:
            if (span := window.spans(today + timedelta(days=offset), zone)) is not None:
                yield span


def check_time(name: str, rules: EngagementRules, now: float) -> Opening:
    """The opening at `now`, or EngagementRefused saying when scans may run again."""
    state = opening(rules, now)
    if state.open:
        return state
    zone = rules.zone()
    if state.code == "engagement_ended":
        raise EngagementRefused(state.code, f"engagement {name!r} ended at {_shown(rules.last_moment(), zone)}; "
                                            "no scan runs under it any more")
    when = "no window opens before it ends" if state.opens_at is None else \
        f"the next window opens {_shown(state.opens_at, zone)} (in {_duration(state.opens_at - now)})"
    if state.code == "engagement_not_started":
        raise EngagementRefused(state.code, f"engagement {name!r} starts {_shown(rules.first_moment(), zone)}; {when}",
                                state.opens_at)
    hours = "; ".join(window.described() for window in rules.windows)
    raise EngagementRefused("outside_window", f"engagement {name!r} allows scans {hours} ({rules.timezone}); {when}",
                            state.opens_at)


def is_member(rules: EngagementRules, owner: str, role: str | None) -> bool:
    """Whether `owner` (a token's name or a person's email, in `role`) may scan under `rules`."""
    return owner in rules.tokens or owner == rules.owner or (role is not None and role in rules.roles)


def time_left(limit_s: int, closes_at: float) -> int:
    """A scan's time limit in whole seconds from now: `limit_s`, or less when its window closes sooner."""
    return max(1, min(limit_s, math.floor(closes_at - time.time())))


def check_member(name: str, rules: EngagementRules, owner: str, role: str | None) -> None:
    """EngagementRefused unless `owner` may scan under the engagement (is_member)."""
    if is_member(rules, owner, role):
        return
    raise EngagementRefused("not_a_member", f"this caller may not scan under engagement {name!r}; "
                                            "its owner or an operator can add its token or role")


def check_kind(name: str, rules: EngagementRules, kind: ScanKind, options: Sequence[str]) -> None:
    """EngagementRefused unless the scan's kind and, for a custom scan, its options and script
    picks are all allowed by the engagement."""
    if kind not in rules.kinds:
        allowed = ", ".join(k.value for k in rules.kinds)
        raise EngagementRefused("not_allowed", f"engagement {name!r} allows only {allowed} scans, not {kind.value}")
    if kind is not ScanKind.CUSTOM:
        return
    if rules.options is not None:
        given = sorted({word for word in options if word.startswith("-") and not word.startswith("--script=")}
                       - SERVER_OPTIONS - set(rules.options))
        if given:
            raise EngagementRefused("not_allowed", f"engagement {name!r} does not allow {', '.join(given)}; "
                                                   f"it allows {', '.join(rules.options) or 'no options'}")
    if rules.script_categories is not None:
        picks = sorted(set(script_picks(options)) - set(rules.script_categories))
        if picks:
            raise EngagementRefused("not_allowed", f"engagement {name!r} allows scripts of the categories "
                                                   f"{', '.join(rules.script_categories) or '(none)'} only, "
                                                   f"not {', '.join(picks)}")


def approval_reasons(rules: EngagementRules, options: Sequence[str], addresses: int, now: float,
                     categories_of: Callable[[str], frozenset[str]], new_networks: Sequence[str]) -> list[str]:
    """Why a scan of the engagement needs a person's yes (empty: it does not): each of its
    approval rules the scan matches, in words an approver reads. `new_networks` are the
    networks of the scan in which the caller's inventory holds no host yet."""
    approval = rules.approval
    if approval is None:
        return []
    reasons = []
    if approval.addresses_over is not None and addresses > approval.addresses_over:
        reasons.append(f"it covers {addresses} addresses, more than {approval.addresses_over}")
    raw = sorted({word for word in options if word in RAW_PACKET_OPTIONS})
    if approval.raw_packets and raw:
        reasons.append(f"it sends raw packets ({', '.join(raw)})")
    asked = {pick: ({pick} | categories_of(pick)) & set(approval.script_categories) for pick in script_picks(options)}
    if risky := sorted(pick for pick, categories in asked.items() if categories):
        reasons.append(f"it runs scripts of the categories {', '.join(approval.script_categories)} "
                       f"({', '.join(risky)})")
    if approval.business_hours and not _inside(approval.business_hours, rules.zone(), now):
        hours = "; ".join(window.described() for window in approval.business_hours)
        reasons.append(f"it runs outside business hours ({hours}, {rules.timezone})")
    if approval.new_networks and new_networks:
        reasons.append(f"it is the first scan of {', '.join(new_networks)}")
    return reasons


def _inside(windows: Sequence[Window], zone: ZoneInfo, now: float) -> bool:
    today = datetime.fromtimestamp(now, zone).date()
    spans = (window.spans(today + timedelta(days=offset), zone) for offset in (-1, 0) for window in windows)
    return any(span[0] <= now < span[1] for span in spans if span is not None)


def script_picks(options: Sequence[str]) -> list[str]:
    """The caller's script picks in the one `--script=` expression the server writes."""
    expression = next((word for word in options if word.startswith("--script=")), None)
    if expression is None:
        return []
    inner = expression.removeprefix("--script=(").split(")", 1)[0]
    return inner.split(" or ")


@dataclass(frozen=True)
class ScopedTarget:
    """One target as checked against a scope: what nmap gets, the name the caller gave (if
    any), and the networks it covers."""

    nmap_target: str
    name: str | None
    networks: tuple[IPNetwork, ...]


def check_scope(name: str, rules: EngagementRules, targets: Iterable[ScopedTarget], *,
                names_unknown: bool = False) -> list[IPNetwork]:
    """EngagementRefused unless every target is in the scope (by its networks, or by the
    host name it was given as) and not wholly excluded; the exclusions that cut into the
    targets, for nmap's --exclude. With `names_unknown` (a worker's check: it has addresses
    only) a scope that lists host names lets any address pass its scope test."""
    networks, names, excluded = rules.networks(), rules.names(), rules.excluded()
    cutting: list[IPNetwork] = []
    for target in targets:
        shown = target.name or target.nmap_target
        by_name = (names_unknown and bool(names)) or (
            target.name is not None and _name_in(target.name.lower(), names))
        if not by_name and not all(_within(n, networks) for n in target.networks):
            raise EngagementRefused("outside_scope", f"{shown!r} is outside the scope of engagement {name!r} "
                                                     f"({', '.join(rules.scope)})")
        for network in target.networks:
            for exclusion in excluded:
                if _within(network, (exclusion,)):
                    raise EngagementRefused("excluded", f"{shown!r} is excluded from engagement {name!r} "
                                                        f"({exclusion})")
                if network.version == exclusion.version and network.overlaps(exclusion) \
                        and exclusion not in cutting:
                    cutting.append(exclusion)
    return cutting


def with_exclusions(options: Sequence[str], cutting: Sequence[IPNetwork]) -> list[str]:
    """`options` with `cutting` added to nmap's --exclude (the caller's own first, if any),
    placed before the --script expression as nmap_options.ParsedCommand.add_default places
    what it adds, so that a worker re-deriving the argv finds the same words."""
    words = list(options)
    if not cutting:
        return words
    added = ",".join(str(network) for network in cutting)
    if "--exclude" in words:
        at = words.index("--exclude") + 1
        words[at] = f"{words[at]},{added}"
        return words
    at = next((i for i, word in enumerate(words) if word.startswith("--script=")), len(words))
    words[at:at] = ["--exclude", added]
    return words


def _name_in(hostname: str, names: Iterable[str]) -> bool:
    return any(hostname == pattern or (pattern.startswith("*.") and hostname.endswith(pattern[1:]))
               for pattern in names)


def _within(network: IPNetwork, outer: Iterable[IPNetwork]) -> bool:
    return any(network.version == o.version and network.subnet_of(o) for o in outer)  # type: ignore[arg-type]


def _network(value: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        return None


def _moment(value: date | datetime, zone: ZoneInfo, *, next_day: bool) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    day = value + timedelta(days=1) if next_day else value
    return datetime.combine(day, wall_time(), zone).timestamp()


def _shown(moment: float, zone: ZoneInfo) -> str:
    return datetime.fromtimestamp(moment, zone).isoformat(timespec="seconds")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{math.ceil(seconds)} s"
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours < 48 else f"{hours // 24} days {hours % 24} h"


def iso_utc(moment: float | None) -> str | None:
    """A moment as ISO 8601 in UTC, for answers; None stays None."""
    return None if moment is None else datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")


class EngagementState(BaseModel):
    """An engagement's name, and whether it allows scans now (if not: why, and when it next
    does; times in UTC)."""

    name: str
    description: str = ""
    open_now: bool
    closes_at: str | None = None
    closed_because: str | None = None
    opens_at: str | None = None


class EngagementInfo(EngagementState):
    """An engagement's rules (windows: days and hours in `timezone`; none: any time), and
    whether it allows scans now."""

    owner: str = ""
    scope: list[str]
    exclude: list[str] = Field(default_factory=list)
    kinds: list[ScanKind]
    options: list[str] | None = None
    script_categories: list[str] | None = None
    timezone: str
    windows: list[str] = Field(default_factory=list)
    starts: str | None = None
    ends: str | None = None


class EngagementList(BaseModel):
    """The engagements the caller may scan under (every one, for an operator)."""

    engagements: list[EngagementState]


def state_of(engagement: Engagement, now: float) -> EngagementState:
    """Whether an engagement allows scans at `now`, as list_engagements shows it."""
    state = opening(engagement.rules, now)
    return EngagementState(name=engagement.name, description=engagement.rules.description, open_now=state.open,
                           closes_at=iso_utc(state.closes_at), closed_because=state.code,
                           opens_at=iso_utc(state.opens_at))


def shown(engagement: Engagement, now: float) -> EngagementInfo:
    """An engagement's rules and state at `now`, as get_engagement shows them."""
    rules = engagement.rules
    zone = rules.zone()
    return EngagementInfo(
        **dict(state_of(engagement, now)), owner=rules.owner, scope=rules.scope, exclude=rules.exclude,
        kinds=rules.kinds, options=rules.options, script_categories=rules.script_categories,
        timezone=rules.timezone, windows=[window.described() for window in rules.windows],
        starts=None if rules.starts is None else _shown(rules.first_moment(), zone),
        ends=None if rules.ends is None else _shown(rules.last_moment(), zone),
    )
