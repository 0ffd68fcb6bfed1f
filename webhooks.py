"""Schedule webhooks: which URLs they may point at, the body they carry, and one signed POST.

A webhook URL must fall under one of the configured `webhook_allowed_urls` prefixes: the same
scheme, host and port (an absent port is the scheme's default), and a path at or below the
prefix's path, compared by whole segments (`/hooks` allows `/hooks` and `/hooks/nmap`, never
`/hooksevil`). The check and the request both use httpx's URL parser, so the URL that was
checked is the URL that is called. With no prefixes configured no webhook is allowed.

Each attempt is one POST of the JSON body with `X-Nmap-MCP-Signature: sha256=<hex>`, the
HMAC-SHA256 of the raw body under the schedule's secret; no redirect is followed, no proxy is
taken from the environment, and the receiver has `TIMEOUT_SECONDS` to answer with a 2xx.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

SIGNATURE_HEADER = "X-Nmap-MCP-Signature"
# The run's id, the same on every attempt: receivers drop repeats by it.
DELIVERY_HEADER = "X-Nmap-MCP-Delivery"
TIMEOUT_SECONDS = 5.0
DEFAULT_PORTS = {"http": 80, "https": 443}


class WebhookRefused(ValueError):
    """A webhook URL that is not an http(s) URL, or is outside webhook_allowed_urls."""


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
    """The scheme, host, port and path of an http(s) URL; WebhookRefused for anything else."""
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as e:
        raise WebhookRefused("the webhook URL is not a valid URL") from e
    if url.scheme not in DEFAULT_PORTS or not url.host:
        raise WebhookRefused("a webhook URL must be an http:// or https:// URL with a host")
    if url.userinfo:
        raise WebhookRefused("a webhook URL may not hold a user name or password")
    if any(segment in (".", "..") for segment in url.path.split("/")):
        # httpx decodes %2e%2e in .path but sends it as written; a receiver may resolve it.
        raise WebhookRefused("a webhook URL's path may not hold . or .. segments")
    return Endpoint(url.scheme, url.host.lower(), url.port or DEFAULT_PORTS[url.scheme], url.path or "/")


def check_url(text: str, allowed: Sequence[str]) -> str:
    """`text` when it falls under one of the `allowed` prefixes; WebhookRefused otherwise."""
    target = endpoint(text)
    if not allowed:
        raise WebhookRefused("this server allows no webhooks (its webhook_allowed_urls is empty)")
    if not any(target.under(endpoint(prefix)) for prefix in allowed):
        raise WebhookRefused("the webhook URL is outside the URLs this server allows (webhook_allowed_urls)")
    return text


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


async def post(url: str, raw: bytes, secret: str, delivery: str, timeout_s: float = TIMEOUT_SECONDS) -> str | None:
    """One attempt: None when the receiver answered 2xx, else why not (in words of our own)."""
    headers = {"Content-Type": "application/json", "User-Agent": "nmap-mcp", SIGNATURE_HEADER: signature(secret, raw),
               DELIVERY_HEADER: delivery}
    try:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=timeout_s) as http:
            response = await http.post(url, content=raw, headers=headers)
    except httpx.TimeoutException:
        return f"no answer within {timeout_s:g} s"
    except httpx.HTTPError as e:
        return f"the request failed ({type(e).__name__})"
    if response.is_redirect:
        return f"the receiver answered {response.status_code}, a redirect (not followed)"
    if not response.is_success:
        return f"the receiver answered {response.status_code}"
    return None
