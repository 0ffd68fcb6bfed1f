"""Ready-to-paste MCP client configurations: `--print-config CLIENT` and the start-up banner.

Each client gets one paste in the shape its own documentation gives (the page is cited next
to each client below). Where a client can both reach the running server over Streamable HTTP
and start nmap-mcp itself over stdio, the paste holds both: the remote entry under "nmap" and
the stdio one under "nmap-local", so one paste works either way and the unwanted entry is
deleted by hand. ChatGPT, DeepSOC and Cherry Studio get the remote entry alone: a ChatGPT
connector takes nothing but a URL, DeepSOC runs no local processes, and Cherry Studio's JSON
import accepts one server at a time.

`local_only` is for a machine where no server runs (a laptop with `--init` and `--stdio`):
the stdio entry alone, since the remote one would name a server that is not there.

The secret goes into an Authorization header wherever the client can send one. Only the
ChatGPT connector, which cannot, carries it as `?token=` in its URL. The caller passes the
real secret or the placeholder `<TOKEN>`.

`sign_in` is for a server people sign in to (oauth.py, docs/auth.md): the clients that take
only OAuth for a remote server (ChatGPT's connector) or sign in by themselves (Claude Desktop
through mcp-remote) get the bare URL and sign their person in through the browser; the others
keep the API key, which works beside sign-in.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from urllib.parse import quote

SERVER_NAME = "nmap"
LOCAL_SERVER_NAME = "nmap-local"
DESCRIPTION = "nmap port scans over MCP"
# The release tested against nmap-mcp (shared docs/clients.md); pinned so a paste keeps working.
MCP_REMOTE = "mcp-remote@0.15.1"

JsonDocument = dict[str, object]
TomlValue = str | list[str] | dict[str, str]


class UnknownClient(ValueError):
    """The client name is not one of CLIENTS (or, local_only, of LOCAL_CLIENTS)."""


@dataclass(frozen=True)
class _Endpoint:
    url: str
    secret: str
    stdio_command: tuple[str, ...]
    local_only: bool = False
    sign_in: bool = False

    @property
    def bearer(self) -> str:
        return f"Bearer {self.secret}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": self.bearer}

    @property
    def token_url(self) -> str:
        # `<` and `>` stay as they are so that the `<TOKEN>` placeholder reads as one; the
        # server's query parsing decodes whatever else quote() escapes.
        return f"{self.url}?token={quote(self.secret, safe='<>')}"

    @property
    def stdio_entry(self) -> dict[str, str | list[str]]:
        return {"command": self.stdio_command[0], "args": list(self.stdio_command[1:])}


@dataclass(frozen=True)
class _Client:
    title: str
    where: str
    render: Callable[[_Endpoint], JsonDocument | str]
    # Whether its paste holds the stdio entry too.
    local: bool = True


def _both(endpoint: _Endpoint, remote: Mapping[str, object], local: Mapping[str, object],
          key: str = "mcpServers") -> JsonDocument:
    entries = {} if endpoint.local_only else {SERVER_NAME: remote}
    return {key: entries | {LOCAL_SERVER_NAME: local}}


def _claude_code(endpoint: _Endpoint) -> str:
    remote = ["claude", "mcp", "add", "--transport", "http", SERVER_NAME, endpoint.url]
    remote += ["--header", f"Authorization: {endpoint.bearer}"]
    local = ["claude", "mcp", "add", LOCAL_SERVER_NAME, "--", *endpoint.stdio_command]
    return "\n".join(shlex.join(line) for line in ([] if endpoint.local_only else [remote]) + [local])


def _claude_desktop(endpoint: _Endpoint) -> JsonDocument:
    # The header value travels in an environment variable because Claude Desktop on Windows
    # splits arguments at spaces, as mcp-remote's README explains.
    # http-only: mcp-remote's default falls back to the old SSE transport after a refusal and
    # reports that fallback's 405 instead of the server's reason for refusing.
    # With sign-in, mcp-remote signs its person in through the browser itself.
    header = [] if endpoint.sign_in else ["--header", "Authorization:${AUTH_HEADER}"]
    args = ["-y", MCP_REMOTE, endpoint.url, *header, "--transport", "http-only"]
    if endpoint.url.startswith("http://"):
        args.append("--allow-http")  # mcp-remote refuses plain HTTP to any host but localhost without it
    remote: dict[str, object] = {"command": "npx", "args": args}
    if not endpoint.sign_in:
        remote["env"] = {"AUTH_HEADER": endpoint.bearer}
    return _both(endpoint, remote, endpoint.stdio_entry)


def _url_and_headers(url_key: str) -> Callable[[_Endpoint], JsonDocument]:
    """The common `mcpServers` file: clients differ only in the key that holds the URL."""

    def render(endpoint: _Endpoint) -> JsonDocument:
        return _both(endpoint, {url_key: endpoint.url, "headers": endpoint.headers}, endpoint.stdio_entry)

    return render


def _vscode(endpoint: _Endpoint) -> JsonDocument:
    remote = {"type": "http", "url": endpoint.url, "headers": endpoint.headers}
    return _both(endpoint, remote, {"type": "stdio", **endpoint.stdio_entry}, key="servers")


def _codex(endpoint: _Endpoint) -> str:
    remote: dict[str, TomlValue] = {"url": endpoint.url, "http_headers": endpoint.headers}
    tables = {} if endpoint.local_only else {f"mcp_servers.{SERVER_NAME}": remote}
    return _toml(tables | {f"mcp_servers.{LOCAL_SERVER_NAME}": endpoint.stdio_entry})


def _chatgpt(endpoint: _Endpoint) -> JsonDocument:
    # The fields of the connector form; its authentication choice is OAuth or none, so without
    # sign-in the secret rides in the URL (the legacy form MCP 2026-07-28 forbids).
    return {
        "connector_name": SERVER_NAME,
        "description": DESCRIPTION,
        "connector_url": endpoint.url if endpoint.sign_in else endpoint.token_url,
        "authentication": "OAuth" if endpoint.sign_in else "No authentication",
    }


def _streamable_http_import(endpoint: _Endpoint) -> JsonDocument:
    server = {"name": SERVER_NAME, "type": "streamableHttp", "description": DESCRIPTION, "isActive": True}
    return {"mcpServers": {SERVER_NAME: server | {"baseUrl": endpoint.url, "headers": endpoint.headers}}}


_CLIENTS: dict[str, _Client] = {
    # https://code.claude.com/docs/en/mcp
    "claude-code": _Client("Claude Code", "run in a terminal", _claude_code),
    # stdio: https://modelcontextprotocol.io/docs/develop/connect-local-servers
    # remote through mcp-remote: https://github.com/geelen/mcp-remote#custom-headers
    "claude-desktop": _Client("Claude Desktop", "claude_desktop_config.json", _claude_desktop),
    # https://cursor.com/docs/mcp
    "cursor": _Client("Cursor", "~/.cursor/mcp.json", _url_and_headers("url")),
    # https://docs.windsurf.com/windsurf/cascade/mcp
    "windsurf": _Client("Windsurf", "~/.codeium/windsurf/mcp_config.json", _url_and_headers("serverUrl")),
    # https://code.visualstudio.com/docs/copilot/reference/mcp-configuration
    "vscode": _Client("VS Code", ".vscode/mcp.json", _vscode),
    # https://geminicli.com/docs/tools/mcp-server/
    "gemini": _Client("Gemini CLI", "~/.gemini/settings.json", _url_and_headers("httpUrl")),
    # https://developers.openai.com/codex/mcp
    "codex": _Client("Codex", "~/.codex/config.toml", _codex),
    # https://api.portscan.com/mcp's client list and https://sam-mesh.dev/docs/integrations/antigravity/
    # (serverUrl with headers); no page of Antigravity's own was found
    "antigravity": _Client("Antigravity", "~/.gemini/antigravity/mcp_config.json", _url_and_headers("serverUrl")),
    # https://developers.openai.com/apps-sdk/deploy/connect-chatgpt
    "chatgpt": _Client("ChatGPT", "Settings > Connectors > Create, in developer mode; needs public HTTPS", _chatgpt,
                       local=False),
    # https://lmstudio.ai/docs/app/mcp
    "lm-studio": _Client("LM Studio", "Program > Install > Edit mcp.json", _url_and_headers("url")),
    # https://github.com/wzfukui/nmap-mcp-http (its DeepSOC setup, Bearer Token form)
    "deepsoc": _Client("DeepSOC", "MCP server settings", _streamable_http_import, local=False),
    # https://github.com/CherryHQ/cherry-studio/blob/main/src/renderer/src/pages/settings/MCPSettings/AddMcpServerModal.tsx
    "cherry-studio": _Client(
        "Cherry Studio", "Settings > MCP Servers > Add > Import from JSON", _streamable_http_import, local=False
    ),
}

CLIENTS: tuple[str, ...] = tuple(_CLIENTS)
# The clients whose paste holds the stdio entry, the only ones `local_only` serves.
LOCAL_CLIENTS: tuple[str, ...] = tuple(name for name, client in _CLIENTS.items() if client.local)


def render_client_config(client: str, *, url: str, secret: str, stdio_command: Sequence[str],
                         local_only: bool = False, sign_in: bool = False) -> str:
    """What `nmap-mcp --print-config CLIENT` prints: the client's paste, formatted.

    JSON for every client but codex (TOML) and claude-code (two `claude mcp add` command
    lines, remote then stdio). `stdio_command` is the argv that starts the stdio server;
    `local_only`: the stdio entry alone. Raises UnknownClient for a name not in CLIENTS, or
    with `local_only` not in LOCAL_CLIENTS.
    """
    if client not in _CLIENTS:
        raise UnknownClient(f"unknown client '{client}': choose one of {', '.join(CLIENTS)}")
    if local_only and client not in LOCAL_CLIENTS:
        raise UnknownClient(f"{_CLIENTS[client].title} cannot start a local program: it reaches only a running "
                            f"server; for --stdio choose one of {', '.join(LOCAL_CLIENTS)}")
    endpoint = _endpoint(url, secret, stdio_command)
    return _text(_CLIENTS[client].render(replace(endpoint, local_only=local_only, sign_in=sign_in)), indent=2)


def render_client_configs(url: str, secret: str, stdio_command: Sequence[str], *, sign_in: bool = False) -> str:
    """Every client's paste for the start-up banner, each under a title, JSON on one line."""
    endpoint = replace(_endpoint(url, secret, stdio_command), sign_in=sign_in)
    sections = []
    for name, client in _CLIENTS.items():
        title = f"--- {client.title} ({client.where}; --print-config {name}) ---"
        sections.append(f"{title}\n{_text(client.render(endpoint), indent=None)}")
    return "\n".join(sections)


def _endpoint(url: str, secret: str, stdio_command: Sequence[str]) -> _Endpoint:
    if not stdio_command:
        raise ValueError("stdio_command needs at least the program that starts the stdio server")
    return _Endpoint(url, secret, tuple(stdio_command))


def _text(document: JsonDocument | str, *, indent: int | None) -> str:
    return document if isinstance(document, str) else json.dumps(document, indent=indent)


def _toml(tables: Mapping[str, Mapping[str, TomlValue]]) -> str:
    blocks = []
    for table, keys in tables.items():
        lines = [f"[{table}]", *(f"{key} = {_toml_value(value)}" for key, value in keys.items())]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _toml_value(value: TomlValue) -> str:
    if isinstance(value, str):
        # A JSON string is a TOML basic string, except that TOML also forbids a raw DEL.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return "{ " + ", ".join(f"{_toml_value(key)} = {_toml_value(item)}" for key, item in value.items()) + " }"
