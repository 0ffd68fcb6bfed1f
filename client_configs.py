"""Ready-to-paste MCP client configurations, printed by the server at start-up.

Each client gets both auth styles: the `Authorization: Bearer` header and the `?token=`
URL. The secret is a placeholder unless the operator asked to see it.
"""

from __future__ import annotations

import json

SERVER_NAME = "nmap"


def render_client_configs(url: str, secret: str) -> str:
    """Every supported client's configuration, header style and URL-token style."""
    sections = []
    for title, header_style, url_style in _snippets(url, secret):
        sections.append(f"--- {title} ---\n# Bearer header\n{header_style}\n# Token in the URL\n{url_style}")
    return "\n\n".join(sections)


def _snippets(url: str, secret: str) -> list[tuple[str, str, str]]:
    token_url = f"{url}?token={secret}"
    headers = {"Authorization": f"Bearer {secret}"}
    return [
        (
            "Claude Code",
            f'claude mcp add --transport http {SERVER_NAME} {url} --header "Authorization: Bearer {secret}"',
            f'claude mcp add --transport http {SERVER_NAME} "{token_url}"',
        ),
        (
            "Cursor / Claude Desktop / Windsurf (mcp.json)",
            _json({"mcpServers": {SERVER_NAME: {"url": url, "headers": headers}}}),
            _json({"mcpServers": {SERVER_NAME: {"url": token_url}}}),
        ),
        (
            "VS Code (.vscode/mcp.json)",
            _json({"servers": {SERVER_NAME: {"type": "http", "url": url, "headers": headers}}}),
            _json({"servers": {SERVER_NAME: {"type": "http", "url": token_url}}}),
        ),
        (
            "Gemini CLI (~/.gemini/settings.json)",
            _json({"mcpServers": {SERVER_NAME: {"httpUrl": url, "headers": headers}}}),
            _json({"mcpServers": {SERVER_NAME: {"httpUrl": token_url}}}),
        ),
        (
            "Codex (~/.codex/config.toml)",
            f'[mcp_servers.{SERVER_NAME}]\nurl = "{url}"\nhttp_headers = {{ "Authorization" = "Bearer {secret}" }}',
            f'[mcp_servers.{SERVER_NAME}]\nurl = "{token_url}"',
        ),
        (
            "DeepSOC / Cherry Studio",
            _json({"mcpServers": {SERVER_NAME: _deepsoc(url) | {"headers": headers}}}),
            _json({"mcpServers": {SERVER_NAME: _deepsoc(token_url)}}),
        ),
    ]


def _deepsoc(base_url: str) -> dict[str, object]:
    return {
        "name": "Nmap Scanner",
        "type": "streamableHttp",
        "description": "nmap port scans over MCP",
        "isActive": True,
        "baseUrl": base_url,
    }


def _json(document: dict[str, object]) -> str:
    return json.dumps(document, indent=2)
