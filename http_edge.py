"""What happens to an HTTP request before FastMCP sees it, and to some answers after.

The outermost layer, `EdgeMiddleware`, runs before Host/Origin checks, routing, redirects
and uvicorn's access log can see a request: it removes every parameter whose name looks like
a secret's from the URL (`token`, `access_token`, `api_key`, `password`, ... in any case,
with `-` or `_`, in the query string or as `;name=` path parameters), turns the first token
(`token` or `access_token`) into an `Authorization: Bearer` header (when `?token=` is
allowed), serves the endpoint path with a trailing slash as the path itself (no redirect that
drops the token), lets a POST that accepts only `text/event-stream` be answered (as SSE, as
every POST is here) where the SDK would refuse it with 406, and answers 401s in plain words
instead of the OAuth advice FastMCP gives, which sends clients into a re-registration flow
that cannot work here. A client address that keeps sending refused tokens gets 429 with
Retry-After instead (throttle.py). OAuth-capable clients (mcp-remote, Inspector, Cherry
Studio) go on to OAuth discovery after a 401 and end at `POST /register`: the discovery
paths answer in the OAuth error format with the 401's reason, which those clients print.
The answers the edge rewrites keep the CORS headers of the answer they replace, so a
browser shows their words rather than an opaque CORS error.

`JsonRpcBodyCheck` runs after authentication: a batch, a body that is not JSON, one nested
deeper than `MAX_JSON_DEPTH`, or a body that is not one JSON-RPC message gets a short
JSON-RPC error instead of library internals.

`redact_url_secrets` does for the text of any log record what the edge does to URLs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote

from mcp.server.streamable_http import check_accept_headers
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from throttle import FailedTokenThrottle, client_address

# Parameter names are compared lower-case, without '-' and '_' (`Access-Token` is `accesstoken`).
# A JSON Web Token: header, claims and signature, each base64url (RFC 7519).
JWT_SHAPE = re.compile(rb"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
# The value of these is a token: the first becomes the request's Bearer token.
TOKEN_PARAMETERS = frozenset({"token", "accesstoken"})
# These, and names holding one of SECRET_WORDS, look like a secret's: removed from every URL
# before anything logs it. No endpoint of this server reads a query parameter by such a name.
SECRET_PARAMETERS = TOKEN_PARAMETERS | {"key", "auth", "authorization", "sig", "pwd", "pass"}
SECRET_WORDS = ("token", "secret", "password", "passwd", "apikey", "signature", "credential")
# A `name=value` parameter in free text (a log message, JSON): after `?`, `&` or `;`, up to the
# next separator, space, quote or backslash (so that an escaped quote in JSON stays escaped).
URL_PARAMETER = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;?#\s\"'<>\\]+)=(?P<value>[^&;#\s\"'<>\\]*)")
# FastMCP refuses bodies over 4 MiB with 413; the body check buffers at most that much.
MAX_BODY_BYTES = 4 * 1024 * 1024
# JSON-RPC messages of MCP nest 4 to 8 levels (a tool's arguments inside params); deeper bodies
# are refused before any parser of the SDK or pydantic walks them.
MAX_JSON_DEPTH = 64
# A tuple rather than `dict | list`: isinstance checks it faster, and it runs once per value.
CONTAINERS = (dict, list)
TOO_DEEP = f"Parse error: the request body nests deeper than {MAX_JSON_DEPTH} levels"
NO_OAUTH = "This server does not use OAuth; nothing can be registered."
SIGN_IN = "People may also sign in with OAuth: an MCP client that supports it asks them to, in the browser."
MISSING_TOKEN = (
    "no token: send 'Authorization: Bearer <token>' or add ?token=<token> to the URL. "
    "Each token is named under `tokens` in the server's config file; ask its operator for one."
)
# An expired token gets these words too: a refusal tells nobody whether a secret was ever valid.
WRONG_TOKEN = (
    "the token is not one of this server's tokens, or it has expired: check it against the `tokens` "
    "in the server's config file (--hash-token gives a secret's secret_sha256). " + NO_OAUTH
)
QUERY_TOKEN_OFF = (
    "this server does not accept ?token= in the URL (allow_query_token is false): "
    "send 'Authorization: Bearer <token>' instead."
)
# The reason of each 401, as metrics count it.
REASON_NAMES = {MISSING_TOKEN: "missing_token", WRONG_TOKEN: "wrong_token", QUERY_TOKEN_OFF: "query_token_off"}
# The request headers of both eras: Mcp-Method and Mcp-Name mirror a 2026-07-28 request's
# method and tool (SEP-2243; the TypeScript SDK v2 sends them). The era's Mcp-Param-* headers
# exist only for arguments a tool marks with x-mcp-header, and no tool here does.
CORS_HEADERS = ["Authorization", "Content-Type", "Accept", "Mcp-Session-Id", "MCP-Protocol-Version",
                "Last-Event-ID", "Mcp-Method", "Mcp-Name"]
# What a page's script may read of an answer beyond the few headers browsers always show it.
CORS_EXPOSED = ["Mcp-Session-Id", "WWW-Authenticate", "Retry-After"]
# What clients ask for after a 401 when they speak OAuth (RFC 9728 and RFC 8414, with the
# endpoint's path inserted or not, OpenID Connect discovery, and the `/register` of RFC 7591
# that the MCP specification has them fall back to), relative to the endpoint's path.
OAUTH_DISCOVERY_PATHS = ("/.well-known/oauth-protected-resource{mcp}", "/.well-known/oauth-protected-resource",
                         "/.well-known/oauth-authorization-server{mcp}", "/.well-known/oauth-authorization-server",
                         "/.well-known/openid-configuration{mcp}", "/.well-known/openid-configuration",
                         "{mcp}/.well-known/openid-configuration", "/register")
# What the app says of those paths (not found, or the method not allowed), replaced by the
# edge's answer; any other status (a Host refused, say) stays.
NO_SUCH_ROUTE = frozenset({404, 405})
# Told the endpoint ('mcp', 'other' or 'metrics'), the reason's name and whether it was throttled.
OnRefused = Callable[[str, str, bool], None]


def edge_app(
    app: ASGIApp, *, mcp_path: str, allow_query_token: bool, cors_origins: Iterable[str],
    throttle: FailedTokenThrottle, on_refused: OnRefused, oauth_routes: Iterable[str] | None = None,
) -> ASGIApp:
    """The whole HTTP stack around FastMCP's app: edge first, then CORS (when configured).
    `on_refused` is told of every 401 (or 429, when `throttle` said so). With `oauth_routes`
    (people sign in, oauth.py: its discovery, registration, authorization and token routes)
    those routes answer as the app does, and a 401 keeps the app's challenge, which points
    OAuth clients at the protected-resource metadata."""
    origins = list(cors_origins)
    if origins:
        app = CORSMiddleware(app, allow_origins=origins, allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                             allow_headers=CORS_HEADERS, expose_headers=CORS_EXPOSED, max_age=600)
    return EdgeMiddleware(app, mcp_path=mcp_path, allow_query_token=allow_query_token, throttle=throttle,
                          on_refused=on_refused, oauth_routes=oauth_routes)


class EdgeMiddleware:
    """Pure ASGI; see the module docstring."""

    def __init__(
        self, app: ASGIApp, *, mcp_path: str, allow_query_token: bool, throttle: FailedTokenThrottle,
        on_refused: OnRefused, oauth_routes: Iterable[str] | None = None,
    ) -> None:
        self.app = app
        self.oauth = oauth_routes is not None
        self.oauth_routes = frozenset(oauth_routes or ())
        self.mcp_path = mcp_path.rstrip("/") or "/"
        self.allow_query_token = allow_query_token
        self.throttle = throttle
        self.on_refused = on_refused
        self.oauth_paths = frozenset() if self.oauth else frozenset(
            path.format(mcp="" if self.mcp_path == "/" else self.mcp_path) for path in OAUTH_DISCOVERY_PATHS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        url_token = remove_url_secrets(scope)
        if scope["path"] in self.oauth_routes:
            await self.app(scope, receive, send)
            return
        if scope["path"] == self.mcp_path + "/":
            scope["path"] = self.mcp_path
            scope["raw_path"] = self.mcp_path.encode()
        if scope["method"] == "POST" and scope["path"] == self.mcp_path:
            scope["headers"] = accepting_json_beside_sse(scope)
        sent_header = _has_authorization(scope)
        if url_token and self.allow_query_token and not sent_header:
            scope["headers"] = [*scope["headers"], (b"authorization", b"Bearer " + url_token.encode("latin-1"))]
        reason = refusal_reason(bool(url_token), sent_header, self.allow_query_token)
        endpoint = "mcp" if scope["path"] == self.mcp_path else "other"

        def refusal() -> Response:
            # Only a token that was checked and refused is a failed attempt; with sign-in on, a
            # signed token (a JWT: this server's, expired or from before a restart) is no guess at
            # an API key, and the client that sent it refreshes it after the 401 a 429 would hide.
            counted = reason == WRONG_TOKEN and not (self.oauth and _bearer_is_jwt(scope))
            wait = self.throttle.refused(client_address(scope)) if counted else None
            self.on_refused(endpoint, REASON_NAMES[reason], wait is not None)
            return too_many_refused(wait) if wait is not None else unauthorized(reason, oauth=self.oauth)

        if scope["path"] in self.oauth_paths:
            await self.app(scope, receive, _replacing(send, NO_SUCH_ROUTE, lambda: no_oauth(reason)))
            return
        kept = _is_challenge_or_cors_header if self.oauth else _is_cors_header
        await self.app(scope, receive, _replacing(send, frozenset({401}), refusal, kept))


def accepting_json_beside_sse(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The request's headers, with `application/json` added to an Accept that lists SSE only.
    The SDK wants both on a POST although this server answers every request as SSE: a client
    that reads SSE alone (the DeepSOC team's, Accept: text/event-stream) would get 406."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    has_json, has_sse = check_accept_headers(Request(scope))
    if has_json or not has_sse:
        return headers
    others = [(name, value) for name, value in headers if name.lower() != b"accept"]
    accepted = b", ".join(value for name, value in headers if name.lower() == b"accept")
    return [*others, (b"accept", accepted + b", application/json")]


def refusal_reason(url_token: bool, sent_header: bool, allow_query_token: bool) -> str:
    """What a 401 of a request would say, from the credentials it carried."""
    if url_token and not allow_query_token and not sent_header:
        return QUERY_TOKEN_OFF
    return WRONG_TOKEN if (sent_header or url_token) else MISSING_TOKEN


def unauthorized(reason: str, *, oauth: bool = False) -> JSONResponse:
    """A 401 in plain words. RFC 6750: a request without credentials gets a bare `Bearer`
    challenge, a refused token `invalid_token`. With `oauth` the app's own challenge, naming
    the protected-resource metadata, is kept instead, and the words say how to sign in."""
    if oauth:
        return JSONResponse(oauth_error(signed_in_reason(reason)), status_code=401,
                            headers={"X-Content-Type-Options": "nosniff"})
    challenge = 'Bearer realm="nmap-mcp"'
    if reason != MISSING_TOKEN:
        challenge += ', error="invalid_token", error_description="the token was not accepted"'
    return JSONResponse(oauth_error(reason), status_code=401,
                        headers={"WWW-Authenticate": challenge, "X-Content-Type-Options": "nosniff"})


def signed_in_reason(reason: str) -> str:
    """`reason` for a server people also sign in to: the words about OAuth being absent go."""
    return reason.replace(" " + NO_OAUTH, "") + " " + SIGN_IN


def no_oauth(reason: str) -> JSONResponse:
    """The 404 of an OAuth discovery path or of /register: the OAuth error document (RFC 6749
    section 5.2, RFC 7591 section 3.2.2) of the 401 the request would get, saying that there
    is no OAuth here. mcp-remote prints the body ("Dynamic Client Registration rejected (HTTP
    404): ..."); clients of older TypeScript SDKs print error_description."""
    document = oauth_error(reason)
    if NO_OAUTH not in reason:
        document["error_description"] += " " + NO_OAUTH
    return JSONResponse(document, status_code=404, headers={"X-Content-Type-Options": "nosniff"})


def oauth_error(reason: str) -> dict[str, str]:
    """The body of a 401 for `reason`: `invalid_token` when a token was sent and refused."""
    return {"error": "unauthorized" if reason == MISSING_TOKEN else "invalid_token", "error_description": reason}


def too_many_refused(wait_s: int) -> JSONResponse:
    """The 429 for a refused token from an address that sent too many (throttle.py)."""
    return JSONResponse({"error": "too_many_requests", "error_description": (
        f"too many refused tokens from this address: retry in {wait_s} s with a valid token")},
        status_code=429, headers={"Retry-After": str(wait_s), "X-Content-Type-Options": "nosniff"})


def secret_name(name: str) -> str | None:
    """The normalized name of a URL parameter that looks like a secret's; None for any other."""
    normalized = unquote(name).lower().replace("-", "").replace("_", "")
    if normalized in SECRET_PARAMETERS or any(word in normalized for word in SECRET_WORDS):
        return normalized
    return None


def redact_url_secrets(text: str) -> str:
    """`text` with the value of every URL parameter that looks like a secret's replaced by `***`."""
    return URL_PARAMETER.sub(
        lambda found: f"{found['lead']}{found['name']}=***" if secret_name(found["name"]) else found[0], text)


def remove_url_secrets(scope: Scope) -> str | None:
    """Remove secret-looking parameters from the query string and path, in place (uvicorn's
    access log reads this very scope); return the first token value found."""
    query = _without_secrets(scope.get("query_string", b"").decode("latin-1"), "&;", "&")
    path = _path_without_secrets(scope["path"])
    if query.removed:
        scope["query_string"] = query.text.encode("latin-1")
    if path.removed:
        scope["path"] = path.text
        scope["raw_path"] = path.text.encode("utf-8")
    found = query.tokens + path.tokens
    return found[0] if found else None


@dataclass
class Cleaned:
    """Text with its secret-looking parameters removed, the token values among them, and
    whether anything was removed."""

    text: str
    tokens: list[str] = field(default_factory=list)
    removed: bool = False


def _without_secrets(text: str, separators: str, joiner: str) -> Cleaned:
    """`text` split on any of `separators`, rejoined with `joiner` without its secret-looking
    parameters."""
    parts, kept = [""], []
    cleaned = Cleaned("")
    for char in text:
        if char in separators:
            parts.append("")
        else:
            parts[-1] += char
    for part in parts:
        key, _, value = part.partition("=")
        name = secret_name(key)
        cleaned.removed |= name is not None
        if name in TOKEN_PARAMETERS:
            cleaned.tokens.append(unquote(value))
        elif name is None and part:
            kept.append(part)
    cleaned.text = joiner.join(kept)
    return cleaned


def _path_without_secrets(path: str) -> Cleaned:
    cleaned = Cleaned(path)
    if ";" not in path:
        return cleaned
    segments = []
    for segment in path.split("/"):
        name, _, parameters = segment.partition(";")
        found = _without_secrets(parameters, ";", ";")
        cleaned.tokens += found.tokens
        cleaned.removed |= found.removed
        segments.append(f"{name};{found.text}" if found.text else name)
    cleaned.text = "/".join(segments)
    return cleaned


def _has_authorization(scope: Scope) -> bool:
    return any(name.lower() == b"authorization" for name, _ in scope["headers"])


def _bearer_is_jwt(scope: Scope) -> bool:
    """Whether the request's Bearer token has a JWT's shape: three base64url parts."""
    value = next((value for name, value in scope["headers"] if name.lower() == b"authorization"), b"")
    return JWT_SHAPE.fullmatch(value.removeprefix(b"Bearer ").strip()) is not None


def _replacing(send: Send, statuses: frozenset[int], answer: Callable[[], Response],
               keep: Callable[[bytes], bool] | None = None) -> Send:
    """A `send` that replaces every answer of the app with one of `statuses`, headers and body,
    with `answer()`; but for the headers `keep` names (by default the CORS headers) that the
    app's answer had: without them a browser hides the replacement's words behind a CORS error."""
    kept_header = keep or _is_cors_header
    replacement: Response | None = None

    async def replaced(message: Message) -> None:
        nonlocal replacement
        if message["type"] == "http.response.start" and message["status"] in statuses:
            replacement = answer()
            kept = [(name, value) for name, value in message["headers"] if kept_header(name)]
            await send({**message, "status": replacement.status_code, "headers": replacement.raw_headers + kept})
        elif replacement is not None and message["type"] == "http.response.body":
            if not message.get("more_body", False):
                await send({"type": "http.response.body", "body": replacement.body})
        else:
            await send(message)

    return replaced


def _is_cors_header(name: bytes) -> bool:
    lowered = name.lower()
    return lowered.startswith(b"access-control-") or lowered == b"vary"


def _is_challenge_or_cors_header(name: bytes) -> bool:
    return _is_cors_header(name) or name.lower() == b"www-authenticate"


class JsonRpcBodyCheck:
    """Pure ASGI, after authentication: one JSON-RPC message per POST, said in short words."""

    def __init__(self, app: ASGIApp, *, mcp_path: str) -> None:
        self.app = app
        self.mcp_path = mcp_path.rstrip("/") or "/"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        user = scope.get("user")
        checked = (scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == self.mcp_path
                   and user is not None and getattr(user, "is_authenticated", False))
        if not checked:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            await _json_response(send, 413, {"error": "the request body is larger than 4 MiB"})
            return
        problem = describe_message_problem(body)
        if problem is not None:
            code, message = problem
            await _json_response(send, 400, {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}})
            return
        await self.app(scope, _replay(body, receive), send)


def describe_message_problem(body: bytes) -> tuple[int, str] | None:
    """The JSON-RPC error code and message for a body that is not one message; None if it is."""
    try:
        message = json.loads(body)
    except RecursionError:
        # The C parser recurses once per level and stops cleanly at the interpreter's limit.
        return -32700, TOO_DEEP
    except (ValueError, UnicodeDecodeError):
        return -32700, "Parse error: the request body is not valid JSON"
    if nests_deeper(message, MAX_JSON_DEPTH):
        return -32700, TOO_DEEP
    if isinstance(message, list):
        return -32600, "Invalid Request: JSON-RPC batches are not supported; send one message per request"
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return -32600, 'Invalid Request: the body must be one JSON-RPC 2.0 object with "jsonrpc": "2.0"'
    if "method" in message and not isinstance(message["method"], str):
        return -32600, 'Invalid Request: "method" must be a string'
    if "method" not in message and "id" not in message:
        return -32600, 'Invalid Request: a request needs a "method", a response an "id"'
    if "params" in message and not isinstance(message["params"], dict | list):
        return -32602, 'Invalid params: "params" must be an object'
    return None


def nests_deeper(document: object, limit: int) -> bool:
    """Whether the arrays and objects of a parsed JSON document nest deeper than `limit`,
    walked with a stack of its own rather than recursion."""
    pending: list[tuple[object, int]] = [(document, 1)]
    while pending:
        node, depth = pending.pop()
        if not isinstance(node, CONTAINERS):
            continue
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        pending.extend((child, depth + 1) for child in children if isinstance(child, CONTAINERS))
    return False


async def _read_body(receive: Receive) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The buffered body first; then the real channel, which reports the client leaving."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _json_response(send: Send, status: int, document: object) -> None:
    body = json.dumps(document).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
