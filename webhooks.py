"""Schedule webhooks: where they may go, the body they carry, and one signed POST per attempt.

Where a webhook may go is checked when its schedule is saved and again before every attempt:

- The URL must fall under one of `webhook_allowed_urls`: the same scheme, host and port (an
  absent port is the scheme's default), and a path at or below the prefix's path, compared by
  whole segments (`/hooks` allows `/hooks` and `/hooks/nmap`, never `/hooksevil`).
- Its path must be written plainly: no `.` or `..` segments, `;` parameters (`..;`), percent
  escapes (`%2e`, `%252e`), backslashes or empty segments. Receivers and the proxies in front
  of them disagree on what those mean, so a path that passed the prefix check could reach
  another route there (`/hooks/..;/admin` is `/admin` to Tomcat).
- Every address the host stands for must be one a webhook may reach: never an address of the
  built-in deny list of targets.py (cloud metadata services, link-local, multicast,
  unspecified, reserved, IPv4 addresses inside IPv6); an address that is not public
  (loopback, private, shared) only when `webhook_allowed_addresses` lists it exactly. At save
  time this applies to a host written as an address; before an attempt the host is resolved
  once and every address it resolves to must pass, because a name can be pointed elsewhere
  after the schedule was saved.

An attempt then connects to the checked address itself, never to a second resolution of the
name (which could answer differently): the name stays in the Host header and, over https, in
SNI and the certificate check. It is one POST of the JSON body with `X-Nmap-MCP-Signature:
sha256=<hex>`, the HMAC-SHA256 of the raw body under the schedule's secret; no redirect is
followed and no proxy is taken from the environment. The whole attempt (resolving,
connecting, sending, reading the answer) has DEADLINE_SECONDS, and at most RESPONSE_BYTES of
the answer are read, as they arrive: a receiver that streams without end or trickles its
answer costs the sender neither memory nor more time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from targets import BUILTIN_DENIED_HOSTNAMES, BUILTIN_DENIED_NETWORKS, IPAddress

SIGNATURE_HEADER = "X-Nmap-MCP-Signature"
# The run's id, the same on every attempt: receivers drop repeats by it.
DELIVERY_HEADER = "X-Nmap-MCP-Delivery"
DEADLINE_SECONDS = 5.0
# The most of an answer read; a receiver has nothing longer to tell a sender.
RESPONSE_BYTES = 4096
DEFAULT_PORTS = {"http": 80, "https": 443}
# What a path may hold: RFC 3986's path characters without '%' and ';', which have rules of
# their own below.
PLAIN_PATH = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@/]*")
PATH_SIGNS = (
    (";", "';' parameters (such as '..;')"),
    ("%", "percent-encoded characters (such as %2e or %252e)"),
)
NEVER_REACHED = ("that no webhook may reach (cloud metadata, link-local, multicast, unspecified or reserved space, "
                 "or an IPv4 address inside IPv6)")
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


class WebhookRefused(ValueError):
    """A webhook URL or address this server does not send to; the message says why."""


class AttemptFailed(Exception):
    """One attempt did not get a 2xx answer; the message says why, in words of our own."""


@dataclass(frozen=True)
class Rules:
    """Where webhooks may go: URL prefixes, and the exact addresses allowed although not public."""

    urls: tuple[str, ...] = ()
    addresses: frozenset[IPAddress] = frozenset()


@dataclass(frozen=True)
class Endpoint:
    """The parts of a URL that decide where a request goes."""

    scheme: str
    host: str
    port: int
    path: str

    def under(self, prefix: Endpoint) -> bool:
        """Whether this URL is at or below `prefix`: same origin, path below by whole segments."""
        if (self.scheme, self.host, self.port) != (prefix.scheme, prefix.host, prefix.port):
            return False
        if prefix.path.endswith("/"):
            return self.path.startswith(prefix.path)
        return self.path == prefix.path or self.path.startswith(prefix.path + "/")


def endpoint(text: str) -> Endpoint:
    """The scheme, host, port and path of an http(s) URL with a plain path; WebhookRefused for anything else."""
    if "\\" in text:
        raise WebhookRefused("a webhook URL may not hold backslashes")
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as e:
        raise WebhookRefused("the webhook URL is not a valid URL") from e
    if url.scheme not in DEFAULT_PORTS or not url.host:
        raise WebhookRefused("a webhook URL must be an http:// or https:// URL with a host")
    if url.userinfo:
        raise WebhookRefused("a webhook URL may not hold a user name or password")
    # The path as written: httpx removes dot segments from the path it sends, so its own would hide them.
    if (problem := path_problem(urlsplit(text).path)) is not None:
        raise WebhookRefused(f"a webhook URL's path may not hold {problem}")
    return Endpoint(url.scheme, url.host.lower(), url.port or DEFAULT_PORTS[url.scheme], url.path or "/")


def path_problem(path: str) -> str | None:
    """What makes a URL path (as written) one that receivers may read differently, or None."""
    for sign, what in PATH_SIGNS:
        if sign in path:
            return what
    if any(segment in (".", "..") for segment in path.split("/")):
        return "'.' or '..' segments"
    if "//" in path:
        return "empty segments ('//')"
    if not PLAIN_PATH.fullmatch(path):
        return "characters other than letters, digits and - . _ ~ ! $ & ' ( ) * + , = : @ /"
    return None


def check_url(text: str, rules: Rules) -> str:
    """`text` when it falls under one of the allowed prefixes and its host, if written as an
    address, may be reached; WebhookRefused otherwise."""
    target = endpoint(text)
    if not rules.urls:
        raise WebhookRefused("this server allows no webhooks (its webhook_allowed_urls is empty)")
    if not any(target.under(endpoint(prefix)) for prefix in rules.urls):
        raise WebhookRefused("the webhook URL is outside the URLs this server allows (webhook_allowed_urls)")
    check_host(target.host, rules)
    return text


def check_host(host: str, rules: Rules) -> None:
    """Refuse a metadata host name, or a host written as an address a webhook may not reach."""
    if host in BUILTIN_DENIED_HOSTNAMES:
        raise WebhookRefused(f"{host} is a cloud metadata host name, which no webhook may reach")
    if (address := address_of(host)) is not None:
        check_addresses(host, [address], rules)


def check_prefixes(rules: Rules) -> None:
    """Refuse configured prefixes that could never be sent to (the configuration's check)."""
    for prefix in rules.urls:
        check_host(endpoint(prefix).host, rules)


def address_of(host: str) -> IPAddress | None:
    """The address a URL's host is written as, or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def check_addresses(host: str, addresses: Iterable[IPAddress], rules: Rules) -> None:
    """WebhookRefused unless EVERY address may be reached: one bad answer among good ones is a trap."""
    for address in addresses:
        named = str(address) if host == str(address) else f"{host} resolves to {address}, which"
        if in_deny_list(address):
            raise WebhookRefused(f"{named} is an address {NEVER_REACHED}")
        if not address.is_global and address not in rules.addresses:
            kind = "loopback" if address.is_loopback else "private" if address.is_private else "non-public"
            raise WebhookRefused(f"{named} is a {kind} address not listed in webhook_allowed_addresses")


def in_deny_list(address: IPAddress) -> bool:
    """Whether `address` is on the built-in deny list, which no configuration lifts."""
    return any(address.version == network.version and address in network for network in BUILTIN_DENIED_NETWORKS)


def shown(text: str) -> str:
    """A webhook URL as listings show it: without its query, which may hold the receiver's key."""
    url = httpx.URL(text)
    return str(url.copy_with(query=None, fragment=None)) + ("?…" if url.query else "")


def signature(secret: str, body: bytes) -> str:
    """The X-Nmap-MCP-Signature value of `body`: sha256= and the hex HMAC-SHA256 under `secret`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def body(payload: dict[str, Any]) -> bytes:
    """The raw bytes that are sent and signed."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address the system's resolver gives `host`, in its order, once each."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


@dataclass(frozen=True)
class Sender:
    """Sends webhooks where `rules` allow. `resolve` turns a host name into addresses and
    `verify` is the TLS trust (httpx's, certifi, by default); tests point them at their own."""

    rules: Rules
    resolve: Resolver = resolve_host
    verify: ssl.SSLContext | bool = True
    deadline_s: float = DEADLINE_SECONDS

    async def post(self, url: str, raw: bytes, secret: str, delivery: str) -> str | None:
        """One attempt: None when the receiver answered 2xx, else why not (in words of our own).
        WebhookRefused when the URL, or an address its host stands for, may not be reached."""
        target = httpx.URL(check_url(url, self.rules))
        headers = {"Content-Type": "application/json", "User-Agent": "nmap-mcp", "Host": target.netloc.decode("ascii"),
                   SIGNATURE_HEADER: signature(secret, raw), DELIVERY_HEADER: delivery}
        try:
            async with asyncio.timeout(self.deadline_s):
                for address in await self._addresses(target):
                    if await self._post_to(address, target, raw, headers):
                        return None
                raise AttemptFailed(f"could not connect to {target.host}")
        except AttemptFailed as e:
            return str(e)
        except TimeoutError:
            return f"no whole answer within {self.deadline_s:g} s (resolving, connecting, sending and reading)"

    async def _addresses(self, url: httpx.URL) -> list[IPAddress]:
        """The host's addresses, resolved once for this attempt, each of them checked."""
        literal, port = address_of(url.host), url.port or DEFAULT_PORTS[url.scheme]
        try:
            addresses = [literal] if literal is not None else await self.resolve(url.host, port)
        except (OSError, UnicodeError) as e:
            raise AttemptFailed(f"{url.host} does not resolve") from e
        if not addresses:
            raise AttemptFailed(f"{url.host} does not resolve")
        check_addresses(url.host, addresses, self.rules)
        return addresses

    async def _post_to(self, address: IPAddress, url: httpx.URL, raw: bytes, headers: dict[str, str]) -> bool:
        """POST to `address` itself; False when it refused the connection (the next address is tried)."""
        pinned = url.copy_with(host=str(address))
        # SNI and the certificate check go by the name, although the connection goes to the address.
        extensions = {"sni_hostname": url.host} if url.scheme == "https" and pinned.host != url.host else {}
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, verify=self.verify,
                                     timeout=self.deadline_s) as http:
            try:
                async with http.stream("POST", pinned, content=raw, headers=headers, extensions=extensions) as answer:
                    await judge(answer)
            except httpx.ConnectError as e:
                if certificate_refused(e):
                    raise AttemptFailed(f"the receiver's TLS certificate is not valid for {url.host}") from e
                return False
            except httpx.TimeoutException as e:
                raise AttemptFailed(f"no answer within {self.deadline_s:g} s") from e
            except httpx.HTTPError as e:
                raise AttemptFailed(f"the request failed ({type(e).__name__})") from e
        return True


async def judge(answer: httpx.Response) -> None:
    """AttemptFailed unless `answer` is a 2xx whose body ends within RESPONSE_BYTES (read as it
    arrives, never decoded or kept)."""
    if answer.is_redirect:
        raise AttemptFailed(f"the receiver answered {answer.status_code}, a redirect (not followed)")
    if not answer.is_success:
        raise AttemptFailed(f"the receiver answered {answer.status_code}")
    read = 0
    async for chunk in answer.aiter_raw():
        read += len(chunk)
        if read > RESPONSE_BYTES:
            raise AttemptFailed(f"the receiver's answer was longer than {RESPONSE_BYTES} bytes")


def certificate_refused(error: BaseException) -> bool:
    """Whether a failed connection was a TLS certificate that did not verify."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False
