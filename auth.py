"""Token authentication and per-token tool scopes.

Named static tokens arrive as a Bearer header; `?token=` in the URL is turned into that
header (and removed from the URL) by http_edge.py before anything else sees the request.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping, Sequence

import mcp.types as mt
from fastmcp.exceptions import ToolError
from fastmcp.resources import Resource, ResourceTemplate
from fastmcp.server.auth import AccessToken, TokenVerifier
from fastmcp.server.dependencies import get_access_token
from fastmcp.server.middleware import CallNext, MiddlewareContext
from fastmcp.server.middleware import Middleware as MCPMiddleware
from fastmcp.tools.base import Tool, ToolResult

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
    """Accepts any configured secret; the token's name becomes the caller's identity."""

    def __init__(self, secrets: Mapping[str, str]) -> None:
        super().__init__()
        self._secrets = [(name, secret.encode()) for name, secret in secrets.items()]

    async def verify_token(self, token: str) -> AccessToken | None:
        candidate = token.encode()
        matched = None
        # Compare against every secret without stopping early, so timing reveals nothing.
        for name, secret in self._secrets:
            if hmac.compare_digest(candidate, secret):
                matched = name
        if matched is None:
            return None
        return AccessToken(token=token, client_id=matched, scopes=[])


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
