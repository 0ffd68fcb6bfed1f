"""People sign in to the operator page (/ui) with the team's provider, beside the token form.

The page is a client of this server's own authorization server (oauth.py), registered at
start as `nmap-mcp-ui` with the redirect URI BASE_URL/ui/callback, so the provider knows one
redirect URI for both (BASE_URL/auth/callback) and a person passes the same consent page and
the same role check as in an MCP client. /ui/sign-in starts an authorization code flow with
PKCE; its state and verifier travel in a cookie encrypted for this server (Fernet, 10
minutes). /ui/callback checks both, takes the code in process and keeps this server's access
token in a session cookie: HttpOnly (no script reads it), SameSite=Strict (no other site's
page sends it), Secure when base_url is https, Path=/ui, and no longer-lived than the token
or an hour. `SessionCookieBearer` turns that cookie into the Bearer header of /ui/api/
requests that carry no header of their own, so the page's API checks a person exactly as it
checks a token. /ui/api/ only reads, but for an approver's decision, a POST dashboard.py takes
only from the page's own origin; /ui/sign-out only forgets the cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import urllib.parse

from cryptography.fernet import Fernet, InvalidToken
from fastmcp import FastMCP
from fastmcp.server.auth.jwt_issuer import derive_jwt_key
from fastmcp.server.auth.oauth_proxy import OAuthProxy
from mcp.server.auth.provider import TokenError
from mcp.shared.auth import OAuthClientInformationFull
from pydantic import AnyUrl
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from config import OAuthConfig

UI_CLIENT_ID = "nmap-mcp-ui"
CALLBACK = "/ui/callback"
FLOW_COOKIE = "nmap_mcp_ui_flow"
SESSION_COOKIE = "nmap_mcp_ui_session"
FLOW_SECONDS = 600
SESSION_MAX_SECONDS = 3600
API_PREFIX = "/ui/api/"
NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


class UiSignIn:
    """The routes of the page's sign-in, for one proxy (oauth.PeopleProxy) and config."""

    def __init__(self, proxy: OAuthProxy, oauth: OAuthConfig, mcp_url: str) -> None:
        self._proxy = proxy
        self._base = oauth.base_url.rstrip("/")
        self._resource = mcp_url
        self._secure = self._base.startswith("https://")
        key = derive_jwt_key(high_entropy_material=oauth.client_secret.get_secret_value(), salt="nmap-mcp-ui-flow")
        self._flows = Fernet(key)
        self._client: OAuthClientInformationFull | None = None

    def register(self, mcp: FastMCP) -> None:
        mcp.custom_route("/ui/sign-in-options", methods=["GET"])(self.options)
        mcp.custom_route("/ui/sign-in", methods=["GET"])(self.sign_in)
        mcp.custom_route(CALLBACK, methods=["GET"])(self.callback)
        mcp.custom_route("/ui/sign-out", methods=["POST"])(self.sign_out)

    async def options(self, _request: Request) -> JSONResponse:
        """What the page offers besides the token form (nothing secret: OAuth metadata is public)."""
        return JSONResponse({"sign_in": "/ui/sign-in"}, headers=NO_STORE)

    async def sign_in(self, _request: Request) -> Response:
        client = await self._ui_client()
        state, verifier = secrets.token_urlsafe(24), secrets.token_urlsafe(48)
        query = urllib.parse.urlencode({
            "response_type": "code", "client_id": client.client_id, "redirect_uri": self._base + CALLBACK,
            "state": state, "code_challenge": challenge_of(verifier), "code_challenge_method": "S256",
            "resource": self._resource})
        answer = RedirectResponse(f"{self._base}/authorize?{query}", status_code=302, headers=NO_STORE)
        flow = self._flows.encrypt(json.dumps({"state": state, "verifier": verifier}).encode()).decode()
        # Lax: the provider's redirect back is a top-level navigation begun on another site.
        answer.set_cookie(FLOW_COOKIE, flow, max_age=FLOW_SECONDS, path="/ui", httponly=True, secure=self._secure,
                          samesite="lax")
        return answer

    async def callback(self, request: Request) -> Response:
        flow = self._flow(request.cookies.get(FLOW_COOKIE, ""))
        state, code = request.query_params.get("state", ""), request.query_params.get("code", "")
        if flow is None or not code or not hmac.compare_digest(state.encode(), flow["state"].encode()):
            return refused("the sign-in expired or did not start here: sign in again")
        client = await self._ui_client()
        granted = await self._proxy.load_authorization_code(client, code)
        if granted is None or granted.code_challenge != challenge_of(flow["verifier"]):
            return refused("the sign-in code was not accepted: sign in again")
        try:
            token = await self._proxy.exchange_authorization_code(client, granted)
        except TokenError:
            return refused("the provider did not give this sign-in its tokens: sign in again")
        if await self._proxy.load_access_token(token.access_token) is None:
            return refused("you signed in, but your account is in no role of this server: ask its operator")
        answer = RedirectResponse("/ui", status_code=303, headers=NO_STORE)
        answer.delete_cookie(FLOW_COOKIE, path="/ui")
        lifetime = min(token.expires_in or SESSION_MAX_SECONDS, SESSION_MAX_SECONDS)
        answer.set_cookie(SESSION_COOKIE, token.access_token, max_age=lifetime, path="/ui", httponly=True,
                          secure=self._secure, samesite="strict")
        return answer

    async def sign_out(self, _request: Request) -> Response:
        answer = Response(status_code=204, headers=NO_STORE)
        answer.delete_cookie(SESSION_COOKIE, path="/ui")
        return answer

    def _flow(self, cookie: str) -> dict[str, str] | None:
        try:
            flow = json.loads(self._flows.decrypt(cookie.encode(), ttl=FLOW_SECONDS))
        except (InvalidToken, ValueError):
            return None
        return flow if isinstance(flow, dict) and {"state", "verifier"} <= set(flow) else None

    async def _ui_client(self) -> OAuthClientInformationFull:
        """The page's registration with the proxy, made once per process (the store keeps it)."""
        if self._client is None:
            self._client = OAuthClientInformationFull(
                client_id=UI_CLIENT_ID, client_name="nmap-mcp operator page",
                redirect_uris=[AnyUrl(self._base + CALLBACK)],
                grant_types=["authorization_code"], response_types=["code"], token_endpoint_auth_method="none",
                client_id_issued_at=int(time.time()))
            await self._proxy.register_client(self._client)
        return self._client


def challenge_of(verifier: str) -> str:
    """The S256 PKCE challenge of `verifier` (RFC 7636)."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def refused(reason: str) -> Response:
    """Back to the page, which says `reason` beside its sign-in choices."""
    return RedirectResponse("/ui?" + urllib.parse.urlencode({"sign_in_error": reason}), status_code=303,
                            headers=NO_STORE)


class SessionCookieBearer:
    """Pure ASGI: a /ui/api/ request without an Authorization header but with the page's
    session cookie gets the cookie's token as its Bearer header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(API_PREFIX):
            headers = scope["headers"]
            if not any(name.lower() == b"authorization" for name, _ in headers):
                token = Request(scope).cookies.get(SESSION_COOKIE)
                if token:
                    scope["headers"] = [*headers, (b"authorization", b"Bearer " + token.encode("latin-1"))]
        await self.app(scope, receive, send)
