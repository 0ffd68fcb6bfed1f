"""Token authentication and per-token tool scopes.

Named static tokens arrive as a Bearer header or as `?token=`.

The query-token shim runs before authentication. It always removes `token` from the
query string, in place, so that neither the access log nor any later code sees it, and
(when allowed) turns it into an `Authorization: Bearer` header.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from urllib.parse import parse_qsl, urlencode

import mcp.types as mt
from fastmcp.exceptions import ToolError
from fastmcp.server.auth import AccessToken, TokenVerifier
from fastmcp.server.dependencies import get_access_token
from fastmcp.server.middleware import CallNext, MiddlewareContext
from fastmcp.server.middleware import Middleware as MCPMiddleware
from fastmcp.tools.base import Tool, ToolResult
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

QUERY_PARAMETER = "token"


class NamedTokenVerifier(TokenVerifier):
    """Accepts any configured secret; the token's name becomes the caller's identity."""

    def __init__(self, secrets: Mapping[str, str], *, allow_query_token: bool) -> None:
        super().__init__()
        self._secrets = [(name, secret.encode()) for name, secret in secrets.items()]
        self._allow_query_token = allow_query_token

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

    def get_middleware(self) -> list[Middleware]:
        # The shim must come first: placed after authentication it would be too late.
        shim = Middleware(QueryTokenMiddleware, allow=self._allow_query_token)  # type: ignore[arg-type]
        return [shim, *super().get_middleware()]


class QueryTokenMiddleware:
    """Pure ASGI: move `?token=` into the Authorization header, or drop it."""

    def __init__(self, app: ASGIApp, *, allow: bool) -> None:
        self.app = app
        self.allow = allow

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("query_string"):
            token = pop_query_token(scope)
            if token and self.allow and not _has_authorization(scope):
                scope["headers"] = [*scope["headers"], (b"authorization", b"Bearer " + token.encode())]
        await self.app(scope, receive, send)


def pop_query_token(scope: Scope) -> str | None:
    """Remove every `token` parameter from the scope's query string; return the first."""
    pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
    tokens = [value for key, value in pairs if key == QUERY_PARAMETER]
    if not tokens:
        return None
    # Mutate the scope uvicorn holds: its access log reads this very dict.
    scope["query_string"] = urlencode([(k, v) for k, v in pairs if k != QUERY_PARAMETER]).encode("latin-1")
    return tokens[0]


def _has_authorization(scope: Scope) -> bool:
    return any(name.lower() == b"authorization" for name, _ in scope["headers"])


class ToolScopeMiddleware(MCPMiddleware):
    """Per-token tool allowlists: a token sees and calls only the tools it was given."""

    def __init__(self, scopes: Mapping[str, frozenset[str] | None]) -> None:
        self._scopes = dict(scopes)

    def _allows(self, tool: str) -> bool:
        token = get_access_token()
        scope = self._scopes.get(token.client_id) if token else None
        return scope is None or tool in scope

    async def on_list_tools(
        self,
        context: MiddlewareContext[mt.ListToolsRequest],
        call_next: CallNext[mt.ListToolsRequest, Sequence[Tool]],
    ) -> Sequence[Tool]:
        return [tool for tool in await call_next(context) if self._allows(tool.name)]

    async def on_call_tool(
        self,
        context: MiddlewareContext[mt.CallToolRequestParams],
        call_next: CallNext[mt.CallToolRequestParams, ToolResult],
    ) -> ToolResult:
        if not self._allows(context.message.name):
            raise ToolError(f"forbidden: this token may not use {context.message.name}")
        return await call_next(context)
