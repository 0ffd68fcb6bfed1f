"""Webhooks: where they may go, and the sender as a client that a hostile receiver cannot hurt.

The URL and address rules are pure. The sender is tested against real HTTP(S) receivers on
127.41.0.0/16 (tests/receivers.py): names resolve through a NameTable the test controls, as
this machine has no DNS to repoint; the sender takes its resolver as a parameter, so what is
tested is the code that runs, with one resolver swapped for another. Each hostile receiver
reproduces a finding of the penetration test of issue 19: a body streamed without end, an
answer trickled, a redirect, an allowed name pointed at a loopback address, path tricks, and
secrets in DEBUG logs.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from config import ConfigError, Settings, load_settings
from logs import configure_logging
from tests.receivers import STREAM, TRICKLE, TRICKLE_HEADERS, NameTable, WebhookReceiver, tls_contexts
from tests.support import write_config
from webhooks import (
    DEADLINE_SECONDS,
    DELIVERY_HEADER,
    RESPONSE_BYTES,
    SIGNATURE_HEADER,
    Rules,
    Sender,
    WebhookRefused,
    check_addresses,
    check_url,
    resolve_host,
    shown,
    signature,
)

pytestmark = pytest.mark.anyio
NAME = "hooks.test"
DEADLINE_S = 1.0

# ---- pure: the URL and address rules ----------------------------------------------------------

ALLOWED = Rules(("https://hooks.example.com/nmap", "http://127.0.0.1:8080/", "http://127.0.0.2:8080/"),
                frozenset({ipaddress.ip_address("127.0.0.1")}))


@pytest.mark.parametrize("url", [
    "https://hooks.example.com/nmap", "https://hooks.example.com/nmap/alerts?key=1", "https://HOOKS.example.com:443/nmap",
    "http://127.0.0.1:8080/", "http://127.0.0.1:8080/any/path", "https://hooks.example.com/nmap/a-b_c~d.e/",
    "https://hooks.example.com/nmap?next=/../admin;x=%2e",
])
def test_webhook_urls_under_an_allowed_prefix_pass(url: str) -> None:
    assert check_url(url, ALLOWED) == url


@pytest.mark.parametrize("url", [
    "https://hooks.example.com.evil.com/nmap", "https://evil.com/hooks.example.com/nmap", "https://hooks.example.com/nmapx",
    "https://hooks.example.com/", "http://hooks.example.com/nmap", "https://hooks.example.com:8443/nmap",
    "https://hooks.example.com@evil.com/nmap", "https://x:y@hooks.example.com/nmap", "http://127.0.0.1:8081/",
    "http://localhost:8080/", "ftp://127.0.0.1:8080/", "http://[::1]:8080/", "not a url", "file:///etc/passwd",
])
def test_webhook_urls_elsewhere_are_refused(url: str) -> None:
    with pytest.raises(WebhookRefused):
        check_url(url, ALLOWED)


@pytest.mark.parametrize(("path", "reason"), [
    ("/nmap/../admin", "'.' or '..' segments"),
    ("/nmap/./x", "'.' or '..' segments"),
    ("/nmap/..;/admin", "';' parameters"),
    ("/nmap;jsessionid=1/x", "';' parameters"),
    ("/nmap/%2e%2e/admin", "percent-encoded characters"),
    ("/nmap/%2E%2E/admin", "percent-encoded characters"),
    ("/nmap/%252e%252e/admin", "percent-encoded characters"),
    ("/nmap/..%2fadmin", "percent-encoded characters"),
    ("/nmap/..%5cadmin", "percent-encoded characters"),
    ("/nmap/..\\admin", "backslashes"),
    ("/nmap//admin", "empty segments"),
    ("/nmap/a\"b", "characters other than"),
])
def test_paths_that_receivers_may_read_otherwise_are_refused_by_name(path: str, reason: str) -> None:
    """Each of these passed the old prefix check (`/hooks/..;/admin` is `/admin` to Tomcat,
    `%252e` becomes `..` to a receiver that decodes twice)."""
    with pytest.raises(WebhookRefused, match=re.escape("may not hold " + reason)):
        check_url("https://hooks.example.com" + path, ALLOWED)


def test_a_host_written_as_an_address_is_checked_when_the_schedule_is_saved() -> None:
    with pytest.raises(WebhookRefused, match=re.escape("127.0.0.2 is a loopback address not listed in webhook_")):
        check_url("http://127.0.0.2:8080/hook", ALLOWED)
    metadata = Rules(("http://169.254.169.254/", "http://metadata.google.internal/"))
    with pytest.raises(WebhookRefused, match=re.escape("169.254.169.254 is an address that no webhook may reach")):
        check_url("http://169.254.169.254/latest", metadata)
    with pytest.raises(WebhookRefused, match="cloud metadata host name"):
        check_url("http://metadata.google.internal/x", metadata)


@pytest.mark.parametrize(("addresses", "refusal"), [
    (["127.0.0.1"], None),
    (["8.8.8.8"], None),
    (["127.0.0.1", "8.8.8.8"], None),
    (["8.8.8.8", "127.0.0.2"], "resolves to 127.0.0.2, which is a loopback address not listed"),
    (["10.1.2.3"], "resolves to 10.1.2.3, which is a private address not listed"),
    (["fd12::1"], "resolves to fd12::1, which is a private address not listed"),
    (["::1"], "resolves to ::1, which is a loopback address not listed"),
    (["100.64.0.1"], "resolves to 100.64.0.1, which is a non-public address not listed"),
    *[([address], f"resolves to {ipaddress.ip_address(address)}, which is an address that no webhook may")
      for address in (
        "169.254.169.254", "169.254.1.1", "100.100.100.200", "168.63.129.16", "fd00:ec2::254", "fe80::1", "0.0.0.0",
        "::", "224.0.0.1", "ff02::1", "255.255.255.255", "::ffff:127.0.0.1", "::ffff:8.8.8.8", "::127.0.0.1",
        "64:ff9b::7f00:1", "2002:7f00:1::")],
])
def test_every_address_a_name_resolves_to_is_checked(addresses: list[str], refusal: str | None) -> None:
    found = [ipaddress.ip_address(address) for address in addresses]
    if refusal is None:
        check_addresses(NAME, found, ALLOWED)
        return
    with pytest.raises(WebhookRefused, match="^" + re.escape(f"{NAME} {refusal}")):
        check_addresses(NAME, found, ALLOWED)


def test_allowed_addresses_are_exact_addresses_off_the_deny_list(tmp_path: Path) -> None:
    for value, why in [("10.0.0.0/24", "is not one IP address"), ("receiver.lan", "is not one IP address"),
                       ("169.254.169.254", "that no webhook may reach"),
                       ("::ffff:10.0.0.5", "that no webhook may reach")]:
        config = write_config(tmp_path / "c.json", webhook_allowed_addresses=[value])
        with pytest.raises(ConfigError, match="'webhook_allowed_addresses': .*" + why):
            load_settings(config)
    loopback = write_config(tmp_path / "c.json", webhook_allowed_urls=["http://127.0.0.1:9/hooks"])
    with pytest.raises(ConfigError, match=re.escape("'webhook_allowed_urls': 127.0.0.1 is a loopback address not")):
        load_settings(loopback)
    allowed = write_config(tmp_path / "c.json", webhook_allowed_urls=["http://127.0.0.1:9/hooks"],
                           webhook_allowed_addresses=["127.0.0.1", "10.0.5.20"])
    assert load_settings(allowed).webhook_rules().addresses == {ipaddress.ip_address("127.0.0.1"),
                                                                ipaddress.ip_address("10.0.5.20")}


def test_a_configured_prefix_that_is_no_plain_http_url_stops_the_server(tmp_path: Path) -> None:
    for prefix, why in [("ftp://files", "must be an http:// or https:// URL"),
                        ("https://hooks.example.com/a/../b", "may not hold '.' or '..' segments")]:
        config = write_config(tmp_path / "c.json", webhook_allowed_urls=["https://hooks.example.com/nmap", prefix])
        with pytest.raises(ConfigError, match=r"'webhook_allowed_urls': .*" + why):
            load_settings(config)


def test_no_webhook_is_allowed_by_default_and_listings_hide_a_query() -> None:
    with pytest.raises(WebhookRefused, match="allows no webhooks"):
        check_url("https://hooks.example.com/nmap", Settings.model_construct().webhook_rules())
    assert shown("https://hooks.example.com/nmap?key=secret") == "https://hooks.example.com/nmap?…"


# ---- the sender against real receivers --------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    started = WebhookReceiver(statuses={"/hooks/moved": [302]}, stream_bytes=256 << 20)
    yield started
    started.stop()


def sender_to(receiver: WebhookReceiver, names: NameTable | None = None, verify: ssl.SSLContext | bool = True,
              deadline_s: float = DEADLINE_SECONDS) -> Sender:
    """A sender allowed to reach `receiver` by its address and, through `names`, by NAME."""
    urls = (receiver.url("/hooks"), receiver.url("/hostile/"), receiver.url("/", NAME))
    rules = Rules(urls, frozenset({ipaddress.ip_address(receiver.host)}))
    return Sender(rules, names.resolve if names else resolve_host, verify, deadline_s)


def rss_mib() -> float:
    """This process's resident memory now."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


async def test_a_delivery_goes_to_the_checked_address_with_the_name_in_its_host_header(
    receiver: WebhookReceiver,
) -> None:
    names = NameTable()
    names.point(NAME, receiver.host)
    sender = sender_to(receiver, names=names)
    assert await sender.post(receiver.url("/hooks/x?key=k1", NAME), b"{}", "s" * 43, "run-1") is None
    [(headers, body)] = receiver.posts("/hooks/x?key=k1")
    assert headers["Host"] == f"{NAME}:{receiver.port}" and body == b"{}"
    assert headers[SIGNATURE_HEADER] == signature("s" * 43, b"{}") and headers[DELIVERY_HEADER] == "run-1"
    assert names.asked == [NAME], "resolved once, by the sender's own resolver"


async def test_a_receiver_streaming_an_endless_body_costs_no_memory_and_is_no_success(
    receiver: WebhookReceiver,
) -> None:
    """Before: the answer was read whole (448 MiB streamed took the server from 136 to 1,040
    MiB) and the delivery was recorded sent. The receiver here would stream 256 MiB."""
    sender = sender_to(receiver)
    assert await sender.post(receiver.url("/hooks/warm-up"), b"{}", "s" * 43, "run-1") is None
    before = rss_mib()
    problem = await sender.post(receiver.url(STREAM), b"{}", "s" * 43, "run-1")
    grown = rss_mib() - before
    assert problem == f"the receiver's answer was longer than {RESPONSE_BYTES} bytes"
    assert grown < 16, f"resident memory grew {grown:.1f} MiB"
    assert receiver.streamed < 64 << 20, "the sender hung up instead of taking the stream in"


@pytest.mark.parametrize("path", [TRICKLE, TRICKLE_HEADERS])
async def test_an_answer_trickled_a_byte_at_a_time_meets_one_deadline_for_the_whole_attempt(
    receiver: WebhookReceiver, path: str,
) -> None:
    """Before: each byte restarted httpx's read timeout, so the attempt lasted as long as the
    receiver trickled (30 s here, forever for a hostile one)."""
    sender = sender_to(receiver, deadline_s=DEADLINE_S)
    started = time.monotonic()
    problem = await sender.post(receiver.url(path), b"{}", "s" * 43, "run-1")
    took = time.monotonic() - started
    assert problem == f"no whole answer within {DEADLINE_S:g} s (resolving, connecting, sending and reading)"
    assert DEADLINE_S <= took < DEADLINE_S + 2, f"the attempt took {took:.1f} s"


async def test_a_redirect_is_not_followed(receiver: WebhookReceiver) -> None:
    problem = await sender_to(receiver).post(receiver.url("/hooks/moved"), b"{}", "s" * 43, "run-1")
    assert problem == "the receiver answered 302, a redirect (not followed)"
    assert len(receiver.posts("/hooks/moved")) == 1 and receiver.posts("/elsewhere") == []


async def test_an_allowed_url_whose_name_resolves_to_loopback_is_refused_at_send_time(
    receiver: WebhookReceiver,
) -> None:
    """The URL is under an allowed prefix, but its name resolves to a loopback address that
    webhook_allowed_addresses does not list: nothing is sent, there or anywhere."""
    other = WebhookReceiver()
    try:
        names = NameTable()
        names.point(NAME, other.host)
        with pytest.raises(WebhookRefused, match=f"^{NAME} resolves to {other.host}, which is a loopback address not"):
            await sender_to(receiver, names=names).post(receiver.url("/hooks/x", NAME), b"{}", "s" * 43, "run-1")
        names.point(NAME, receiver.host, other.host)
        with pytest.raises(WebhookRefused, match=f"resolves to {other.host}"):
            await sender_to(receiver, names=names).post(receiver.url("/hooks/x", NAME), b"{}", "s" * 43, "run-1")
        by_address = Sender(Rules((other.url("/hooks"),)))
        with pytest.raises(WebhookRefused, match=f"^{other.host} is a loopback address not listed"):
            await by_address.post(other.url("/hooks/x"), b"{}", "s" * 43, "run-1")
        assert receiver.requests == [] == other.requests
    finally:
        other.stop()


async def test_https_to_a_pinned_address_keeps_sni_and_verifies_the_certificate_against_the_name(
    tmp_path: Path,
) -> None:
    """The connection goes to the checked address, yet TLS is done for the name: the receiver
    sees SNI hooks.test, and a certificate for another name is refused."""
    server_tls, trust = tls_contexts(tmp_path, NAME)
    receiver = WebhookReceiver(tls=server_tls)
    try:
        names = NameTable()
        names.point(NAME, receiver.host)
        names.point("other.test", receiver.host)
        sender = sender_to(receiver, names=names, verify=trust)
        assert await sender.post(receiver.url("/hooks/x", NAME), b"{}", "s" * 43, "run-1") is None
        assert receiver.server_names == [NAME] and receiver.posts("/hooks/x")[0][0]["Host"] == f"{NAME}:{receiver.port}"
        other = Sender(Rules((receiver.url("/", "other.test"),), sender.rules.addresses), names.resolve, trust)
        problem = await other.post(receiver.url("/hooks/x", "other.test"), b"{}", "s" * 43, "run-1")
        assert problem == "the receiver's TLS certificate is not valid for other.test"
        assert len(receiver.requests) == 1
    finally:
        receiver.stop()


async def test_no_log_level_shows_the_secret_the_signature_or_the_receivers_key(
    receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: httpx logged each request's URL at INFO, the receiver's key in its query with it;
    httpcore traces every request and answer at DEBUG. The server configures its logging so
    (configure_logging), then everything at DEBUG is captured."""
    configure_logging("DEBUG", "text")
    caplog.set_level(logging.DEBUG)
    secret, raw = "webhook-secret-" + "q" * 28, b'{"event":"scan_changed"}'
    names = NameTable()
    names.point(NAME, receiver.host)
    for path in ("/hooks/x?key=receiver-key-7", "/hooks/moved?key=receiver-key-7", STREAM):
        await sender_to(receiver, names=names).post(receiver.url(path, NAME), raw, secret, "run-1")
    assert len(receiver.requests) == 3 and logging.getLogger().isEnabledFor(logging.DEBUG)
    for kept in (secret, signature(secret, raw).removeprefix("sha256="), "receiver-key-7"):
        assert kept not in caplog.text
