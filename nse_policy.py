"""Which NSE scripts a caller may run, as one `--script` expression built by the server.

NSE categories are not a safety boundary (`jdwp-info` is "safe" yet injects code into the
target; "safe" holds scripts that contact third parties), so a caller may only name
allowed categories and scripts that exist in the installed script database, and the
server always appends the exclusions below. Script arguments are refused unless their
key is allowlisted by the operator with a value pattern.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_CATEGORIES = ("intrusive", "exploit", "dos", "brute", "malware", "fuzzer", "external", "broadcast")
DEFAULT_CATEGORIES = ("default", "safe", "discovery", "version")
# Scripts denied whatever their categories say: code injection, file writes and reads,
# target injection, and third-party contact hidden in default or safe.
BUILTIN_DENIED_SCRIPTS = (
    "jdwp-*", "http-fetch", "url-snarf", "mysql-audit", "targets-*", "http-open-proxy",
    "socks-open-proxy", "http-useragent-tester", "dns-zone-transfer", "ip-geolocation-*",
    "whois-*", "asn-query", "hostmap-*", "http-robtex-*", "http-virustotal", "http-xssed",
    "mtrace", "traceroute-geolocation", "tor-consensus-checker", "omp2-enum-targets",
    "http-google-malware", "http-icloud-*", "shodan-api", "vulners", "http-comments-displayer",
)
_ENTRY = re.compile(r'filename = "([^"]+)\.nse", categories = \{([^}]*)\}')
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_ARG_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ARG_VALUE_FORBIDDEN = set(",{}\"'=\\")


class ScriptPolicyError(ValueError):
    """A script selection or script argument was refused; the message says why."""


@dataclass(frozen=True)
class ScriptPolicy:
    """The installed scripts and what callers may select from them."""

    catalog: Mapping[str, frozenset[str]]
    allowed_categories: tuple[str, ...] = DEFAULT_CATEGORIES
    denied: tuple[str, ...] = BUILTIN_DENIED_SCRIPTS
    args_allowed: Mapping[str, re.Pattern[str]] | None = None

    def expression(self, requested: Iterable[str]) -> str:
        """The one `--script` value nmap receives for the caller's comma-separated picks
        (case does not matter: script names and categories are lower case)."""
        picks = sorted({pick.lower() for pick in requested})
        for pick in picks:
            self._check_pick(pick)
        excluded = [*EXCLUDED_CATEGORIES, *self.denied]
        return (
            f"({' or '.join(picks)}) and ({' or '.join(self.allowed_categories)}) "
            f"and not ({' or '.join(excluded)})"
        )

    def _check_pick(self, pick: str) -> None:
        if not _NAME.match(pick):
            raise ScriptPolicyError(
                f"script selection '{pick}' is not allowed: name scripts or categories, "
                "without paths, wildcards or boolean expressions"
            )
        if pick in self.allowed_categories:
            return
        if pick in EXCLUDED_CATEGORIES or pick in ("all", *self._known_categories()):
            raise ScriptPolicyError(
                f"script category '{pick}' is not allowed; allowed: {', '.join(self.allowed_categories)}"
            )
        categories = self.catalog.get(pick)
        if categories is None:
            raise ScriptPolicyError(f"script '{pick}' does not exist in the installed script database")
        if any(fnmatch.fnmatchcase(pick, pattern) for pattern in self.denied):
            raise ScriptPolicyError(f"script '{pick}' is denied by the server's script policy")
        if bad := sorted(categories & set(EXCLUDED_CATEGORIES)):
            raise ScriptPolicyError(f"script '{pick}' is in excluded categories: {', '.join(bad)}")
        if not categories & set(self.allowed_categories):
            raise ScriptPolicyError(
                f"script '{pick}' is in none of the allowed categories ({', '.join(self.allowed_categories)})"
            )

    def _known_categories(self) -> set[str]:
        return {category for categories in self.catalog.values() for category in categories}

    def script_args(self, text: str) -> str:
        """Validate `k=v,k2=v2` against the allowlist; return it in canonical form."""
        allowed = self.args_allowed or {}
        pairs = []
        for item in text.split(","):
            key, sep, value = item.partition("=")
            if not sep or not _ARG_KEY.match(key):
                raise ScriptPolicyError(f"script argument '{item}' is not of the form key=value")
            pattern = allowed.get(key)
            if pattern is None:
                raise ScriptPolicyError(f"script argument '{key}' is not allowed by this server")
            if set(value) & _ARG_VALUE_FORBIDDEN or not pattern.fullmatch(value):
                raise ScriptPolicyError(f"the value of script argument '{key}' does not match the allowed pattern")
            pairs.append(f"{key}={value}")
        return ",".join(pairs)


def load_catalog(script_db: Path) -> dict[str, frozenset[str]]:
    """Script name -> categories, from nmap's `script.db`."""
    catalog = {}
    for match in _ENTRY.finditer(script_db.read_text(encoding="utf-8")):
        categories = frozenset(re.findall(r'"([^"]+)"', match.group(2)))
        catalog[match.group(1)] = categories
    if not catalog:
        raise ValueError(f"{script_db} lists no scripts")
    return catalog


def find_script_db(nmap_path: str, nmapdir: str | None) -> Path | None:
    """nmap's script.db, looked for where nmap itself looks for its data: `NMAPDIR`, beside
    the binary and in its ../share/nmap, then the usual share directories. `nmap_path` may be
    a wrapper script anywhere; then the share directories find the real one's data."""
    binary = Path(nmap_path).resolve().parent
    candidates = [Path(nmapdir)] if nmapdir else []
    candidates += [binary, binary.parent / "share" / "nmap", Path("/usr/local/share/nmap"), Path("/usr/share/nmap")]
    return next((c / "scripts" / "script.db" for c in candidates if (c / "scripts" / "script.db").is_file()), None)
