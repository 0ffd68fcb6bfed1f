"""api_keys.py, and API keys over real HTTP: hashed and plain keys on a real server process,
expiry, `?token=` switched on and off, what --init, --hash-token and a first start hand out, and
no secret or digest in any log."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from api_keys import ApiKey, expiry_notes, matching_name, secret_sha256
from http_edge import QUERY_TOKEN_OFF, WRONG_TOKEN
from tests.support import (
    ALICE,
    BOB,
    OWN_USER,
    ROOT,
    START_UP_SECONDS,
    LiveServer,
    NmapWrapper,
    StartServer,
    call_tool,
    free_port,
    post,
    wait_until,
)

pytestmark = pytest.mark.anyio
# alice keeps the older plain secret, bob a digest: both must work the same way.
MIXED_TOKENS = {"alice": {"secret": ALICE}, "bob": {"secret_sha256": secret_sha256(BOB)}}
NOW = datetime(2027, 3, 1, 12, tzinfo=UTC)


def key(secret: str, expires_at: datetime | None = None) -> ApiKey:
    return ApiKey(bytes.fromhex(secret_sha256(secret)), expires_at)


def test_a_token_matches_the_key_of_its_secret_only() -> None:
    keys = {"alice": key(ALICE), "bob": key(BOB)}
    assert (matching_name(keys, ALICE), matching_name(keys, BOB)) == ("alice", "bob")
    assert matching_name(keys, ALICE + "x") is None and matching_name(keys, "") is None
    assert matching_name(keys, secret_sha256(ALICE)) is None, "the digest itself is no token"
    # FIPS 180-2's example: what `printf abc | sha256sum` prints.
    assert secret_sha256("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_expiry_notes_name_expired_keys_and_those_ending_within_14_days_soonest_first() -> None:
    keys = {"gone": key("g" * 32, NOW - timedelta(minutes=1)), "tomorrow": key("t" * 32, NOW + timedelta(hours=30)),
            "fortnight": key("f" * 32, NOW + timedelta(days=14)), "later": key("l" * 32, NOW + timedelta(days=15)),
            "never": key("n" * 32)}
    assert expiry_notes(keys, NOW) == [
        "token 'gone' expired at 2027-03-01 11:59 UTC: it is refused (401) until its expires_at moves or it is "
        "replaced",
        "token 'tomorrow' expires at 2027-03-02 18:00 UTC, within 2 days: give its holder a new key before then",
        "token 'fortnight' expires at 2027-03-15 12:00 UTC, in 14 days: give its holder a new key before then",
    ]
    assert not key("x" * 32, NOW).expired(NOW - timedelta(seconds=1)) and key("x" * 32, NOW).expired(NOW)


async def test_plain_and_hashed_keys_work_and_no_secret_or_digest_reaches_a_log(live_server: StartServer) -> None:
    """Both keys by header and by `?token=`, a scan (its argv in the audit log), refusals of a near
    miss and of a digest sent as if it were the token; the server logs at DEBUG, uvicorn's access
    log included, and stdout (the banner) shares the log file with stderr."""
    server = live_server(tokens=MIXED_TOKENS)
    for secret in (ALICE, BOB):
        for via in ("header", "query"):
            listed = await call_tool(server.url, secret, "list_tasks", {}, via=via)
            assert not listed.is_error, (secret[:5], via)
    scanned = await call_tool(server.url, BOB, "quick_scan", {"target": "127.0.0.1"}, via="query")
    assert scanned.structured_content["status"] == "completed"
    for refused in (BOB[:-1] + "x", secret_sha256(BOB), secret_sha256(ALICE)):
        assert post(server, Authorization=f"Bearer {refused}").status_code == 401
        assert post(server, url=f"{server.url}?token={refused}").status_code == 401
    server.stop()
    log = server.log_text()
    audit = (server.config_path.parent / "audit.jsonl").read_text()
    assert '"POST /mcp HTTP/1.1" 200' in log and "DEBUG" in log, "the log must be the real, verbose one"
    assert {line["token"] for line in map(json.loads, audit.splitlines())} == {"alice", "bob"}
    for secret in (ALICE, BOB):
        for text in (log, audit):
            assert secret not in text and secret_sha256(secret) not in text
            assert secret[:-1] not in text and secret_sha256(secret)[:16] not in text


async def test_an_expired_key_is_refused_like_a_wrong_one_and_logged_once(live_server: StartServer) -> None:
    now = datetime.now(UTC)
    tokens = {"old": {"secret_sha256": secret_sha256(ALICE), "expires_at": (now - timedelta(hours=1)).isoformat()},
              "soon": {"secret": BOB, "expires_at": (now + timedelta(days=3, hours=1)).isoformat()},
              "later": {"secret": "later-secret-" + "l" * 24, "expires_at": "2999-12-31"}}
    server = live_server(tokens=tokens)
    wrong = post(server, Authorization="Bearer " + "wrong-secret-" + "w" * 30)
    for _ in range(3):
        expired = post(server, Authorization=f"Bearer {ALICE}")
        assert expired.status_code == 401 and expired.json() == wrong.json() == {
            "error": "invalid_token", "error_description": WRONG_TOKEN}
        assert expired.headers["www-authenticate"] == wrong.headers["www-authenticate"]
    assert post(server, url=f"{server.url}?token={ALICE}").status_code == 401
    assert post(server, Authorization=f"Bearer {BOB}").status_code == 200
    assert post(server, Authorization="Bearer later-secret-" + "l" * 24).status_code == 200
    server.stop()
    log = server.log_text()
    warnings = [line for line in log.splitlines() if " WARNING auth: " in line]
    assert len(warnings) == 1 and "token 'old' expired at " in warnings[0], warnings
    assert "--hash-token --new" in warnings[0]
    assert re.search(r"^token 'old' expired at .* UTC: it is refused \(401\)", log, re.MULTILINE)
    assert re.search(r"^token 'soon' expires at .* UTC, in 3 days", log, re.MULTILINE)
    assert "token 'later' expires" not in log
    assert ALICE not in log and BOB not in log


@pytest.mark.parametrize("allowed", [True, False])
async def test_query_token_works_for_hashed_keys_and_can_be_switched_off(
    live_server: StartServer, allowed: bool
) -> None:
    """`?token=` is the legacy form of the clients that cannot send a header (DeepSOC's own client):
    on by default, and with allow_query_token false a 401 that says so, while the header works."""
    server = live_server(tokens=MIXED_TOKENS, allow_query_token=allowed)
    for secret in (ALICE, BOB):
        by_query = post(server, url=f"{server.url}?token={secret}", Accept="text/event-stream")
        if allowed:
            assert by_query.status_code == 200
        else:
            assert by_query.status_code == 401 and by_query.json()["error_description"] == QUERY_TOKEN_OFF
        assert post(server, Authorization=f"Bearer {secret}").status_code == 200
    server.stop()
    assert ALICE not in server.log_text() and BOB not in server.log_text()


def run_program(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "server.py"), *args], cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=START_UP_SECONDS, check=False)


def served(config: Path, nmap_wrapper: NmapWrapper, **overrides: object) -> LiveServer:
    """The config `--init` wrote, on a free port with the test's nmap, served."""
    document = json.loads(config.read_text()) | {"port": free_port(), "nmap_path": str(nmap_wrapper.path),
                                                 "log_level": "DEBUG", **OWN_USER, **overrides}
    config.write_text(json.dumps(document))
    server = LiveServer(config, config.parent / "server.log", document["port"])
    server.start()
    return server


async def test_the_secrets_init_and_hash_token_print_open_a_server_whose_config_has_only_digests(
    tmp_path: Path, nmap_wrapper: NmapWrapper
) -> None:
    config = tmp_path / "config.json"
    init = run_program("--init", "-c", str(config), cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    [first] = re.findall(r"^secret: (\S+)$", init.stdout, re.MULTILINE)
    fresh = run_program("--hash-token", "--new", cwd=tmp_path)
    second, second_line = fresh.stdout.removeprefix("secret: ").splitlines()
    piped = run_program("--hash-token", cwd=tmp_path, stdin=BOB + "\n")
    assert (fresh.returncode, piped.returncode) == (0, 0)
    entries = json.loads("{" + f'"ci": {{{second_line}}}, "bob": {{{piped.stdout.strip()}}}' + "}")
    tokens = json.loads(config.read_text())["tokens"] | entries
    server = served(config, nmap_wrapper, tokens=tokens)
    for secret in (first, second, BOB):
        assert post(server, Authorization=f"Bearer {secret}").status_code == 200
        assert secret not in config.read_text()
    assert post(server, Authorization=f"Bearer {first[:-1]}").status_code == 401
    scanned = await call_tool(server.url, second, "quick_scan", {"target": "127.0.0.1"})
    assert scanned.structured_content["status"] == "completed"
    server.stop()
    banner = server.log_text()
    assert "below, replace <TOKEN> with the secret of token 'bob'" in banner
    assert not any(secret in banner for secret in (first, second, BOB))


def test_a_first_start_puts_the_secret_in_initial_token_and_never_in_the_log(
    tmp_path: Path, nmap_wrapper: NmapWrapper
) -> None:
    """A server started without -c where no config.json is (./run.sh, the systemd unit, the
    container) writes one; the secret goes to a private file beside it, not to the log."""
    port = free_port()
    env = os.environ | {"NMAP_MCP_PORT": str(port), "NMAP_MCP_NMAP_PATH": str(nmap_wrapper.path),
                        "NMAP_MCP_NMAP_USER": OWN_USER["nmap_user"], "NMAP_MCP_LOG_LEVEL": "DEBUG"}
    log = tmp_path / "server.log"
    with log.open("wb") as output:
        process = subprocess.Popen([sys.executable, str(ROOT / "server.py")], cwd=tmp_path, env=env, stdout=output,
                                   stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: "listening on" in log.read_text(), START_UP_SECONDS), log.read_text()
        token_file = tmp_path / "initial-token"
        secret = token_file.read_text().strip()
        assert token_file.stat().st_mode & 0o777 == 0o600 and len(secret) >= 43
        headers = {"Authorization": f"Bearer {secret}", "Accept": "application/json, text/event-stream"}
        answer = httpx.post(f"http://127.0.0.1:{port}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                            headers=headers, timeout=10)
        assert answer.status_code == 200
    finally:
        process.terminate()
        process.wait(20)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tokens"] == {"default": {"secret_sha256": secret_sha256(secret)}}
    text = log.read_text()
    assert f"whose secret is in {token_file} (mode 0600) and nowhere else" in text
    assert f"{token_file} holds the secret of token 'default' from the first start" in text
    assert secret not in text and secret_sha256(secret) not in text
