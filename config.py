"""Service configuration: one `Settings` object, loaded once by `server.main()`.

Sources, highest priority first: environment variables (`NMAP_MCP_` prefix), then the
JSON file (`config.json` unless `-c PATH`), then the defaults below. Nothing here runs at
import time; `load_settings` is the only entry point.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from api_keys import ApiKey, secret_sha256
from engagements import ENGAGEMENT_NAME, EngagementRules
from nse_policy import DEFAULT_CATEGORIES, EXCLUDED_CATEGORIES
from targets import parse_networks
from webhooks import NEVER_REACHED, Rules, WebhookRefused, check_prefixes, endpoint, in_deny_list

DEFAULT_CONFIG_PATH = Path("config.json")
ENV_PREFIX = "NMAP_MCP_"
MIN_SECRET_LENGTH = 32
# The secrets config.example.json showed before it showed digests: they never work as real ones.
PLACEHOLDER_SECRETS = frozenset({
    "REPLACE-ME-run-python-server.py---init-for-a-real-secret",
    "REPLACE-ME-too-every-token-needs-its-own-secret",
})
# The digests config.example.json shows, and those of the placeholder secrets: never a real key.
PLACEHOLDER_DIGESTS = frozenset({"0" * 64, "1" * 64} | {secret_sha256(secret) for secret in PLACEHOLDER_SECRETS})
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# A server that finds no config at its first start writes it, and the new token's secret in
# this file beside it (write_first_config).
INITIAL_TOKEN_FILE = "initial-token"
# Where scans may go on a fresh install: private networks only. The public internet and
# loopback must be allowed explicitly; the built-in deny list in targets.py always wins.
PRIVATE_NETWORKS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
# Pool, worker-less caller and similar names: short, no spaces or punctuation beyond _.-
POOL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# The name a seed-style single `token` is known by in task ownership and audit records.
DEFAULT_TOKEN_NAME = "default"
# Prints a fresh secret wherever it is pasted: the standard library of any python3 will do.
FRESH_SECRET_COMMAND = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


class ConfigError(Exception):
    """The configuration file or environment is unusable; the message says what to fix."""


class ConfigMissing(ConfigError):
    """The configuration file does not exist (the command line says how to create one)."""


class Limits(BaseModel):
    """How much one token may scan, enforced in the database so that it holds across
    processes. Per token, a key left out (or null) is the server's value."""

    model_config = ConfigDict(extra="forbid")

    scans_per_minute: int | None = Field(default=None, ge=1, le=100_000)
    # Scans queued or running at once.
    concurrent_scans: int | None = Field(default=None, ge=1, le=100_000)
    # Addresses covered by the scans of one day (24 hours back from now).
    addresses_per_day: int | None = Field(default=None, ge=1, le=100_000_000)
    # Scans forced past a recent result (rescan=true) in one hour.
    rescans_per_hour: int | None = Field(default=None, ge=1, le=100_000)
    # Schedules (schedule_scan) the token has at once: each runs scans for ever.
    schedules: int | None = Field(default=None, ge=1, le=100_000)
    # Probes (addresses x ports per address, impact.probes) of the scans of one day.
    probes_per_day: int | None = Field(default=None, ge=1, le=10**13)
    # Packets per second each of its nmap runs may send (--max-rate, which every argv carries).
    max_rate: int | None = Field(default=None, ge=1, le=100_000)


# Generous: they stop a runaway agent, not a busy team. A billion probes a day is 59 full scans
# of a /24 (16.8 million probes each), 15,000 of one host or 10 million quick scans of one host:
# a team's day, while an agent running full scans back to back at scans_per_minute passes it
# within hours. 50,000 packets per second never slows a built-in scan on a LAN, where nmap's own
# congestion control at -T4 stays far below it (all ports of a LAN host in 5-20 s, at most some
# 13,000 a second); only loopback is faster (all ports in 0.43 s uncapped, 1.34 s at the cap,
# measured with nmap 7.93), and one nmap run stays under about 30 Mbit/s of connection attempts.
DEFAULT_LIMITS = Limits(scans_per_minute=60, concurrent_scans=20, addresses_per_day=65_536, rescans_per_hour=120,
                        schedules=50, probes_per_day=1_000_000_000, max_rate=50_000)


class Grant(BaseModel):
    """What a caller may do: an API token's, or a role's that people sign in to (OAuth)."""

    model_config = ConfigDict(extra="forbid")

    # None: every tool; else only these tools are listed and callable with this token.
    tools: list[str] | None = None
    # None: the server's target policy alone; else also within these networks.
    allowed_targets: list[str] | None = None
    # Whether hostnames given by this token are looked up (DNS). None: yes, unless the token
    # has its own allowed_targets: a token held to some networks gives addresses, and the
    # names it could pick would otherwise reach the resolver, a channel past its networks.
    resolve_names: bool | None = None
    # This token's own limits, key by key; the server's `limits` fill the rest.
    limits: Limits = Field(default_factory=Limits)
    # The engagement its scans run under when a call names none (engagements.py).
    engagement: str | None = Field(default=None, pattern=ENGAGEMENT_NAME)
    # Whether it may create engagements (create_engagement): an operator's, never an agent's.
    manage_engagements: bool = False
    # Whether it may approve or deny other callers' scans that wait for approval (approvals.py).
    approve_scans: bool = False

    @field_validator("allowed_targets")
    @classmethod
    def _networks(cls, values: list[str] | None) -> list[str] | None:
        if values is not None:
            parse_networks(values)
        return values

    def resolves_names(self) -> bool:
        """`resolve_names`, or its default: only tokens without allowed_targets of their own."""
        return self.allowed_targets is None if self.resolve_names is None else self.resolve_names


class TokenConfig(Grant):
    """One named API token: its secret's SHA-256 (what --init and --hash-token write), or the
    secret itself (the older form, still accepted); exactly one of the two."""

    secret: SecretStr | None = None
    secret_sha256: str | None = None
    # When the token stops working: an ISO 8601 date (from its first moment, 00:00 UTC) or a
    # date and time with its zone. None: never.
    expires_at: datetime | None = None

    @field_validator("secret_sha256")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        if value is not None and not SHA256_HEX.fullmatch(value := value.lower()):
            raise ValueError("must be 64 hexadecimal digits, the SHA-256 of the secret (--hash-token prints it)")
        return value

    @field_validator("expires_at", mode="before")
    @classmethod
    def _moment(cls, value: object) -> object:
        return value if value is None or isinstance(value, datetime) else expiry_moment(value)

    @model_validator(mode="after")
    def _one_secret(self) -> TokenConfig:
        if (self.secret is None) == (self.secret_sha256 is None):
            raise ValueError("give a token either `secret_sha256` (--hash-token prints it) or `secret`, "
                             "exactly one of them")
        return self

    def sha256(self) -> str:
        """The SHA-256 of the token's secret, given or computed from a plain `secret`."""
        if self.secret_sha256 is not None:
            return self.secret_sha256
        assert self.secret is not None
        return secret_sha256(self.secret.get_secret_value())

    def api_key(self) -> ApiKey:
        """The token as the verifier checks it (api_keys.py)."""
        return ApiKey(bytes.fromhex(self.sha256()), self.expires_at)


class RoleConfig(Grant):
    """What people who sign in (OAuth) may do, by the identity provider's claims about them:
    a person is in the first role, in the order of the config, that one of their `groups` or
    their email (`emails`, or its domain in `email_domains`) matches. Nobody else gets in."""

    groups: list[str] = Field(default_factory=list)
    emails: list[str] = Field(default_factory=list)
    email_domains: list[str] = Field(default_factory=list)
    # Whether the role's people see every caller's tasks on the operator page (/ui).
    ui_admin: bool = False
    # Whether the role's people see each other's tasks (a team sees its scans): list_tasks,
    # get_task_status, get_task_result, diff_scans and /ui show them; only the owner cancels.
    team_tasks: bool = False

    @field_validator("emails", "email_domains")
    @classmethod
    def _lower(cls, values: list[str]) -> list[str]:
        return [value.lower() for value in values]


class OAuthConfig(BaseModel):
    """People sign in with the team's OpenID provider (OAuth 2.1 for MCP clients, oauth.py)."""

    model_config = ConfigDict(extra="forbid")

    # The provider's issuer: its discovery document is ISSUER/.well-known/openid-configuration.
    issuer: str = Field(pattern=r"^https?://[^\s?#]+$")
    # This server's client at the provider; its redirect URI there is BASE_URL/auth/callback.
    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    # This server's public URL (scheme, host, port): what browsers and MCP clients reach.
    base_url: str = Field(pattern=r"^https?://[^/\s?#]+$")
    # Asked of the provider at sign-in; the claims the roles read must come with them.
    scopes: list[str] = Field(default_factory=lambda: ["openid", "email", "profile"])
    # The claim holding a person's groups (Keycloak: groups; Entra ID: groups or roles).
    groups_claim: str = "groups"
    # Where the proxy keeps client registrations and token mappings, encrypted.
    state_dir: str = "oauth-state"
    # Show a consent page before sending a person to the provider: it tells them which client
    # asks, and stops a page from signing them in to a client they never chose.
    consent: bool = True


class Settings(BaseSettings):
    """Every tunable of the service, with the defaults a fresh install gets."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=3004, ge=1, le=65535)
    path: str = Field(default="/mcp", pattern=r"^/[A-Za-z0-9/_-]*$")
    token: SecretStr | None = None
    tokens: dict[str, TokenConfig] = Field(default_factory=dict)
    allow_query_token: bool = True
    # People sign in (OAuth 2.1) beside the API tokens; None: tokens only.
    oauth: OAuthConfig | None = None
    # What people who sign in may do, by role (RoleConfig); checked in this order.
    roles: dict[str, RoleConfig] = Field(default_factory=dict)
    # A client address whose requests carried more refused tokens than this within the window
    # gets 429 with Retry-After for its next refused ones; valid tokens keep working (throttle.py).
    failed_token_limit: int = Field(default=10, ge=1, le=10_000)
    failed_token_window_seconds: float = Field(default=60.0, gt=0, le=86_400)
    allowed_hosts: list[str] = Field(default_factory=list)
    allowed_origins: list[str] = Field(default_factory=list)
    # Browser origins (https://app.example) allowed to call the endpoint with CORS; each is
    # also accepted by the Origin check. None by default.
    cors_origins: list[str] = Field(default_factory=list)
    # Token names whose holders see every token's tasks on the operator page (/ui); everyone
    # else sees only their own. None by default.
    ui_admin_tokens: list[str] = Field(default_factory=list)
    sync_timeout: int = Field(default=30, ge=5, le=600)
    # No call waits longer than this for its scan, whatever its `timeout` asks: common clients
    # (the TypeScript SDK, Cherry Studio, Codex CLI) give up on a call after 60 s, and a call
    # that answers first hands over the task id of the scan that goes on.
    max_call_wait_seconds: int = Field(default=50, ge=1, le=600)
    max_concurrent_tasks: int = Field(default=10, ge=1, le=256)
    max_queued_tasks: int = Field(default=100, ge=1, le=100_000)
    limits: Limits = Field(default_factory=DEFAULT_LIMITS.model_copy)
    max_scan_seconds: int = Field(default=3600, ge=10, le=86_400)
    # full_scan's second phase (version detection on the open ports) stops after this long;
    # the ports from its first phase are kept either way.
    version_detection_seconds: int = Field(default=300, ge=5, le=86_400)
    shutdown_grace_seconds: float = Field(default=5.0, ge=0, le=300)
    # A worker renews the lease of each scan it runs; a task whose lease expired (its worker
    # died or lost the database) is resolved by any process.
    lease_seconds: float = Field(default=30.0, ge=1, le=3600)
    # A database call that has not answered after this long answers `unavailable` (and
    # PostgreSQL cancels a statement that ran this long): a frozen database is not a hang.
    database_timeout_seconds: float = Field(default=5.0, ge=0.5, le=300)
    worker_name: str | None = Field(default=None, min_length=1, max_length=128)
    pool: str = Field(default="default", pattern=POOL_NAME)
    # Scanner pools and the networks each reaches: a scan goes to the pool whose networks
    # hold all its addresses. Empty: every scan goes to the pool `default`.
    pools: dict[str, list[str]] = Field(default_factory=dict)
    # The largest shard: when a scan is split (its pool has two or more live workers, or its
    # recent runs waited on a slow network), no shard holds more addresses than this. Each also
    # holds at least nmap's efficient host group for its scan (sharding.efficient_group, at
    # most 4,096; on a slow network sharding.least_group), unless this is smaller. 4,096: nmap's
    # largest group (a ping scan's), a /20, as large as any efficient group, so the default
    # bounds only what one dead worker's shard makes run again.
    shard_addresses: int = Field(default=4096, ge=1, le=65_536)
    # Hosts a running scan holds parsed (about 7 kB each) before it sorts and compresses them
    # (findings.HostSpool): what bounds a worker's memory per scan, whatever the scan's size.
    scan_buffer_hosts: int = Field(default=1024, ge=64, le=65_536)
    # Over stdio no token travels: the local client acts as this caller (its tasks' owner).
    stdio_caller: str = Field(default="local", pattern=POOL_NAME)
    allowed_targets: list[str] = Field(default_factory=lambda: list(PRIVATE_NETWORKS))
    denied_targets: list[str] = Field(default_factory=list)
    allow_loopback: bool = False
    max_addresses_per_scan: int = Field(default=256, ge=1, le=65_536)
    max_targets_per_scan: int = Field(default=16, ge=1, le=256)
    resolve_timeout: float = Field(default=5.0, gt=0, le=60)
    privileged: bool = False
    custom_host_timeout: int = Field(default=900, ge=1, le=3600)
    script_categories: list[str] = Field(default_factory=lambda: list(DEFAULT_CATEGORIES))
    denied_scripts: list[str] = Field(default_factory=list)
    script_args_allowed: dict[str, str] = Field(default_factory=dict)
    script_db_path: str = ""
    audit_log: str = "audit.jsonl"
    # When the audit log cannot be written: false refuses scans, true runs them unaudited.
    audit_fail_open: bool = False
    # No tool answer takes more bytes on the wire (both copies of it, see views.wire_size).
    max_answer_bytes: int = Field(default=60_000, ge=8_000, le=10_000_000)
    result_freshness_seconds: int = Field(default=300, ge=0, le=86_400)
    # Finished tasks and inventory rows older than this are deleted; 0 keeps everything.
    retention_days: int = Field(default=30, ge=0, le=36_500)
    # Rules of engagement by name (engagements.py), written to the database at start; more
    # can be made with create_engagement.
    engagements: dict[str, EngagementRules] = Field(default_factory=dict)
    # Every scan must run under an engagement (named by the call, or its token's default).
    require_engagement: bool = False
    # No schedule (schedule_scan) runs more often than this.
    min_schedule_seconds: int = Field(default=60, ge=1, le=86_400)
    # URL prefixes a schedule's webhook may point at (scheme, host, port and path prefix, e.g.
    # https://hooks.example.com/nmap). Empty: no webhooks, so none can reach internal services.
    webhook_allowed_urls: list[str] = Field(default_factory=list)
    # Exact addresses a webhook may reach although they are not public (loopback, private,
    # shared): an internal receiver's, e.g. 10.0.5.20. Every other non-public address is refused,
    # also when an allowed host name resolves to it (webhooks.py).
    webhook_allowed_addresses: list[str] = Field(default_factory=list)
    db_path: str = "nmap_tasks.db"
    database_url: str | None = None
    nmap_path: str = "nmap"
    # Who nmap runs as when the server runs as root (sandbox.py): None is `nobody`; `root`
    # keeps nmap as root. A server that is not root runs nmap as itself. A user that does not
    # exist stops the server at start-up.
    nmap_user: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    # text: one human-readable line per record; json: one JSON object per line (docs/metrics.md).
    log_format: Literal["text", "json"] = "text"
    # None: /metrics is off (404); else it needs `Authorization: Bearer <metrics_token>`. No MCP
    # token opens it.
    metrics_token: SecretStr | None = None
    # A `--worker` has no MCP listener; with this set it serves /metrics and /healthz on host:metrics_port.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],  # noqa: ARG003 - pydantic-settings calls it with these names
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The JSON file arrives as init kwargs; listing env first lets it override the file.
        return (env_settings, init_settings)

    @field_validator("allowed_targets", "denied_targets")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        parse_networks(values)
        return values

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("sqlite:///", "postgresql://", "postgresql+psycopg://")):
            raise ValueError("database_url must be a sqlite:///PATH file or a postgresql:// database")
        return url

    @field_validator("pools")
    @classmethod
    def _pool_networks(cls, pools: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, networks in pools.items():
            if not re.match(POOL_NAME, name):
                raise ValueError(f"pool name {name[:64]!r} may hold only letters, digits, '_', '.' and '-'")
            if not networks:
                raise ValueError(f"pool {name!r} lists no networks")
            parse_networks(networks)
        return pools

    @field_validator("engagements")
    @classmethod
    def _engagement_names(cls, values: dict[str, EngagementRules]) -> dict[str, EngagementRules]:
        for name in values:
            if not re.match(ENGAGEMENT_NAME, name):
                raise ValueError(f"engagement name {name[:64]!r} may hold only lower-case letters, digits, "
                                 "'_', '.' and '-'")
        return values

    @field_validator("webhook_allowed_urls")
    @classmethod
    def _webhook_prefixes(cls, values: list[str]) -> list[str]:
        for value in values:
            endpoint(value)
        return values

    @field_validator("webhook_allowed_addresses")
    @classmethod
    def _webhook_addresses(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                address = ipaddress.ip_address(value)
            except ValueError as e:
                raise ValueError(f"{value[:64]!r} is not one IP address; list each receiver's exact address") from e
            if in_deny_list(address):
                raise ValueError(f"{address} is an address {NEVER_REACHED}")
        return values

    @field_validator("script_categories")
    @classmethod
    def _safe_categories(cls, values: list[str]) -> list[str]:
        if excluded := sorted(set(values) & set(EXCLUDED_CATEGORIES)):
            raise ValueError(f"categories {', '.join(excluded)} are always excluded")
        return values

    @field_validator("script_args_allowed")
    @classmethod
    def _patterns(cls, values: dict[str, str]) -> dict[str, str]:
        for key, pattern in values.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"the pattern for '{key}' is not a regular expression ({e})") from e
        return values

    def named_tokens(self) -> dict[str, TokenConfig]:
        """Token name -> token, the single seed-style `token` included as 'default'."""
        named = dict(self.tokens)
        if self.token is not None:
            named.setdefault(DEFAULT_TOKEN_NAME, TokenConfig(secret=self.token))
        return named

    def api_keys(self) -> dict[str, ApiKey]:
        """Token name -> what the verifier checks: the secret's digest and the expiry."""
        return {name: spec.api_key() for name, spec in self.named_tokens().items()}

    def webhook_rules(self) -> Rules:
        """Where schedules' webhooks may go (webhooks.py)."""
        return Rules(tuple(self.webhook_allowed_urls),
                     frozenset(ipaddress.ip_address(value) for value in self.webhook_allowed_addresses))

    def effective_database_url(self) -> str:
        """`database_url` when set, else a SQLite file at `db_path`."""
        return self.database_url or f"sqlite:///{Path(self.db_path).expanduser()}"


def load_settings(path: Path = DEFAULT_CONFIG_PATH) -> Settings:
    """Read `path` (JSON), apply `NMAP_MCP_*` overrides, validate, and require a token."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigMissing(f"{path}: no such file") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    try:
        settings = Settings(**data)
    except ValidationError as e:
        raise ConfigError(f"{path}: {describe_validation_error(e)}") from e
    if not settings.named_tokens():
        raise ConfigError(f"{path}: no token configured; set `token` or `tokens`")
    problems = secret_problems(settings.named_tokens()) + metrics_token_problems(settings) + webhook_problems(settings)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    if problems := sign_in_problems(settings):
        raise ConfigError(f"{path}: " + "; ".join(problems))
    if unknown := sorted(set(settings.ui_admin_tokens) - set(settings.named_tokens())):
        raise ConfigError(f"{path}: 'ui_admin_tokens': no token is named {', '.join(repr(n) for n in unknown)}; "
                          "list names from `tokens`")
    return anchored(settings, path.parent)


def anchored(settings: Settings, directory: Path) -> Settings:
    """Relative file paths of the config mean: beside the config file (a local client that
    starts the server over stdio may run it from any working directory)."""
    files = {key: getattr(settings, key) for key in ("db_path", "audit_log", "script_db_path")}
    update: dict[str, Any] = {key: str(directory / value) for key, value in files.items()
                              if value and not Path(value).expanduser().is_absolute()}
    oauth = settings.oauth
    if oauth is not None and not Path(oauth.state_dir).expanduser().is_absolute():
        update["oauth"] = oauth.model_copy(update={"state_dir": str(directory / oauth.state_dir)})
    return settings.model_copy(update=update)


def sign_in_problems(settings: Settings) -> list[str]:
    """Why `oauth` and `roles` do not fit together: people sign in only to roles, a role that
    matches nobody, and token names that could be taken for a person's (an email address)."""
    problems = [f"token name {name!r} holds '@': people who sign in are known by their email address"
                for name in settings.named_tokens() if "@" in name]
    if settings.oauth is None:
        return problems + (["`roles` are for people who sign in: configure `oauth` too"] if settings.roles else [])
    if not settings.roles:
        problems.append("`oauth` without `roles` lets nobody in: map groups or email domains to a role")
    problems += [f"role {name!r} names no groups, emails or email_domains, so nobody is in it"
                 for name, role in settings.roles.items() if not (role.groups or role.emails or role.email_domains)]
    return problems


def secret_problems(named: dict[str, TokenConfig]) -> list[str]:
    """Why secrets are unfit, naming their tokens (never the secrets): a placeholder from
    config.example.json, a plain secret too short, or one secret (one digest) shared by several
    tokens."""
    fresh = "--hash-token --new prints a fresh secret with its secret_sha256, and --init writes a new config with one"
    problems = []
    for name, spec in named.items():
        if spec.sha256() in PLACEHOLDER_DIGESTS:
            problems.append(f"token '{name}' still has the placeholder secret of config.example.json; {fresh}")
        elif spec.secret is not None and (length := len(spec.secret.get_secret_value())) < MIN_SECRET_LENGTH:
            problems.append(f"token '{name}': its secret has {length} characters, fewer than "
                            f"{MIN_SECRET_LENGTH}; {fresh}")
    owners: dict[str, list[str]] = {}
    for name, spec in named.items():
        owners.setdefault(spec.sha256(), []).append(name)
    problems += [f"tokens {', '.join(repr(n) for n in names)} share one secret; give each its own"
                 for names in owners.values() if len(names) > 1]
    return problems


def expiry_moment(value: object) -> datetime:
    """`expires_at` as written in the config: an ISO 8601 date (its first moment in UTC), or a
    date and time with its zone; a time without a zone would mean another moment on each machine."""
    example = "an ISO 8601 date (2027-03-31) or a date and time with its zone (2027-03-31T18:00:00Z)"
    if not isinstance(value, str):
        # Not TypeError: pydantic reports a ValueError as a problem of the key, and raises any other.
        raise ValueError(f"must be a string: {example}")
    with contextlib.suppress(ValueError):
        return datetime.combine(date.fromisoformat(value), time(), tzinfo=UTC)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as e:
        raise ValueError(f"must be {example}") from e
    if moment.tzinfo is None:
        raise ValueError("needs its zone: add Z (UTC) or an offset such as +02:00")
    return moment


def metrics_token_problems(settings: Settings) -> list[str]:
    """Why `metrics_token` is unfit (never saying it): too short, or an MCP token's secret,
    which would let one secret open both /metrics and the MCP endpoint."""
    if settings.metrics_token is None:
        return []
    secret = settings.metrics_token.get_secret_value()
    if len(secret) < MIN_SECRET_LENGTH:
        return [(f"metrics_token has {len(secret)} characters, fewer than {MIN_SECRET_LENGTH}; "
                 f"`{FRESH_SECRET_COMMAND}` prints a fresh one")]
    return [f"metrics_token is the secret of token '{name}'; give /metrics a secret of its own"
            for name, token in settings.named_tokens().items() if token.sha256() == secret_sha256(secret)]


def webhook_problems(settings: Settings) -> list[str]:
    """Why a webhook_allowed_urls prefix could never be sent to: its host is written as an
    address a webhook may not reach (not listed in webhook_allowed_addresses, or never)."""
    try:
        check_prefixes(settings.webhook_rules())
    except WebhookRefused as e:
        return [f"'webhook_allowed_urls': {e}"]
    return []


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, naming the key; never echoes the offending value."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        else:
            lines.append(f"'{key}': {item['msg']}")
    return "; ".join(lines)


def new_secret() -> str:
    """A fresh random token secret (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def default_config_document(secret: str) -> dict[str, Any]:
    """The JSON a new install starts from: every default, plus one token with `secret`'s digest."""
    defaults = Settings.model_construct().model_dump(mode="json", exclude={"token", "tokens"})
    # Loopback is off unless configured; a new install configures it so that its first
    # check (test_client.py scans 127.0.0.1) works. The README says when to turn it off.
    return {**defaults, "allow_loopback": True,
            "tokens": {DEFAULT_TOKEN_NAME: {"secret_sha256": secret_sha256(secret)}}}


def write_new_config(path: Path, *, force: bool = False) -> str:
    """Write a config with a fresh token and return its secret, which the file does not hold
    (only its SHA-256); refuse to overwrite unless `force`.

    Missing directories are created (`--init -c ~/.config/nmap-mcp.json` on a machine without
    ~/.config).
    """
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists; pass --force to overwrite it")
    secret = new_secret()
    write_private(path, json.dumps(default_config_document(secret), indent=2) + "\n")
    return secret


def write_first_config(path: Path) -> Path:
    """What a server that finds no config at its first start writes: the config, and beside it
    INITIAL_TOKEN_FILE holding the new token's secret alone; returns that file's path. Not
    printed, as --init does: the first start of a systemd unit or a container has no terminal,
    and its output goes to a log, where no secret may be."""
    secret = write_new_config(path)
    token_file = path.with_name(INITIAL_TOKEN_FILE)
    write_private(token_file, secret + "\n")
    return token_file


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600 (the config's digests, the secret of
    INITIAL_TOKEN_FILE and the webhooks' settings are nobody else's), creating directories."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        raise ConfigError(f"cannot create {e.filename}: {e.strerror}") from e
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, 0o600)
