"""client_configs.py: each client's paste parses and has the shape that client's documentation gives."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from urllib.parse import parse_qs, urlsplit

import pytest

from client_configs import (
    CLIENTS,
    LOCAL_CLIENTS,
    MCP_REMOTE,
    UnknownClient,
    render_client_config,
    render_client_configs,
)
from tests.support import ROOT

URL = "http://127.0.0.1:3004/mcp"
SECRET = "s3cret-" + "x" * 30
# Quotes, a backslash, a dollar, a space, `&`, `#`, `+`, a DEL and a non-ASCII letter: each
# format's quoting has to carry it through unchanged.
AWKWARD = "a\"b'c\\d$e f&g#h+i\x7fj-é" + "x" * 20
STDIO = ("/opt/nmap mcp/.venv/bin/python", "/opt/nmap mcp/server.py", "--stdio", "-c", "/etc/nmap-mcp.json")
LOCAL = {"command": STDIO[0], "args": list(STDIO[1:])}
# What docs/clients.md shows: nmap-mcp installed by pipx, by its absolute path.
DOC_STDIO = ["/home/you/.local/bin/nmap-mcp", "--stdio", "-c", "/home/you/.config/nmap-mcp.json"]
HEADER_CLIENTS = [client for client in CLIENTS if client != "chatgpt"]


def render(client: str, secret: str = SECRET, url: str = URL) -> str:
    return render_client_config(client, url=url, secret=secret, stdio_command=STDIO)


def parse(client: str, text: str) -> object:
    if client == "codex":
        return tomllib.loads(text)
    if client == "claude-code":
        return [shlex.split(line) for line in text.splitlines()]
    return json.loads(text)


def credential(client: str, document: object) -> str:
    """The value that carries the secret, read from where the client's documentation puts it."""
    doc: object = document
    match client:
        case "claude-code":
            assert isinstance(doc, list)
            return str(doc[0][doc[0].index("--header") + 1])
        case "claude-desktop":
            path = ["mcpServers", "nmap", "env", "AUTH_HEADER"]
        case "vscode":
            path = ["servers", "nmap", "headers", "Authorization"]
        case "codex":
            path = ["mcp_servers", "nmap", "http_headers", "Authorization"]
        case "chatgpt":
            path = ["connector_url"]
        case _:
            path = ["mcpServers", "nmap", "headers", "Authorization"]
    for key in path:
        assert isinstance(doc, dict)
        doc = doc[key]
    assert isinstance(doc, str)
    return doc


def strings(document: object) -> list[str]:
    """Every string in a parsed document, keys included."""
    if isinstance(document, str):
        return [document]
    if isinstance(document, dict):
        return [s for key, value in document.items() for s in [*strings(key), *strings(value)]]
    if isinstance(document, list):
        return [s for item in document for s in strings(item)]
    return []


def test_clients_come_in_the_documented_order() -> None:
    assert CLIENTS == (
        "claude-code", "claude-desktop", "cursor", "windsurf", "vscode", "gemini", "codex",
        "antigravity", "chatgpt", "lm-studio", "deepsoc", "cherry-studio",
    )


def test_claude_code_adds_the_remote_server_with_a_header_and_the_local_one_over_stdio() -> None:
    remote, local = [shlex.split(line) for line in render("claude-code").splitlines()]
    assert remote == ["claude", "mcp", "add", "--transport", "http", "nmap", URL,
                      "--header", f"Authorization: Bearer {SECRET}"]
    assert local == ["claude", "mcp", "add", "nmap-local", "--", *STDIO]


@pytest.mark.parametrize(("url", "allow_http"), [(URL, True), ("https://scanner.example.net/mcp", False)])
def test_claude_desktop_reaches_the_server_through_mcp_remote(url: str, allow_http: bool) -> None:
    servers = json.loads(render("claude-desktop", url=url))["mcpServers"]
    remote = servers["nmap"]
    assert remote["command"] == "npx" and remote["env"] == {"AUTH_HEADER": f"Bearer {SECRET}"}
    # mcp-remote's documented form: the header with no space after the colon, its value in env.
    assert remote["args"][:7] == ["-y", "mcp-remote@0.15.1", url, "--header", "Authorization:${AUTH_HEADER}",
                                  "--transport", "http-only"]
    assert ("--allow-http" in remote["args"]) is allow_http
    assert servers["nmap-local"] == LOCAL


@pytest.mark.parametrize(
    ("client", "container", "url_key", "kind"),
    [
        ("cursor", "mcpServers", "url", {}),
        ("windsurf", "mcpServers", "serverUrl", {}),
        ("vscode", "servers", "url", {"type": "http"}),
        ("gemini", "mcpServers", "httpUrl", {}),
        ("antigravity", "mcpServers", "serverUrl", {}),
        ("lm-studio", "mcpServers", "url", {}),
    ],
)
def test_json_clients_name_the_url_their_own_way(
    client: str, container: str, url_key: str, kind: dict[str, str]
) -> None:
    document = json.loads(render(client))
    assert list(document) == [container]
    servers = document[container]
    assert servers["nmap"] == kind | {url_key: URL, "headers": {"Authorization": f"Bearer {SECRET}"}}
    stdio_kind = {"type": "stdio"} if kind else {}
    assert servers["nmap-local"] == stdio_kind | LOCAL


def test_codex_uses_its_toml_tables_and_http_headers() -> None:
    document = tomllib.loads(render("codex"))
    assert document == {
        "mcp_servers": {
            "nmap": {"url": URL, "http_headers": {"Authorization": f"Bearer {SECRET}"}},
            "nmap-local": LOCAL,
        }
    }


def test_chatgpt_connector_gets_the_token_in_its_url() -> None:
    connector = json.loads(render("chatgpt"))
    assert connector["connector_name"] == "nmap" and connector["authentication"] == "No authentication"
    url = urlsplit(connector["connector_url"])
    assert url._replace(query="").geturl() == URL
    assert parse_qs(url.query) == {"token": [SECRET]}


@pytest.mark.parametrize("client", ["deepsoc", "cherry-studio"])
def test_streamable_http_imports_hold_one_server(client: str) -> None:
    servers = json.loads(render(client))["mcpServers"]
    # Cherry Studio's JSON import refuses a paste with more than one server.
    assert list(servers) == ["nmap"]
    server = servers["nmap"]
    assert server["type"] == "streamableHttp" and server["baseUrl"] == URL and server["isActive"] is True
    assert server["headers"] == {"Authorization": f"Bearer {SECRET}"} and server["name"] == "nmap"


@pytest.mark.parametrize("client", CLIENTS)
def test_the_secret_stands_only_where_the_client_expects_it(client: str) -> None:
    document = parse(client, render(client))
    assert [s for s in strings(document) if SECRET in s] == [credential(client, document)]


@pytest.mark.parametrize("client", HEADER_CLIENTS)
def test_clients_with_headers_never_get_the_secret_in_a_url(client: str) -> None:
    text = render(client)
    assert "token=" not in text
    urls = [s for s in strings(parse(client, text)) if "://" in s]
    assert urls == [URL]
    expected = f"Authorization: Bearer {SECRET}" if client == "claude-code" else f"Bearer {SECRET}"
    assert credential(client, parse(client, text)) == expected


@pytest.mark.parametrize("client", CLIENTS)
def test_awkward_secrets_survive_each_format(client: str) -> None:
    value = credential(client, parse(client, render(client, secret=AWKWARD)))
    if client == "chatgpt":
        assert parse_qs(urlsplit(value).query) == {"token": [AWKWARD]}
    else:
        assert value.endswith(f"Bearer {AWKWARD}")


@pytest.mark.parametrize("client", CLIENTS)
def test_the_token_placeholder_reads_as_one(client: str) -> None:
    value = credential(client, parse(client, render(client, secret="<TOKEN>")))
    assert value.endswith("?token=<TOKEN>" if client == "chatgpt" else "Bearer <TOKEN>")


def test_unknown_client_names_the_choices() -> None:
    with pytest.raises(UnknownClient, match="choose one of claude-code, claude-desktop"):
        render("claude")


def test_a_stdio_command_is_required() -> None:
    with pytest.raises(ValueError, match="stdio_command"):
        render_client_config("cursor", url=URL, secret=SECRET, stdio_command=[])


def test_banner_lists_every_client_compactly_with_the_same_content() -> None:
    banner = render_client_configs(URL, "<TOKEN>", STDIO)
    titles = re.findall(r"^--- (.+) \((.+); --print-config ([a-z-]+)\) ---$", banner, flags=re.MULTILINE)
    assert [name for _, _, name in titles] == list(CLIENTS)
    bodies = re.split(r"^--- .+ ---\n", banner, flags=re.MULTILINE)[1:]
    for (_, _, client), body in zip(titles, bodies, strict=True):
        if client not in ("codex", "claude-code"):
            assert len(body.strip().splitlines()) == 1
        assert parse(client, body) == parse(client, render(client, secret="<TOKEN>"))


def test_docs_snippets_are_what_print_config_prints() -> None:
    docs = (ROOT / "docs" / "clients.md").read_text()
    blocks = re.findall(r"<!-- print-config ([a-z-]+) -->\n```[a-z]*\n(.*?)\n```", docs, flags=re.DOTALL)
    assert [client for client, _ in blocks] == list(CLIENTS)
    for client, block in blocks:
        expected = render_client_config(client, url=URL, secret="<TOKEN>", stdio_command=DOC_STDIO)
        assert block == expected, client


@pytest.mark.parametrize("client", LOCAL_CLIENTS)
def test_local_only_prints_the_stdio_entry_alone(client: str) -> None:
    """The laptop flow: no server runs there, so no entry may name one."""
    text = render_client_config(client, url=URL, secret=SECRET, stdio_command=STDIO, local_only=True)
    assert URL not in text and SECRET not in text and "mcp-remote" not in text
    if client == "claude-code":
        assert shlex.split(text) == ["claude", "mcp", "add", "nmap-local", "--", *STDIO]
    elif client == "codex":
        assert tomllib.loads(text) == {"mcp_servers": {"nmap-local": LOCAL}}
    else:
        [entries] = json.loads(text).values()
        assert entries == {"nmap-local": ({"type": "stdio"} if client == "vscode" else {}) | LOCAL}


@pytest.mark.parametrize("client", sorted(set(CLIENTS) - set(LOCAL_CLIENTS)))
def test_local_only_refuses_a_client_that_cannot_start_a_program(client: str) -> None:
    with pytest.raises(UnknownClient, match="cannot start a local program"):
        render_client_config(client, url=URL, secret=SECRET, stdio_command=STDIO, local_only=True)
    assert set(LOCAL_CLIENTS) == set(CLIENTS) - {"chatgpt", "deepsoc", "cherry-studio"}


def test_with_sign_in_the_oauth_clients_get_the_bare_url_and_the_others_keep_their_key() -> None:
    url = "https://scan.example.test/mcp"
    chatgpt = json.loads(render_client_config("chatgpt", url=url, secret=SECRET, stdio_command=["nmap-mcp"],
                                              sign_in=True))
    assert chatgpt["connector_url"] == url and chatgpt["authentication"] == "OAuth"
    desktop = json.loads(render_client_config("claude-desktop", url=url, secret=SECRET, stdio_command=["nmap-mcp"],
                                              sign_in=True))["mcpServers"]["nmap"]
    assert desktop == {"command": "npx", "args": ["-y", MCP_REMOTE, url, "--transport", "http-only"]}
    cursor = json.loads(render_client_config("cursor", url=url, secret=SECRET, stdio_command=["nmap-mcp"],
                                             sign_in=True))["mcpServers"]["nmap"]
    assert cursor["headers"] == {"Authorization": f"Bearer {SECRET}"}
