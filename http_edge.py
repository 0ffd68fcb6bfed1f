"""What happens to an HTTP request before FastMCP sees it, and to some answers after.

The outermost layer, `EdgeMiddleware`, runs before Host/Origin checks, routing, redirects
and uvicorn's access log can see a request: it removes every token from the URL (any case of
`token`, and `access_token`, in the query string or as `;token=` path parameters), turns the
first one into an `Authorization: Bearer` header (when `?token=` is allowed), serves the
endpoint path with a trailing slash as the path itself (no redirect that drops the token),
and answers 401s in plain words instead of the OAuth advice FastMCP gives, which sends
clients into a re-registration flow that cannot work here.

`JsonRpcBodyCheck` runs after authentication: a batch, a body that is not JSON, or a body
that is not one JSON-RPC message gets a short JSON-RPC error instead of library internals.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from functools import partial
from urllib.parse import unquote

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SECRET_PARAMETERS = frozenset({"token", "access_token"})
# FastMCP refuses bodies over 4 MiB with 413; the body check buffers at most that much.
MAX_BODY_BYTES = 4 * 1024 * 1024
MISSING_TOKEN = (
    "no token: send 'Authorization: Bearer <token>' or add ?token=<token> to the URL. "
    "Tokens are the `secret` values under `tokens` in the server's config file."
)
WRONG_TOKEN = (
    "the token is not one of this server's tokens: compare it with the `secret` values under "
    "`tokens` in the server's config file. This server does not use OAuth; nothing can be registered."
)
QUERY_TOKEN_OFF = (
    "this server does not accept ?token= in the URL (allow_query_token is false): "
    "send 'Authorization: Bearer <token>' instead."
)
# The reason of each 401, as metrics count it.
REASON_NAMES = {MISSING_TOKEN: "missing_token", WRONG_TOKEN: "wrong_token", QUERY_TOKEN_OFF: "query_token_off"}
CORS_HEADERS = ["Authorization", "Content-Type", "Accept", "Mcp-Session-Id", "MCP-Protocol-Version",
                "Last-Event-ID"]


def edge_app(
    app: ASGIApp, *, mcp_path: str, allow_query_token: bool, cors_origins: Iterable[str],
    on_unauthorized: Callable[[str, str], None],
) -> ASGIApp:
    """The whole HTTP stack around FastMCP's app: edge first, then CORS (when configured).
    `on_unauthorized` is told the endpoint ('mcp' or 'other') and reason of every 401."""
    origins = list(cors_origins)
    if origins:
        app = CORSMiddleware(app, allow_origins=origins, allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                             allow_headers=CORS_HEADERS, expose_headers=["Mcp-Session-Id"], max_age=600)
    return EdgeMiddleware(app, mcp_path=mcp_path, allow_query_token=allow_query_token, on_unauthorized=on_unauthorized)


class EdgeMiddleware:
    """Pure ASGI; see the module docstring."""

    def __init__(
        self, app: ASGIApp, *, mcp_path: str, allow_query_token: bool, on_unauthorized: Callable[[str, str], None]
    ) -> None:
        self.app = app
        self.mcp_path = mcp_path.rstrip("/") or "/"
        self.allow_query_token = allow_query_token
        self.on_unauthorized = on_unauthorized

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        url_token = remove_url_secrets(scope)
        if scope["path"] == self.mcp_path + "/":
            scope["path"] = self.mcp_path
            scope["raw_path"] = self.mcp_path.encode()
        sent_header = _has_authorization(scope)
        if url_token and self.allow_query_token and not sent_header:
            scope["headers"] = [*scope["headers"], (b"authorization", b"Bearer " + url_token.encode("latin-1"))]
        if url_token and not self.allow_query_token and not sent_header:
            reason = QUERY_TOKEN_OFF
        else:
            reason = WRONG_TOKEN if (sent_header or url_token) else MISSING_TOKEN
        endpoint = "mcp" if scope["path"] == self.mcp_path else "other"
        refused = partial(self.on_unauthorized, endpoint, REASON_NAMES[reason])
        await self.app(scope, receive, _plain_unauthorized(send, reason, credentials=reason != MISSING_TOKEN,
                                                           refused=refused))


def remove_url_secrets(scope: Scope) -> str | None:
    """Remove token parameters from the query string and path, in place (uvicorn's access log
    reads this very scope); return the first token value found."""
    query, from_query = _without_secrets(scope.get("query_string", b"").decode("latin-1"), "&;", "&")
    path, from_path = _path_without_secrets(scope["path"])
    if from_query or from_path:
        scope["query_string"] = query.encode("latin-1")
        scope["path"] = path
        scope["raw_path"] = path.encode("utf-8")
    found = from_query + from_path
    return found[0] if found else None


def _without_secrets(text: str, separators: str, joiner: str) -> tuple[str, list[str]]:
    """`text` split on any of `separators`, rejoined with `joiner` without its token
    parameters; and the values of those."""
    parts, kept, secrets = [""], [], []
    for char in text:
        if char in separators:
            parts.append("")
        else:
            parts[-1] += char
    for part in parts:
        key, _, value = part.partition("=")
        if unquote(key).lower() in SECRET_PARAMETERS:
            secrets.append(unquote(value))
        elif part:
            kept.append(part)
    return joiner.join(kept), secrets


def _path_without_secrets(path: str) -> tuple[str, list[str]]:
    if ";" not in path:
        return path, []
    segments, secrets = [], []
    for segment in path.split("/"):
        name, _, parameters = segment.partition(";")
        kept, found = _without_secrets(parameters, ";", ";")
        secrets += found
        segments.append(f"{name};{kept}" if kept else name)
    return "/".join(segments), secrets


def _has_authorization(scope: Scope) -> bool:
    return any(name.lower() == b"authorization" for name, _ in scope["headers"])


def _plain_unauthorized(send: Send, reason: str, *, credentials: bool, refused: Callable[[], None]) -> Send:
    """A `send` that replaces the body and challenge of a 401 with ours (RFC 6750: a request
    without credentials gets a bare `Bearer` challenge, a refused token `invalid_token`), and
    calls `refused` when it does."""
    body = json.dumps({"error": "invalid_token" if credentials else "unauthorized", "error_description": reason})
    challenge = 'Bearer realm="nmap-mcp"'
    if credentials:
        challenge += ', error="invalid_token", error_description="the token was not accepted"'
    rewriting = False

    async def rewritten(message: Message) -> None:
        nonlocal rewriting
        if message["type"] == "http.response.start" and message["status"] == 401:
            rewriting = True
            refused()
            headers = [(b"www-authenticate", challenge.encode()), (b"content-type", b"application/json"),
                       (b"x-content-type-options", b"nosniff"), (b"content-length", str(len(body)).encode())]
            await send({**message, "headers": headers})
        elif rewriting and message["type"] == "http.response.body":
            if not message.get("more_body", False):
                await send({"type": "http.response.body", "body": body.encode()})
        else:
            await send(message)

    return rewritten


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
    except (ValueError, UnicodeDecodeError):
        return -32700, "Parse error: the request body is not valid JSON"
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
