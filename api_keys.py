"""API keys as the server keeps them: the SHA-256 of each secret, and when the key expires.

A config file travels (backups, support tickets, a colleague's screen), so the one `--init` and
`--hash-token` write holds `secret_sha256`, which opens nothing; the secret itself exists only
in the output that made it. An older `secret` in the config is hashed when the config is loaded,
so that both forms are checked the same way.

A plain SHA-256, with no salt and no slow key-derivation function, on purpose: those exist to
slow down guessing passwords that people chose. These secrets are 256 random bits
(`secrets.token_urlsafe(32)`), not passwords: there is nothing to guess, a digest cannot be
walked back to a secret by any amount of hashing, and one hash per request keeps the check cheap.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

# The start-up banner names the keys that expire within this time, and those that have expired.
EXPIRY_NOTICE = timedelta(days=14)


def secret_sha256(secret: str) -> str:
    """The SHA-256 of a secret's UTF-8 bytes in lowercase hex: what `secret_sha256` holds."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def config_line(secret: str) -> str:
    """The JSON line that stands for `secret` in a token's entry of the config."""
    return f'"secret_sha256": "{secret_sha256(secret)}"'


@dataclass(frozen=True)
class ApiKey:
    """One token as the verifier checks it: its secret's digest, and when it stops working."""

    sha256: bytes
    # None: never.
    expires_at: datetime | None = None

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def matching_name(keys: Mapping[str, ApiKey], token: str) -> str | None:
    """The name of the key whose secret `token` is, or None. The token is hashed once and its
    digest compared with every key's in constant time, without stopping at a match, so that
    the time taken says nothing about which key, if any, matched."""
    candidate = hashlib.sha256(token.encode("utf-8")).digest()
    matched = None
    for name, key in keys.items():
        if hmac.compare_digest(candidate, key.sha256):
            matched = name
    return matched


def expiry_notes(keys: Mapping[str, ApiKey], now: datetime) -> list[str]:
    """For the start-up banner: a line for each key that has expired, or expires within
    EXPIRY_NOTICE, soonest first."""
    ending = sorted((key.expires_at, name) for name, key in keys.items()
                    if key.expires_at is not None and key.expires_at - now <= EXPIRY_NOTICE)
    return [_expiry_note(name, moment, now) for moment, name in ending]


def _expiry_note(name: str, moment: datetime, now: datetime) -> str:
    when = moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if moment <= now:
        return f"token '{name}' expired at {when}: it is refused (401) until its expires_at moves or it is replaced"
    days = (moment - now).days
    left = f"in {days} days" if days > 1 else "within 2 days"
    return f"token '{name}' expires at {when}, {left}: give its holder a new key before then"
