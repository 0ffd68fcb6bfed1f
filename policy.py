"""Per-token policy, built once from Settings: where scans may go, which tools a token may
use, which NSE scripts may run, and which scanner pool a scan is routed to."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from config import DEFAULT_LIMITS, ConfigError, Grant, Limits, Settings
from nse_policy import ScriptPolicy, find_script_db, load_catalog
from oauth import RoleBook
from targets import IPNetwork, TargetPolicy, parse_networks

DEFAULT_POOL = "default"
# The grant keys of roles (ROLE_KEY + the role's name), and of a person whose role this process
# does not know: no tools. Token names hold no '@', so neither is ever a token's.
ROLE_KEY = "@role:"
NOBODY = "@nobody"
# Tools only a grant with manage_engagements may see and call: rules of engagement are an
# operator's, never set by the agent they bind.
MANAGER_TOOLS = frozenset({"create_engagement"})
# Tools only a grant with approve_scans may see and call.
APPROVER_TOOLS = frozenset({"list_approvals", "decide_approval"})
# Every route besides the tools themselves to what the tools show (tasks, results, the
# inventory, schedules, pools), with the tools whose data it shows or whose act it does: a token
# restricted by `tools` may use a route only when it may use every one of them, so that no route
# reaches more than its tools would. Each front door checks its routes here, by these names
# (tests/test_scopes.py checks that every route the server offers is listed).
ROUTE_TOOLS: Mapping[str, frozenset[str]] = {
    # MCP Tasks (mcp_tasks.py). A scan answers with a task handle only to a token that may read the
    # task through it; any other gets the tool's own answer, as a client without the extension does.
    "tasks/handle": frozenset({"get_task_status", "get_task_result"}),
    "tasks/get": frozenset({"get_task_status"}),
    "tasks/get (completed)": frozenset({"get_task_status", "get_task_result"}),
    "tasks/update": frozenset({"get_task_status"}),
    "tasks/cancel": frozenset({"cancel_task"}),
    # Resources (resources.py), by URI template.
    "nmap://tasks/{task_id}": frozenset({"get_task_result"}),
    "nmap://help/custom_scan": frozenset(),  # the allowlist's documentation: nobody's data
    # The operator page (dashboard.py): each section of the overview, and each answer under /ui/api/.
    "/ui#pools": frozenset({"list_workers"}),
    "/ui#running": frozenset({"list_tasks"}),
    "/ui#recent": frozenset({"list_tasks"}),
    "/ui#diff": frozenset({"list_tasks", "diff_scans"}),
    "/ui#schedules": frozenset({"list_schedules"}),
    "/ui#inventory": frozenset({"find_hosts"}),
    "/ui#approvals": frozenset({"list_approvals"}),
    "/ui/api/overview": frozenset(),  # only the sections the token may see, each checked above
    "/ui/api/tasks/{task_id}": frozenset({"get_task_result"}),
    "/ui/api/diff": frozenset({"diff_scans"}),
    "/ui/api/hosts": frozenset({"find_hosts"}),
    "/ui/api/approvals/{task_id}": frozenset({"decide_approval"}),  # POST: approve or deny
}


class NoPool(ValueError):
    """No scanner pool reaches all of a scan's addresses; the message says how to split it."""


class Forbidden(PermissionError):
    """The caller's token may not use a tool, or a route that stands for tools it may not use."""


class Policy:
    """What each token, and each role people sign in to, may do; without limits of their own
    they get the server's."""

    def __init__(self, settings: Settings, nmap_path: str, people: RoleBook | None = None) -> None:
        self.scripts = script_policy(settings, nmap_path)
        self._base = TargetPolicy(
            allowed=parse_networks(settings.allowed_targets),
            denied=parse_networks(settings.denied_targets),
            allow_loopback=settings.allow_loopback,
            max_addresses=settings.max_addresses_per_scan,
            max_targets=settings.max_targets_per_scan,
        )
        # Grants by key: a token's name, or ROLE_KEY and a role's name (token names hold no '@').
        grants: dict[str, Grant] = {**settings.tokens,
                                    **{ROLE_KEY + name: role for name, role in settings.roles.items()}}
        self._targets = {
            key: replace(self._base, resolve_names=spec.resolves_names(), token_allowed=(
                None if spec.allowed_targets is None else parse_networks(spec.allowed_targets)))
            for key, spec in grants.items()
        }
        self.pools = {name: parse_networks(networks) for name, networks in settings.pools.items()}
        self._limits = settings.limits
        self._token_limits = {key: spec.limits for key, spec in grants.items()}
        self.tool_scopes: dict[str, frozenset[str] | None] = dict.fromkeys(settings.named_tokens())
        self.tool_scopes[NOBODY] = frozenset()
        # A person whose role this process does not know reaches no address either.
        self._targets[NOBODY] = replace(self._base, token_allowed=(), resolve_names=False)
        for key, spec in grants.items():
            self.tool_scopes[key] = None if spec.tools is None else frozenset(spec.tools)
        self._admins = {ROLE_KEY + name for name, role in settings.roles.items() if role.ui_admin}
        self._team_roles = frozenset(name for name, role in settings.roles.items() if role.team_tasks)
        self._admins.update(settings.ui_admin_tokens)
        self.require_engagement = settings.require_engagement
        self._default_engagements = {key: spec.engagement for key, spec in grants.items() if spec.engagement}
        self._managers = frozenset(key for key, spec in grants.items() if spec.manage_engagements)
        self._approvers = frozenset(key for key, spec in grants.items() if spec.approve_scans)
        # People who signed in (by email) and their role, as this process last learnt it.
        self.people = people or RoleBook()
        self._token_names = sorted(settings.named_tokens())

    def owners(self) -> list[str]:
        """Every token's name, and every person this process knows the role of, sorted."""
        return sorted([*self._token_names, *self.people.people()])

    def _key(self, owner: str) -> str:
        """The grant of `owner`: their token's, their role's, or, for a person not signed in
        to this process, nothing at all."""
        if "@" not in owner:
            return owner
        role = self.people.role_of(owner)
        return NOBODY if role is None else ROLE_KEY + role

    def team(self, owner: str) -> str | None:
        """The role whose people's tasks `owner` sees (their own role, where it has team_tasks)."""
        role = self.people.role_of(owner) if "@" in owner else None
        return role if role in self._team_roles else None

    def ui_admin(self, owner: str) -> bool:
        """Whether `owner` sees every caller's tasks on the operator page."""
        return self._key(owner) in self._admins

    def may(self, owner: str, route: str) -> bool:
        """Whether `owner` may use `route`: a tool, or a route of ROUTE_TOOLS (all its tools)."""
        key = self._key(owner)
        tools = ROUTE_TOOLS.get(route, frozenset({route}))
        # A route that stands for a manager's or an approver's tool needs that grant as the tool does.
        if (tools & MANAGER_TOOLS and key not in self._managers) or (tools & APPROVER_TOOLS
                                                                     and key not in self._approvers):
            return False
        scope = self.tool_scopes.get(key)
        return scope is None or tools <= scope

    def role(self, owner: str) -> str | None:
        """The role of a person who signed in (as this process last learnt it); None for a token."""
        return self.people.role_of(owner) if "@" in owner else None

    def default_engagement(self, owner: str) -> str | None:
        """The engagement `owner`'s scans run under when a call names none."""
        return self._default_engagements.get(self._key(owner))

    def require(self, owner: str, route: str) -> None:
        """Forbidden, naming the tools it lacks, unless `owner` may use `route`."""
        if self.may(owner, route):
            return
        if route not in ROUTE_TOOLS:
            raise Forbidden(f"this token may not use {route}")
        lacking = sorted(ROUTE_TOOLS[route] - (self.tool_scopes.get(self._key(owner)) or frozenset()))
        raise Forbidden(f"{route} needs the tool{'s' * (len(lacking) > 1)} {', '.join(lacking)}, "
                        "which this token may not use")

    def limits(self, owner: str) -> Limits:
        """The caller's limits: its token's own, else the server's, else the defaults."""
        layers = [self._token_limits.get(self._key(owner), Limits()), self._limits, DEFAULT_LIMITS]
        return Limits(**{key: next(getattr(layer, key) for layer in layers if getattr(layer, key) is not None)
                         for key in Limits.model_fields})

    def max_rate(self, owner: str) -> int:
        """The packets per second each nmap run of the caller may send (its limits' max_rate,
        which DEFAULT_LIMITS always sets)."""
        rate = self.limits(owner).max_rate
        assert rate is not None
        return rate

    def targets(self, owner: str) -> TargetPolicy:
        """The target policy of the caller's scans: the server's, narrowed for its token."""
        return self._targets.get(self._key(owner), self._base)

    def route(self, targets: list[tuple[str, tuple[IPNetwork, ...]]], requested: str | None) -> str:
        """The pool for a scan of `targets` (each target with the networks it covers): the
        requested one if it reaches them all, else the pool whose networks hold them all most
        narrowly. Without configured pools everything goes to `default`."""
        if not self.pools:
            if requested not in (None, DEFAULT_POOL):
                raise NoPool(f"there is no pool {requested!r}: this server has only the pool '{DEFAULT_POOL}'")
            return DEFAULT_POOL
        if requested is not None and requested not in self.pools:
            raise NoPool(f"there is no pool {requested!r}; the pools are {', '.join(self.pools)}")
        candidates = [requested] if requested else list(self.pools)
        fits = {name: self._span(name, targets) for name in candidates}
        reaching = {name: span for name, span in fits.items() if span is not None}
        if reaching:
            return min(reaching, key=lambda name: (reaching[name], name))
        raise NoPool(self._why_not(targets, requested))

    def _span(self, pool: str, targets: list[tuple[str, tuple[IPNetwork, ...]]]) -> int | None:
        """Addresses of the narrowest of the pool's networks holding each target, summed;
        None when some target is outside all of them."""
        total = 0
        for _, networks in targets:
            for network in networks:
                holding = [n.num_addresses for n in self.pools[pool]
                           if n.version == network.version and network.subnet_of(n)]  # type: ignore[arg-type]
                if not holding:
                    return None
                total += min(holding)
        return total

    def _why_not(self, targets: list[tuple[str, tuple[IPNetwork, ...]]], requested: str | None) -> str:
        homes = {target: [p for p in self.pools if self._span(p, [(target, nets)]) is not None]
                 for target, nets in targets}
        if requested:
            outside = [target for target, pools in homes.items() if requested not in pools]
            return f"pool {requested!r} does not reach {', '.join(outside)}; its networks are " + ", ".join(
                str(n) for n in self.pools[requested])
        nowhere = [target for target, pools in homes.items() if not pools]
        if nowhere:
            listing = "; ".join(f"{p}: {', '.join(str(n) for n in nets)}" for p, nets in self.pools.items())
            return f"no scanner pool reaches {', '.join(nowhere)} (pools: {listing})"
        split = "; ".join(f"{target} ({' or '.join(pools)})" for target, pools in homes.items())
        return f"the targets are reached by different pools; scan them in separate calls: {split}"


def script_policy(settings: Settings, nmap_path: str) -> ScriptPolicy:
    """The NSE policy, over the script database of the nmap that will run."""
    script_db = Path(settings.script_db_path) if settings.script_db_path else find_script_db(
        nmap_path, os.environ.get("NMAPDIR"))
    if script_db is None:
        raise ConfigError(f"cannot find nmap's script database (scripts/script.db) for {nmap_path} in NMAPDIR, "
                          "beside it or in /usr/share/nmap: set script_db_path")
    try:
        catalog = load_catalog(script_db)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read nmap's script database {script_db}: set script_db_path ({e})") from e
    return ScriptPolicy(
        catalog=catalog,
        allowed_categories=tuple(settings.script_categories),
        operator_denied=tuple(settings.denied_scripts),
        args_allowed={key: re.compile(pattern) for key, pattern in settings.script_args_allowed.items()},
    )
