"""A real OpenID provider for the sign-in tests (oidc-provider, run by Node.js from
tests/oidc), and a person signing in through it in a real browser.

The OAuth client side is done here by hand, step by step as RFC 6749 and the MCP
specification say (dynamic registration, authorization code with PKCE, token exchange),
so that each test can see every answer; tests/test_oauth.py also signs in with real MCP clients.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import secrets
import shutil
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.expected_conditions import staleness_of
from selenium.webdriver.support.ui import WebDriverWait

from tests.support import free_port, wait_until

PROVIDER_DIR = Path(__file__).with_name("oidc")
NODE = shutil.which("node") or "node"
CLIENT_ID = "nmap-mcp"
# The provider's secret for this server's client (a test value, never a real one).
CLIENT_SECRET = "test-client-secret-" + "x" * 24
# Who can sign in: login name -> the claims the provider gives.
PEOPLE = {
    "alice": {"email": "alice@example.test", "name": "Alice Scanner", "groups": ["scanners"]},
    "bob": {"email": "bob@example.test", "name": "Bob Scanner", "groups": ["scanners"]},
    "carol": {"email": "carol@example.test", "name": "Carol Auditor", "groups": ["auditors"]},
    "mallory": {"email": "mallory@elsewhere.test", "name": "Mallory", "groups": []},
    "erin": {"email": "erin@example.test", "name": "Erin Blue", "groups": ["blue-team"]},
    "frank": {"email": "frank@example.test", "name": "Frank Blue", "groups": ["blue-team"]},
}
STARTED_SECONDS = 60


@dataclass
class OpenIdProvider:
    """oidc-provider listening on a loopback port, configured for one server's client."""

    port: int
    redirect_uri: str
    ttl: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[str] | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_path: Path) -> None:
        config = {"issuer": self.issuer, "port": self.port, "people": PEOPLE, "ttl": self.ttl, "clients": [{
            "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "redirect_uris": [self.redirect_uri],
            "grant_types": ["authorization_code", "refresh_token"]}]}
        assert (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir(), (
            "oidc-provider is not installed: ./test.sh installs it (npm ci --prefix tests/oidc)")
        self.process = subprocess.Popen([NODE, str(PROVIDER_DIR / "provider.mjs"), json.dumps(config)],
                                        stdout=subprocess.PIPE, stderr=log_path.open("w"), text=True)
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready", log_path.read_text()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def oauth_config(self, base_url: str, **overrides: object) -> dict[str, object]:
        """The server's `oauth` config for this provider."""
        return {"issuer": self.issuer, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                "base_url": base_url, "scopes": ["openid", "email", "profile", "groups"], **overrides}


@contextlib.contextmanager
def openid_provider(directory: Path, server_port: int, **ttl: int) -> Iterator[OpenIdProvider]:
    """The provider for a server that will listen on `server_port`, stopped at the end."""
    provider = OpenIdProvider(free_port(), f"http://127.0.0.1:{server_port}/auth/callback", ttl)
    provider.start(directory / "openid-provider.log")
    try:
        yield provider
    finally:
        provider.stop()


class CallbackCatcher:
    """A client's loopback redirect URI: catches the query of the one redirect it gets."""

    def __init__(self) -> None:
        caught: dict[str, str] = {}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                caught.update(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"signed in")

            def log_message(self, *_: Any) -> None:
                pass

        self.caught = caught
        self._server = HTTPServer(("127.0.0.1", free_port()), Handler)
        self.uri = f"http://127.0.0.1:{self._server.server_port}/callback"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class SignedIn:
    """What an MCP client holds once a person signed in: its registration and tokens."""

    client_id: str
    client_secret: str | None
    tokens: dict[str, Any]

    @property
    def credentials(self) -> dict[str, str]:
        """What the client sends to identify itself at the token and revocation endpoints. A
        public client sends an empty secret: the MCP SDK's revocation request model (mcp 2.3)
        requires the field, although RFC 7009 has public clients send their client_id only."""
        return {"client_id": self.client_id, "client_secret": self.client_secret or ""}

    @property
    def access_token(self) -> str:
        return str(self.tokens["access_token"])


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def sign_in(browser: webdriver.Chrome, base_url: str, resource: str, login: str) -> SignedIn:
    """A person `login` signs an MCP client in to the server at `base_url` as the MCP
    authorization spec says: discovery, dynamic registration, authorization code with PKCE
    and `resource` in the browser (the server's consent page, the provider's login and
    consent), then the token exchange."""
    metadata = httpx.get(base_url + "/.well-known/oauth-authorization-server", timeout=10).json()
    catcher = CallbackCatcher()
    try:
        registered = httpx.post(metadata["registration_endpoint"], timeout=10, json={
            "client_name": "test client", "redirect_uris": [catcher.uri], "grant_types":
                ["authorization_code", "refresh_token"], "response_types": ["code"],
            "token_endpoint_auth_method": "none"}).raise_for_status().json()
        verifier, challenge = pkce_pair()
        state = secrets.token_urlsafe(16)
        browser.get(metadata["authorization_endpoint"] + "?" + urllib.parse.urlencode({
            "response_type": "code", "client_id": registered["client_id"], "redirect_uri": catcher.uri,
            "code_challenge": challenge, "code_challenge_method": "S256", "state": state, "resource": resource}))
        browse_through_sign_in(browser, login, lambda: "code" in catcher.caught or "error" in catcher.caught)
        assert catcher.caught.get("state") == state and "code" in catcher.caught, catcher.caught
        tokens = httpx.post(metadata["token_endpoint"], timeout=10, data={
            "grant_type": "authorization_code", "code": catcher.caught["code"], "redirect_uri": catcher.uri,
            "client_id": registered["client_id"], "code_verifier": verifier, "resource": resource,
        }).raise_for_status().json()
    finally:
        catcher.close()
    return SignedIn(registered["client_id"], registered.get("client_secret"), tokens)


def submit(driver: webdriver.Chrome, button: WebElement) -> None:
    """Click `button` once and wait for its page to go: a form posted twice (its CSRF token
    spent by the first post) would be refused."""
    button.click()
    WebDriverWait(driver, 30, poll_frequency=0.1).until(staleness_of(button))


def browse_through_sign_in(browser: webdriver.Chrome, login: str, done: Any) -> None:
    """Click through whatever page the browser is on until `done()`: the server's consent
    page (allow), the provider's login form (`login`, any password) and its consent page."""

    def finished() -> bool:
        # `done` may look for an element of the page the sign-in ends on: elsewhere it is not
        # there, or the page may go while it reads.
        try:
            return bool(done())
        except WebDriverException:
            return False

    def step(driver: webdriver.Chrome) -> bool:
        if finished():
            return True
        if driver.find_elements(By.NAME, "login"):
            driver.find_element(By.NAME, "login").send_keys(login)
            driver.find_element(By.NAME, "password").send_keys("any password")
            submit(driver, driver.find_element(By.CSS_SELECTOR, "button[type=submit]"))
            return False
        for button in driver.find_elements(By.CSS_SELECTOR, "button[type=submit]"):
            label = (button.text + " " + (button.get_attribute("value") or "")).lower()
            if any(word in label for word in ("allow", "approve", "continue", "authorize")):
                submit(driver, button)
                break
        return False

    try:
        # A page that goes while a step reads it (a redirect mid-read) fails that read: the
        # next poll reads the new page.
        WebDriverWait(browser, 60, poll_frequency=0.3, ignored_exceptions=(WebDriverException,)).until(step)
    except TimeoutException as e:
        page = re.sub(r"<style.*?</style>|<svg.*?</svg>|\s+", " ", browser.page_source, flags=re.S)[:3000]
        raise AssertionError(f"the sign-in never finished; the browser is at {browser.current_url}: {page}") from e
    assert wait_until(finished, 10, 0.1)
