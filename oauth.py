"""People sign in with the team's OpenID provider, beside the API tokens.

With `oauth` configured, this server is the OAuth 2.1 authorization server MCP clients see
(FastMCP's OIDCProxy): it publishes protected-resource metadata (RFC 9728) and authorization
server metadata, takes clients by client ID metadata document or dynamic registration, and
sends a person to the provider to sign in (authorization code with PKCE on both legs). Its
own tokens are bound to this server (their audience); behind each one it keeps the provider's
tokens and checks, on every request, the provider's ID token (signature by the provider's
keys, issuer, audience, expiry). An expired one is refreshed with the provider when it gave a
refresh token; a person the provider no longer lets in is then refused, and their new claims
decide their role. API tokens work on the same endpoint at the same time (MultiAuth: the
proxy's tokens first, then the named tokens).

A person is known by their email address (the owner of their tasks, schedules and inventory
view, and the caller the audit log names). Their role is the first of `roles` whose groups or
emails match the provider's claims; a person in no role is refused like a wrong token, and
the log says who and why (never a token).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.fernet import Fernet
from fastmcp.server.auth import AccessToken, AuthProvider, MultiAuth, TokenVerifier
from fastmcp.server.auth.jwt_issuer import derive_jwt_key
from fastmcp.server.auth.oidc_proxy import OIDCProxy
from key_value.aio.stores.filetree import (
    FileTreeStore,
    FileTreeV1CollectionSanitizationStrategy,
    FileTreeV1KeySanitizationStrategy,
)
from key_value.aio.wrappers.encryption import FernetEncryptionWrapper

from config import OAuthConfig, RoleConfig

if TYPE_CHECKING:
    from people_store import PeopleStore

log = logging.getLogger("nmap_mcp.oauth")

# Where the provider sends a person back to this server after they signed in.
CALLBACK_PATH = "/auth/callback"


@dataclass(frozen=True)
class Person:
    """Someone who signed in: their email (the owner of what they do), name and role."""

    owner: str
    name: str
    role: str


@dataclass(frozen=True)
class Refused:
    """Why someone may not sign in; `owner` is their email when the provider gave one."""

    reason: str
    owner: str | None = None


class RoleBook:
    """Each person's role as this process last learnt it: from the provider's claims on each
    of their requests, or, for a scan run for them without one (a schedule's, a worker's
    check), from the people table that every process shares (`refresh`)."""

    def __init__(self, store: PeopleStore | None = None) -> None:
        self._store = store
        self._roles: dict[str, str] = {}

    def role_of(self, owner: str) -> str | None:
        return self._roles.get(owner)

    def people(self) -> list[str]:
        return list(self._roles)

    async def admit(self, person: Person) -> None:
        """`person` has the role their claims gave now (written down when it changed)."""
        if self._roles.get(person.owner) != person.role:
            self._roles[person.owner] = person.role
            if self._store is not None:
                await self._store.record(person.owner, person.name, person.role)

    async def forget(self, owner: str) -> None:
        """`owner` is in no role any more: nothing runs with a grant for them."""
        self._roles.pop(owner, None)
        if self._store is not None:
            await self._store.forget(owner)

    async def refresh(self, owner: str) -> None:
        """Read `owner`'s role again from the people table (people only, not tokens)."""
        if "@" not in owner or self._store is None:
            return
        role = await self._store.role_of(owner)
        if role is None:
            self._roles.pop(owner, None)
        else:
            self._roles[owner] = role


def role_of(email: str | None, groups: list[str], roles: Mapping[str, RoleConfig]) -> str | None:
    """The first role, in config order, that one of `groups` or `email` (or its domain) is in."""
    domain = email.rpartition("@")[2] if email else None
    for name, role in roles.items():
        if set(groups) & set(role.groups) or (email and (email in role.emails or domain in role.email_domains)):
            return name
    return None


def person_of(claims: Mapping[str, Any], roles: Mapping[str, RoleConfig], groups_claim: str) -> Person | Refused:
    """The person the provider's claims describe, or why they may not sign in. An email the
    provider says it did not verify is no identity: anyone could have typed it."""
    email = claims.get("email")
    if not isinstance(email, str) or "@" not in email or claims.get("email_verified") is False:
        return Refused(f"the provider gave no verified email for subject {str(claims.get('sub'))[:64]!r}")
    email = email.lower()
    groups = claims.get(groups_claim) or []
    groups = [groups] if isinstance(groups, str) else [str(group) for group in groups]
    role = role_of(email, groups, roles)
    if role is None:
        return Refused(f"{email} is in no role (groups: {', '.join(groups) or 'none'})", email)
    name = claims.get("name")
    return Person(owner=email, name=name if isinstance(name, str) and name else email, role=role)


class PeopleVerifier(TokenVerifier):
    """The provider's ID token checked by `inner`, then turned into the person it names: the
    token's client_id becomes their email, which the rest of the server knows them by."""

    def __init__(self, inner: TokenVerifier, roles: Mapping[str, RoleConfig], groups_claim: str,
                 book: RoleBook) -> None:
        super().__init__()
        self._inner = inner
        self._roles = roles
        self._groups_claim = groups_claim
        self._book = book

    async def verify_token(self, token: str) -> AccessToken | None:
        checked = await self._inner.verify_token(token)
        if checked is None:
            return None
        person = person_of(checked.claims or {}, self._roles, self._groups_claim)
        if isinstance(person, Refused):
            log.warning("sign-in refused: %s", person.reason)
            if person.owner is not None:
                await self._book.forget(person.owner)
            return None
        await self._book.admit(person)
        return checked.model_copy(update={"client_id": person.owner, "subject": person.owner,
                                          "claims": {**(checked.claims or {}), "nmap_mcp_role": person.role}})


class PeopleProxy(OIDCProxy):
    """FastMCP's OIDC proxy whose ID-token check also finds the person and their role."""

    def __init__(self, *, people: Callable[[TokenVerifier], PeopleVerifier], **options: Any) -> None:
        self._people = people
        super().__init__(**options)

    def get_token_verifier(self, **options: Any) -> TokenVerifier:
        return self._people(super().get_token_verifier(**options))


def auth_provider(oauth: OAuthConfig | None, roles: Mapping[str, RoleConfig], tokens: TokenVerifier,
                  book: RoleBook) -> AuthProvider:
    """The named tokens alone, or, with `oauth`, sign-in through the provider beside them.
    Reads the provider's discovery document (so it fails at start-up when unreachable)."""
    if oauth is None:
        return tokens
    secret = oauth.client_secret.get_secret_value()
    proxy = PeopleProxy(
        people=lambda inner: PeopleVerifier(inner, roles, oauth.groups_claim, book),
        config_url=oauth.issuer.rstrip("/") + "/.well-known/openid-configuration",
        client_id=oauth.client_id,
        client_secret=secret,
        base_url=oauth.base_url,
        redirect_path=CALLBACK_PATH,
        # The provider's ID token says who signed in; its access token is often opaque or
        # meant for another API (Google's, Entra's Graph tokens).
        verify_id_token=True,
        valid_scopes=oauth.scopes,
        # The provider is asked for the claims the roles read, whatever scopes a client asks.
        extra_authorize_params={"scope": " ".join(oauth.scopes)},
        # The `resource` a client asks for is this server: the tokens this proxy issues are bound
        # to it. Passed on, it means nothing to the provider, which may refuse it (oidc-provider:
        # invalid_target; Entra ID v2 wants scopes instead).
        forward_resource=False,
        client_storage=encrypted_store(Path(oauth.state_dir), secret),
        require_authorization_consent=oauth.consent,
    )
    return MultiAuth(server=proxy, verifiers=[tokens])


def encrypted_store(directory: Path, secret: str) -> FernetEncryptionWrapper:
    """Client registrations and token mappings on disk under `directory`, encrypted with a key
    derived from the client secret (as FastMCP's default store, in a directory of ours)."""
    key = derive_jwt_key(high_entropy_material=secret, salt="fastmcp-storage-encryption-key")
    path = directory / hashlib.sha256(key).hexdigest()[:12]
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = FileTreeStore(data_directory=path,
                          key_sanitization_strategy=FileTreeV1KeySanitizationStrategy(path),
                          collection_sanitization_strategy=FileTreeV1CollectionSanitizationStrategy(path))
    return FernetEncryptionWrapper(key_value=files, fernet=Fernet(key=key), raise_on_decryption_error=False)
