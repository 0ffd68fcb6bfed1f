"""Token authentication and per-token tool scopes.

Named static tokens arrive as a Bearer header; `?token=` in the URL is turned into that
header (and removed from the URL) by http_edge.py before anything else sees the request.
The server knows each token by its secret's SHA-256 (api_keys.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

import mcp.types as mt
from fastmcp.exceptions import ToolError
from fastmcp.resources import Resource, ResourceTemplate
from fastmcp.server.auth import AccessToken, TokenVerifier
from fastmcp.server.dependencies import get_access_token
from fastmcp.server.middleware import CallNext, MiddlewareContext
from fastmcp.server.middleware import Middleware as MCPMiddleware
from fastmcp.tools.base import Tool, ToolResult

from api_keys import ApiKey, matching_name

logger = logging.getLogger(__name__)
# Who is calling: the name of the token that authenticated the request (None: nobody), or,
# over stdio where no token travels, the configured local identity.
Identify = Callable[[], str | None]


def token_name() -> str | None:
    """The caller of this HTTP request, if any: the name of its API token, or the email of
    the person who signed in (oauth.py). With both kinds on (MultiAuth) the client_id is
    qualified by where it came from; the name as its source gave it is `original_client_id`,
    and the two kinds never share a name (token names hold no '@', people's emails do)."""
    token = get_access_token()
    if token is None:
        return None
    return token.original_client_id or token.client_id or None


class NamedTokenVerifier(TokenVerifier):
    """Accepts the secret of any configured key that has not expired; the key's name becomes
    the caller's identity. An expired key is refused as a wrong one is (401, same words), and
    logged once per key and process, naming the token, so that the operator hears of it."""

    def __init__(self, keys: Mapping[str, ApiKey]) -> None:
        super().__init__()
        self._keys = dict(keys)
        self._expired_logged: set[str] = set()

    async def verify_token(self, token: str) -> AccessToken | None:
        name = matching_name(self._keys, token)
        if name is None:
            return None
        if self._keys[name].expired(datetime.now(UTC)):
            if name not in self._expired_logged:
                self._expired_logged.add(name)
                logger.warning("token '%s' expired at %s and is refused: give its holder a new key "
                               "(--hash-token --new) or move its expires_at", name, self._keys[name].expires_at)
            return None
        return AccessToken(token=token, client_id=name, scopes=[])


class ToolScopeMiddleware(MCPMiddleware):
    """Per-token tool allowlists: a token sees and calls only the tools it was given, and sees
    only the resources whose tools it was given. `may(token, tool or route)` decides
    (Policy.may: the routes and the tools they stand for are in policy.ROUTE_TOOLS)."""

    def __init__(self, may: Callable[[str, str], bool], identify: Identify) -> None:
        self._may = may
        self._identify = identify

    def _allows(self, route: str) -> bool:
        name = self._identify()
        return name is None or self._may(name, route)

    async def on_list_tools(
        self,
        context: MiddlewareContext[mt.ListToolsRequest],
        call_next: CallNext[mt.ListToolsRequest, Sequence[Tool]],
    ) -> Sequence[Tool]:
        return [tool for tool in await call_next(context) if self._allows(tool.name)]

    async def on_list_resources(
        self,
        context: MiddlewareContext[mt.ListResourcesRequest],
        call_next: CallNext[mt.ListResourcesRequest, Sequence[Resource]],
    ) -> Sequence[Resource]:
        return [resource for resource in await call_next(context) if self._allows(str(resource.uri))]

    async def on_list_resource_templates(
        self,
        context: MiddlewareContext[mt.ListResourceTemplatesRequest],
        call_next: CallNext[mt.ListResourceTemplatesRequest, Sequence[ResourceTemplate]],
    ) -> Sequence[ResourceTemplate]:
        return [template for template in await call_next(context) if self._allows(template.uri_template)]

    async def on_call_tool(
        self,
        context: MiddlewareContext[mt.CallToolRequestParams],
        call_next: CallNext[mt.CallToolRequestParams, ToolResult],
    ) -> ToolResult:
        if not self._allows(context.message.name):
            raise ToolError(f"forbidden: this token may not use {context.message.name}")
        return await call_next(context)
