"""Per-token policy, built once from Settings: where scans may go, which tools a token may
use, and which NSE scripts may run."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from config import ConfigError, Settings
from nse_policy import BUILTIN_DENIED_SCRIPTS, ScriptPolicy, default_script_db, load_catalog
from targets import TargetPolicy, parse_networks


class Policy:
    """What each token may do; tokens without their own limits get the server's."""

    def __init__(self, settings: Settings, nmap_path: str) -> None:
        self.scripts = script_policy(settings, nmap_path)
        self._base = TargetPolicy(
            allowed=parse_networks(settings.allowed_targets),
            denied=parse_networks(settings.denied_targets),
            allow_loopback=settings.allow_loopback,
            max_addresses=settings.max_addresses_per_scan,
            max_targets=settings.max_targets_per_scan,
            resolve_timeout=settings.resolve_timeout,
        )
        self._targets = {
            name: replace(self._base, token_allowed=parse_networks(spec.allowed_targets))
            for name, spec in settings.tokens.items()
            if spec.allowed_targets is not None
        }
        self.tool_scopes: dict[str, frozenset[str] | None] = dict.fromkeys(settings.named_secrets())
        for name, spec in settings.tokens.items():
            if spec.tools is not None:
                self.tool_scopes[name] = frozenset(spec.tools)

    def targets(self, owner: str) -> TargetPolicy:
        """The target policy of the caller's scans: the server's, narrowed for its token."""
        return self._targets.get(owner, self._base)


def script_policy(settings: Settings, nmap_path: str) -> ScriptPolicy:
    """The NSE policy, over the script database of the nmap that will run."""
    script_db = Path(settings.script_db_path) if settings.script_db_path else default_script_db(nmap_path)
    try:
        catalog = load_catalog(script_db)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read nmap's script database {script_db}: set script_db_path ({e})") from e
    return ScriptPolicy(
        catalog=catalog,
        allowed_categories=tuple(settings.script_categories),
        denied=(*BUILTIN_DENIED_SCRIPTS, *settings.denied_scripts),
        args_allowed={key: re.compile(pattern) for key, pattern in settings.script_args_allowed.items()},
    )
