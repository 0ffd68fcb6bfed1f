"""What a worker runs: a task's argv, checked against the worker's own configuration.

The task database is not a trust boundary of its own: in a fleet it is shared by the API
and by workers in other network zones, so whoever can write one row of `tasks` would
otherwise choose the command every scanner host runs. A worker therefore re-derives the
argv the API would have built for the task's options and targets, with its own nmap, option
allowlist, NSE policy, target policy and pool, through the same functions the API uses
(nmap_options.parse_command, targets.resolve_targets, scanner.build_argv), and runs the
task only when the stored argv is that argv word for word. It runs its own nmap_path, never
the program the row names: that word is the one part allowed to differ (an API and a worker
may have nmap installed at different paths).
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass

from approval_store import ApprovalStore
from engagement_store import EngagementNotFound, EngagementStore
from engagements import (
    EngagementRefused,
    EngagementRules,
    ScopedTarget,
    approval_reasons,
    check_kind,
    check_member,
    check_scope,
    check_time,
    opening,
    time_left,
)
from impact import max_rate_of
from models import TaskRecord
from nmap_options import CommandError, parse_command
from policy import Policy
from scanner import build_argv
from targets import IPAddress, IPNetwork, TargetError, resolve_targets

# The one `--script` value the server writes (nse_policy.ScriptPolicy.expression): the caller's
# picks come first; the rest is rebuilt from this worker's own policy and compared.
_SCRIPT_EXPRESSION = re.compile(r"--script=\((?P<picks>[a-z0-9_-]+(?: or [a-z0-9_-]+)*)\) and .*")
# What refusals quote of a stored word: enough to recognise it, never a whole hostile row.
QUOTE_LIMIT = 80


class TaskRefused(ValueError):
    """A task's argv is not one this worker would have built; the message says why."""


@dataclass(frozen=True)
class ArgvCheck:
    """This worker's configuration, as far as it decides what may run."""

    nmap_path: str
    policy: Policy
    privileged: bool
    # The networks of this worker's pool; None when the server has no pools (one pool reaches all).
    pool_networks: tuple[IPNetwork, ...] | None
    # Where the engagements a task names, and their approvals, are read from (None: a check
    # without engagements).
    engagements: EngagementStore | None = None
    approvals: ApprovalStore | None = None

    @classmethod
    def of_worker(cls, nmap_path: str, policy: Policy, *, privileged: bool, pool: str,
                  engagements: EngagementStore | None = None, approvals: ApprovalStore | None = None) -> ArgvCheck:
        """The check of a worker in `pool` (one missing from configured pools reaches nothing)."""
        return cls(nmap_path, policy, privileged, policy.pools.get(pool, ()) if policy.pools else None, engagements,
                   approvals)

    async def argv_to_run(self, record: TaskRecord) -> list[str]:
        """The argv to run for `record`: its stored argv, with this worker's nmap, once every
        word has been checked; TaskRefused otherwise."""
        options, targets = _split(record.argv)
        command = shlex.join([*_as_command(options), "--", *targets])
        try:
            parsed = parse_command(command, self.policy.scripts, privileged=self.privileged)
        except CommandError as e:
            raise TaskRefused(f"its options are not allowed here: {e}") from e
        try:
            # A person's role as the shared people table has it now (a token's is in the config).
            await self.policy.people.refresh(record.owner)
            resolved = await resolve_targets(targets, self.policy.targets(record.owner), _never_looked_up)
        except TargetError as e:
            raise TaskRefused(f"its targets are not allowed here: {e}") from e
        self._check_pool(resolved.networks)
        await self._check_engagement(record, resolved.nmap_targets, resolved.networks, parsed.options)
        expected = build_argv(self.nmap_path, parsed.options, resolved.nmap_targets, ipv6=resolved.ipv6,
                              privileged=self.privileged)
        if expected[1:] != record.argv[1:]:
            raise TaskRefused(_first_difference(record.argv, expected))
        self._check_rate(record)
        return expected

    async def time_limit(self, record: TaskRecord) -> int:
        """The task's time limit from now: its own, cut to end when its engagement's window
        closes (a task that waited in the queue gets what is left of the window, not what was
        left when it was submitted)."""
        if record.engagement is None or self.engagements is None:
            return record.time_limit
        try:
            closes_at = opening((await self.engagements.get(record.engagement)).rules, time.time()).closes_at
        except EngagementNotFound:
            return record.time_limit
        return record.time_limit if closes_at is None else time_left(record.time_limit, closes_at)

    async def _check_engagement(self, record: TaskRecord, targets: Sequence[str],
                                networks: Sequence[Sequence[IPNetwork]], options: Sequence[str]) -> None:
        """The task's engagement, read again, allows it now: its owner, the time (no scan
        starts after its window closed), its kind and options, its addresses and exclusions
        (nmap must be told to skip each exclusion cutting into them); and a server that
        requires engagements runs no task without one."""
        if record.engagement is None or self.engagements is None:
            if self.policy.require_engagement:
                raise TaskRefused("it names no engagement, and every scan here runs under one")
            return
        try:
            engagement = await self.engagements.get(record.engagement)
            name, rules = engagement.name, engagement.rules
            check_member(name, rules, record.owner, self.policy.role(record.owner))
            check_time(name, rules, time.time())
            check_kind(name, rules, record.kind, options)
            cutting = check_scope(name, rules, [ScopedTarget(target, None, tuple(covered))
                                                for target, covered in zip(targets, networks, strict=True)],
                                  names_unknown=True)
        except (EngagementRefused, EngagementNotFound) as e:
            raise TaskRefused(f"its engagement refuses it: {e}") from e
        told = set(options[options.index("--exclude") + 1].split(",")) if "--exclude" in options else set()
        if missing := [str(network) for network in cutting if str(network) not in told]:
            raise TaskRefused(f"its argv does not exclude {', '.join(missing)}, which its engagement excludes")
        await self._check_approval(record, rules, options, sum(n.num_addresses for c in networks for n in c))

    async def _check_approval(self, record: TaskRecord, rules: EngagementRules, options: Sequence[str],
                              addresses: int) -> None:
        """A task whose engagement wants a person's yes for it runs only once one was given: its
        approval, if it has one, must be approved, and a task the rules would hold (all but the
        first-scan-of-a-network rule, which the inventory decided at submission) must have one."""
        if self.approvals is None or rules.approval is None:
            return
        approval = await self.approvals.of_task(record.parent_id or record.id)
        if approval is not None:
            if approval.decision != "approved":
                raise TaskRefused(f"its approval is {approval.decision or 'still pending'}")
            return
        catalog = self.policy.scripts.catalog
        if reasons := approval_reasons(rules, options, addresses, time.time(),
                                       lambda pick: catalog.get(pick, frozenset()), []):
            raise TaskRefused(f"its engagement wants a person's yes first ({'; '.join(reasons)}), and none was given")

    def _check_rate(self, record: TaskRecord) -> None:
        """Every argv the server builds carries --max-rate, at most its owner's cap."""
        rate, cap = max_rate_of(record.argv), self.policy.max_rate(record.owner)
        if rate is None:
            raise TaskRefused(f"its argv has no --max-rate; its owner's scans send at most {cap} packets per second")
        if rate > cap:
            raise TaskRefused(f"its --max-rate {rate:g} is above its owner's cap of {cap} packets per second")

    def _check_pool(self, networks: Sequence[Sequence[IPNetwork]]) -> None:
        if self.pool_networks is None:
            return
        for network in (n for covered in networks for n in covered):
            if not any(network.version == home.version and network.subnet_of(home)  # type: ignore[arg-type]
                       for home in self.pool_networks):
                raise TaskRefused(f"its target {network} is outside this worker's pool")


async def _never_looked_up(name: str) -> tuple[IPAddress, ...]:
    """Targets are stored resolved: a worker looks up no name (the lookup resolve_targets makes
    for a target that passed every other check as a hostname)."""
    raise TaskRefused(f"its target {_quoted(name)} is not an address or network")


def _split(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The caller's options (before the server's own output flags, which start at `-n`) and
    the targets (after `--`)."""
    if "--" not in argv:
        raise TaskRefused("its argv has no '--' before its targets")
    end = list(argv).index("--")
    head = list(argv[1:end])
    if "-n" not in head:
        raise TaskRefused("its argv lacks the server's own flags")
    return head[: head.index("-n")], list(argv[end + 1:])


def _as_command(options: Sequence[str]) -> list[str]:
    """The options as custom_scan would take them: a stored `--script=EXPRESSION` becomes the
    picks it was built from."""
    return [_script_picks(word) if word.startswith("--script=") else word for word in options]


def _script_picks(word: str) -> str:
    match = _SCRIPT_EXPRESSION.fullmatch(word)
    if match is None:
        raise TaskRefused(f"its script selection {_quoted(word)} is not one the server writes")
    return "--script=" + ",".join(match.group("picks").split(" or "))


def _first_difference(stored: Sequence[str], expected: Sequence[str]) -> str:
    at = next((i for i, (a, b) in enumerate(zip(stored, expected, strict=False)) if i and a != b),
              min(len(stored), len(expected)))
    found = _quoted(stored[at]) if at < len(stored) else "its end"
    wanted = _quoted(expected[at]) if at < len(expected) else "the end"
    return f"its argv is not the one this server builds for its options and targets: word {at} is {found}, " \
           f"not {wanted}"


def _quoted(word: str) -> str:
    return repr(word if len(word) <= QUOTE_LIMIT else word[:QUOTE_LIMIT] + "...")
