"""docs/auth.md says only what holds: every configuration block in it loads with the server's own
loader, and each provider's example fits that provider's published discovery document
(tests/fixtures/openid/, whose README says where each came from): its issuer, its scopes, and
what oauth.py needs of a provider. Each document is also served on loopback as the provider
would serve it and handed to oauth.auth_provider, so FastMCP's own discovery check reads it."""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from api_keys import secret_sha256
from auth import NamedTokenVerifier
from config import OAuthConfig, RoleConfig, Settings, load_settings, new_secret
from oauth import CALLBACK_PATH, auth_provider
from tests.support import ROOT

DOC = ROOT / "docs" / "auth.md"
FIXTURES = ROOT / "tests" / "fixtures" / "openid"
# A configuration block of the page: a marker naming its provider, then a fenced JSON block.
CONFIG_BLOCK = re.compile(r"<!-- config ([a-z]+) -->\n```json\n(.*?)\n```", re.DOTALL)
GUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# The provider each marker names: its fixture, and the parts of the fixture's issuer that are
# each deployment's own (the literal as published, and what may stand in its place).
PROVIDERS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "keycloak": ("keycloak.json", [("http://158.39.75.110", r"https://[^/?#]+"), ("naic-monitor", r"[^/?#]+")]),
    "entra": ("entra-organizations.json", [("{tenantid}", GUID)]),
    "google": ("google.json", []),
    "dex": ("dex.json", []),
}
# Providers that do not publish code_challenge_methods_supported (docs/auth.md says so for each).
PKCE_UNPUBLISHED = {"entra-organizations.json"}


def config_blocks() -> list[tuple[str, dict[str, Any]]]:
    """Every configuration block of docs/auth.md: its provider and its JSON."""
    return [(provider, json.loads(block)) for provider, block in CONFIG_BLOCK.findall(DOC.read_text())]


# Each configuration block as a test case, named by its provider and its place in the page.
EXAMPLES = [pytest.param(provider, document, id=f"{provider}-{place}")
            for place, (provider, document) in enumerate(config_blocks(), start=1)]


def fixture(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return document


def load(tmp_path: Path, document: dict[str, Any]) -> Settings:
    """`document` as a config file of its own with one API key, through the server's loader."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**document, "tokens": {"ci": {"secret_sha256": secret_sha256(new_secret())}}}))
    return load_settings(path)


def test_every_json_block_of_the_page_is_a_configuration_that_is_checked() -> None:
    blocks = re.findall(r"```json\n", DOC.read_text())
    examples = config_blocks()
    assert len(examples) == len(blocks), "a json block without a `<!-- config PROVIDER -->` marker"
    assert {provider for provider, _ in examples} == set(PROVIDERS)


@pytest.mark.parametrize(("provider", "document"), EXAMPLES)
def test_each_example_loads_with_the_servers_loader(tmp_path: Path, provider: str, document: dict[str, Any]) -> None:
    settings = load(tmp_path, document)
    assert settings.oauth is not None and settings.roles, provider
    assert settings.oauth.base_url.startswith("https://") and settings.oauth.issuer.startswith("https://")
    assert settings.oauth.state_dir == str(tmp_path / "oauth-state")


@pytest.mark.parametrize(("provider", "document"), EXAMPLES)
def test_each_examples_issuer_and_scopes_are_its_providers(provider: str, document: dict[str, Any]) -> None:
    name, own_parts = PROVIDERS[provider]
    published = fixture(name)
    pattern = re.escape(published["issuer"])
    for literal, stand_in in own_parts:
        assert literal in published["issuer"], (name, literal)
        pattern = pattern.replace(re.escape(literal), stand_in)
    assert re.fullmatch(pattern, document["oauth"]["issuer"]), (document["oauth"]["issuer"], pattern)
    scopes = OAuthConfig(**document["oauth"]).scopes
    assert "openid" in scopes
    assert set(scopes) <= set(published["scopes_supported"]), set(scopes) - set(published["scopes_supported"])


@pytest.mark.parametrize("name", sorted(path.name for path in FIXTURES.glob("*.json")))
def test_each_published_document_offers_what_the_sign_in_needs(name: str) -> None:
    """The authorization code flow, ID tokens FastMCP's check accepts (RS256 alone), the client
    authentication it sends (HTTP Basic, authlib's default), PKCE S256 wherever the provider
    says which methods it takes, and refresh tokens wherever it lists its grants."""
    document = fixture(name)
    for field in ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri"):
        assert document[field].startswith("http"), field
    assert "code" in document["response_types_supported"]
    assert document["subject_types_supported"]
    assert "RS256" in document["id_token_signing_alg_values_supported"]
    assert "client_secret_basic" in document.get("token_endpoint_auth_methods_supported", ["client_secret_basic"])
    if "code_challenge_methods_supported" in document:
        assert "S256" in document["code_challenge_methods_supported"]
    else:
        assert name in PKCE_UNPUBLISHED, f"{name} publishes no PKCE methods: say what happens in docs/auth.md"
    if "grant_types_supported" in document:
        assert {"authorization_code", "refresh_token"} <= set(document["grant_types_supported"])


def test_the_fixtures_readme_names_where_each_document_came_from() -> None:
    readme = (FIXTURES / "README.md").read_text()
    for path in FIXTURES.glob("*.json"):
        assert f"`{path.name}`" in readme, path.name
    assert {PROVIDERS[provider][0] for provider in PROVIDERS} == {path.name for path in FIXTURES.glob("*.json")}
    assert not any("code_challenge_methods_supported" in fixture(name) for name in PKCE_UNPUBLISHED)


@contextlib.contextmanager
def discovery_server(document: bytes) -> Iterator[str]:
    """A loopback HTTP server answering every GET with `document`, as a provider's
    /.well-known/openid-configuration; yields its issuer URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(document)))
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("name", sorted(path.name for path in FIXTURES.glob("*.json")))
def test_each_published_document_is_taken_by_the_sign_in(tmp_path: Path, name: str) -> None:
    """What the server does at start-up with `oauth`: read the document (FastMCP refuses one
    without the fields OpenID discovery requires) and build the routes. /revoke exists exactly
    when the provider publishes a revocation endpoint, as docs/auth.md says."""
    with discovery_server((FIXTURES / name).read_bytes()) as issuer:
        oauth = OAuthConfig(issuer=issuer, client_id="nmap-mcp", client_secret=new_secret(),
                            base_url="https://nmap.example.com", state_dir=str(tmp_path / "oauth-state"))
        provider = auth_provider(oauth, {"staff": RoleConfig(groups=["staff"])}, NamedTokenVerifier({}),
                                 lambda _person: None)
    paths = {getattr(route, "path", "") for route in provider.get_routes("/mcp")}
    assert {CALLBACK_PATH, "/authorize", "/token", "/register", "/.well-known/oauth-protected-resource/mcp"} <= paths
    assert ("/revoke" in paths) == ("revocation_endpoint" in fixture(name))


def test_the_client_secret_can_come_from_the_environment_alone(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/auth.md: NMAP_MCP_OAUTH='{"client_secret": "..."}' is merged into the file's `oauth`."""
    _, document = config_blocks()[0]
    secret = new_secret()
    monkeypatch.setenv("NMAP_MCP_OAUTH", json.dumps({"client_secret": secret}))
    without = {key: value for key, value in document["oauth"].items() if key != "client_secret"}
    settings = load(tmp_path, {**document, "oauth": without})
    assert settings.oauth is not None and settings.oauth.client_secret.get_secret_value() == secret
    assert settings.oauth.issuer == without["issuer"]
