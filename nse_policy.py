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
_CODE = "it injects and runs Java code on the target"
_WRITES = "it writes files on the server"
_ADDS_TARGETS = "it adds targets that nmap then scans, past the target policy"
_THIRD_PARTY_SERVICE = "it asks a third-party service on the internet about the target"
_RESOLVER = ("it asks the server's DNS resolver itself, which nmap's -n does not stop: the names it looks up "
             "leave the server past the target policy")
_ANY_REDIRECT = "it follows the target's HTTP redirects to any host, so the target chooses whom the server contacts"
# Scripts denied whatever their categories say, each with the reason its refusal gives:
# code injection, file writes and reads, target injection, and contact with anything but
# the target (DNS lookups of their own, third-party services) hidden in default, safe,
# discovery or version. Found by reading the scripts of those categories for dns.query,
# nmap.resolve, get_dns_servers, fixed host names and redirect rules that allow any host.
BUILTIN_DENIED_SCRIPTS: Mapping[str, str] = {
    "jdwp-*": _CODE,
    "http-fetch": _WRITES,
    "url-snarf": _WRITES,
    "mysql-audit": "it reads a local file named by a script argument",
    "targets-*": _ADDS_TARGETS,
    "omp2-enum-targets": _ADDS_TARGETS,
    "http-open-proxy": "it makes the target fetch pages from third-party web sites",
    "socks-open-proxy": "it makes the target connect to third-party web sites",
    "http-useragent-tester": _ANY_REDIRECT,
    "http-mobileversion-checker": _ANY_REDIRECT,
    "http-security-headers": _ANY_REDIRECT,
    "http-affiliate-id": "it resolves and fetches the amzn.to links it finds on the target's pages",
    "http-comments-displayer": "it crawls the target's whole web site and returns every comment found",
    "dns-zone-transfer": "it asks a name server named by its arguments for a whole zone",
    "dns-client-subnet-scan":
        "it sends queries for a domain of the caller's choice to a name server named by its arguments",
    "fcrdns": _RESOLVER + " (a PTR query for the target, then forward queries for each name found)",
    "dns-srv-enum": _RESOLVER + " (SRV queries for a domain it is given)",
    "resolveall": _RESOLVER + " (it resolves the names it is given and adds their addresses as targets)",
    "ip-forwarding": _RESOLVER + " (for a host it is given, to which it then sends packets through the target)",
    "ftp-bounce": "it resolves scanme.nmap.org (or a host it is given) through the server's DNS resolver, "
                  "then asks the target's FTP server to connect to that third party",
    "bittorrent-discovery": "it contacts BitTorrent trackers and DHT peers on the internet",
    "mtrace": "it sends multicast traceroute queries to routers other than the target",
    **dict.fromkeys(
        ("ip-geolocation-*", "whois-*", "asn-query", "hostmap-*", "http-robtex-*", "http-virustotal", "http-xssed",
         "traceroute-geolocation", "tor-consensus-checker", "http-google-malware", "http-icloud-*", "shodan-api",
         "vulners"),
        _THIRD_PARTY_SERVICE,
    ),
}
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
    # The operator's own denials (`denied_scripts`), on top of BUILTIN_DENIED_SCRIPTS.
    operator_denied: tuple[str, ...] = ()
    args_allowed: Mapping[str, re.Pattern[str]] | None = None

    def expression(self, requested: Iterable[str]) -> str:
        """The one `--script` value nmap receives for the caller's comma-separated picks
        (case does not matter: script names and categories are lower case)."""
        picks = sorted({pick.lower() for pick in requested})
        for pick in picks:
            self._check_pick(pick)
        excluded = [*EXCLUDED_CATEGORIES, *BUILTIN_DENIED_SCRIPTS, *self.operator_denied]
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
        if why := next((why for pattern, why in BUILTIN_DENIED_SCRIPTS.items() if fnmatch.fnmatchcase(pick, pattern)),
                       None):
            raise ScriptPolicyError(f"script '{pick}' is denied: {why}")
        if any(fnmatch.fnmatchcase(pick, pattern) for pattern in self.operator_denied):
            raise ScriptPolicyError(f"script '{pick}' is denied by this server's denied_scripts")
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
