"""config.py and the command line that writes and reads configuration."""

from __future__ import annotations

import io
import json
import re
import stat
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

import server
from api_keys import secret_sha256
from config import PLACEHOLDER_DIGESTS, ConfigError, Settings, load_settings, write_new_config
from tests.support import ROOT, SECRETS


def write(path: Path, document: dict[str, object]) -> Path:
    path.write_text(json.dumps(document))
    return path


def test_example_config_shows_every_key_and_its_placeholders_never_work() -> None:
    example = json.loads((ROOT / "config.example.json").read_text())
    assert set(example) == set(Settings.model_fields)
    defaults = Settings.model_construct().model_dump(mode="json", exclude={"token", "tokens"})
    assert {k: v for k, v in example.items() if k not in ("token", "tokens")} == defaults
    assert {spec["secret_sha256"] for spec in example["tokens"].values()} <= PLACEHOLDER_DIGESTS
    with pytest.raises(ConfigError) as refused:
        load_settings(ROOT / "config.example.json")
    for name in example["tokens"]:
        assert f"token '{name}' still has the placeholder secret of config.example.json" in str(refused.value)
    assert "--init" in str(refused.value)


def test_unknown_key_is_an_error_naming_the_key(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", {"token": SECRETS["alice"], "sync_timout": 30})
    with pytest.raises(ConfigError, match="unknown key 'sync_timout'"):
        load_settings(path)


def test_bad_values_are_named(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", {"tokens": {"x": {"secret": SECRETS["alice"]}}, "port": 70000})
    with pytest.raises(ConfigError, match="'port'"):
        load_settings(path)


def test_a_bad_resolve_names_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", {"tokens": {"x": {"secret": SECRETS["alice"], "resolve_names": "maybe"}}})
    with pytest.raises(ConfigError, match=r"'tokens\.x\.resolve_names': Input should be a valid boolean"):
        load_settings(path)


def test_ui_admin_tokens_must_name_configured_tokens(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", {"tokens": {"alice": {"secret": SECRETS["alice"]}},
                                       "ui_admin_tokens": ["alice", "mallory"]})
    with pytest.raises(ConfigError, match=re.escape("'ui_admin_tokens': no token is named 'mallory'; list names")):
        load_settings(path)
    assert load_settings(write(path, {"token": SECRETS["alice"], "ui_admin_tokens": ["default"]})).ui_admin_tokens == [
        "default"]


@pytest.mark.parametrize(("tokens", "problem"), [
    ({"ci": {"secret": "s" * 31}}, "token 'ci': its secret has 31 characters, fewer than 32"),
    ({"a": {"secret": SECRETS["alice"]}, "b": {"secret": SECRETS["alice"]}}, "tokens 'a', 'b' share one secret"),
    ({"ci": {"secret": "REPLACE-ME-too-every-token-needs-its-own-secret"}}, "token 'ci' still has the placeholder"),
])
def test_unfit_secrets_stop_the_server_naming_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tokens: dict[str, dict[str, str]], problem: str
) -> None:
    path = write(tmp_path / "c.json", {"tokens": tokens})
    assert server.main(["-c", str(path)]) == 2
    error = capsys.readouterr().err
    assert problem in error
    for spec in tokens.values():
        assert spec["secret"] not in error


def test_a_single_seed_token_must_be_long_enough_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="token 'default': its secret has 12 characters"):
        load_settings(write(tmp_path / "c.json", {"token": "twelve-chars"}))


def test_a_token_is_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no token configured"):
        load_settings(write(tmp_path / "c.json", {}))


def test_seed_token_and_named_tokens_work_together(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", {"token": SECRETS["alice"], "tokens": {"bob": {"secret": SECRETS["bob"]}}})
    keys = load_settings(path).api_keys()
    assert {name: key.sha256.hex() for name, key in keys.items()} == {
        "default": secret_sha256(SECRETS["alice"]), "bob": secret_sha256(SECRETS["bob"])}


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "c.json", {"token": SECRETS["alice"], "port": 4000, "sync_timeout": 40})
    monkeypatch.setenv("NMAP_MCP_PORT", "5000")
    monkeypatch.setenv("NMAP_MCP_ALLOWED_TARGETS", '["192.168.7.0/24"]')
    settings = load_settings(path)
    assert (settings.port, settings.sync_timeout, settings.allowed_targets) == (5000, 40, ["192.168.7.0/24"])


def test_bad_network_in_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'10\.0\.0\.1/8' is not a network"):
        load_settings(write(tmp_path / "c.json", {"token": SECRETS["alice"], "allowed_targets": ["10.0.0.1/8"]}))


def test_database_url_overrides_db_path(tmp_path: Path) -> None:
    base = {"token": SECRETS["alice"], "db_path": str(tmp_path / "x.db")}
    assert load_settings(write(tmp_path / "a.json", base)).effective_database_url() == f"sqlite:///{tmp_path}/x.db"
    with_url = base | {"database_url": "postgresql://u@h/db"}
    assert load_settings(write(tmp_path / "b.json", with_url)).effective_database_url() == "postgresql://u@h/db"
    with pytest.raises(ConfigError, match="database_url must be a sqlite:///PATH file or a postgresql:// database"):
        load_settings(write(tmp_path / "c.json", base | {"database_url": "mysql://u@h/db"}))


def test_init_writes_a_private_config_with_a_fresh_token_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.json"
    assert server.main(["--init", "-c", str(path)]) == 0
    notice = capsys.readouterr()
    assert str(path) in notice.err and f"-c {path}" in notice.err and "secret" not in notice.err
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = load_settings(path).named_tokens()["default"].sha256()
    assert server.main(["--init", "-c", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert load_settings(path).named_tokens()["default"].sha256() == first
    assert server.main(["--init", "--force", "-c", str(path)]) == 0
    assert load_settings(path).named_tokens()["default"].sha256() != first


def test_init_keeps_only_the_digest_and_prints_the_secret_once_with_every_client_s_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.json"
    assert server.main(["--init", "-c", str(path)]) == 0
    printed = capsys.readouterr().out
    [secret] = re.findall(r"^secret: (\S+)$", printed, re.MULTILINE)
    assert len(secret) >= 43
    assert "shown this once" in printed and f'"secret_sha256": "{secret_sha256(secret)}"' in printed
    assert f"Bearer {secret}" in printed and f"?token={secret}" in printed and "--- Cherry Studio" in printed
    stored = path.read_text()
    assert secret not in stored
    assert json.loads(stored)["tokens"] == {"default": {"secret_sha256": secret_sha256(secret)}}
    assert load_settings(path).named_tokens()["default"].secret is None


def test_init_creates_the_config_s_directory_and_says_plainly_when_it_cannot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--init -c ~/.config/nmap-mcp.json` on a machine without ~/.config."""
    path = tmp_path / "home" / ".config" / "nmap-mcp.json"
    assert server.main(["--init", "-c", str(path)]) == 0
    assert load_settings(path).named_tokens()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert server.main(["--init", "-c", str(blocker / "nmap-mcp.json")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: cannot create {blocker}: File exists"


def test_missing_explicit_config_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert server.main(["-c", str(tmp_path / "nope.json")]) == 2
    assert "--init" in capsys.readouterr().err


def test_missing_nmap_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "c.json", {"token": SECRETS["alice"], "nmap_path": str(tmp_path / "no-nmap")})
    assert server.main(["-c", str(path)]) == 2
    assert "nmap not found" in capsys.readouterr().err


def test_banner_hides_the_secret_unless_asked(tmp_path: Path) -> None:
    secret = SECRETS["alice"]
    path = write(tmp_path / "c.json", {"tokens": {"default": {"secret": secret}}})
    settings = load_settings(path)
    hidden = server.banner(settings, show_token=False, config_path=path)
    shown = server.banner(settings, show_token=True, config_path=path)
    assert secret not in hidden and "<TOKEN>" in hidden
    assert shown.count(secret) >= 12
    for client in ("Claude Code", "Claude Desktop", "Cursor", "Windsurf", "VS Code", "Gemini CLI", "Codex",
                   "Antigravity", "ChatGPT", "LM Studio", "DeepSOC", "Cherry Studio"):
        assert client in hidden
    assert f"?token={secret}" in shown and f"Bearer {secret}" in shown


def test_banner_says_plainly_that_a_hashed_token_cannot_be_shown(tmp_path: Path) -> None:
    secret = write_new_config(tmp_path / "c.json")
    settings = load_settings(tmp_path / "c.json")
    shown = server.banner(settings, show_token=True, config_path=tmp_path / "c.json")
    assert secret not in shown and "<TOKEN>" in shown
    assert "--show-token cannot show the secret of token 'default': the config keeps only its SHA-256" in shown
    assert "--show-token cannot" not in server.banner(settings, show_token=False, config_path=tmp_path / "c.json")


def test_print_config_with_show_token_says_why_a_hashed_token_is_not_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "c.json", {"tokens": {"ci": {"secret_sha256": secret_sha256(SECRETS["alice"])}}})
    assert server.main(["-c", str(path), "--print-config", "cursor", "--show-token"]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["mcpServers"]["nmap"]["headers"] == {"Authorization": "Bearer <TOKEN>"}
    assert "--show-token cannot show the secret of token 'ci'" in printed.err


def test_a_token_holds_a_digest_or_a_plain_secret_and_both_forms_are_checked_alike(tmp_path: Path) -> None:
    digest = secret_sha256(SECRETS["bob"])
    path = write(tmp_path / "c.json", {"tokens": {"alice": {"secret": SECRETS["alice"]},
                                                  "bob": {"secret_sha256": digest.upper()}}})
    keys = load_settings(path).api_keys()
    assert keys["alice"].sha256.hex() == secret_sha256(SECRETS["alice"]) and keys["bob"].sha256.hex() == digest


@pytest.mark.parametrize(("token", "problem"), [
    ({"secret": SECRETS["alice"], "secret_sha256": secret_sha256(SECRETS["alice"])},
     "'tokens.ci': Value error, give a token either `secret_sha256` (--hash-token prints it) or `secret`, exactly one"),
    ({"tools": ["quick_scan"]}, "give a token either `secret_sha256`"),
    ({"secret_sha256": "abc123"}, "'tokens.ci.secret_sha256': Value error, must be 64 hexadecimal digits"),
    ({"secret_sha256": "z" * 64}, "must be 64 hexadecimal digits, the SHA-256 of the secret"),
    ({"secret_sha256": "0" * 64}, "token 'ci' still has the placeholder secret of config.example.json"),
    ({"secret_sha256": secret_sha256("REPLACE-ME-too-every-token-needs-its-own-secret")}, "the placeholder secret"),
])
def test_a_token_without_exactly_one_fit_secret_is_a_clear_error(
    tmp_path: Path, token: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_settings(write(tmp_path / "c.json", {"tokens": {"ci": token}}))


def test_a_plain_and_a_hashed_token_with_one_secret_share_it(tmp_path: Path) -> None:
    tokens = {"a": {"secret": SECRETS["alice"]}, "b": {"secret_sha256": secret_sha256(SECRETS["alice"])},
              "c": {"secret_sha256": secret_sha256(SECRETS["alice"])}, "d": {"secret": SECRETS["bob"]}}
    with pytest.raises(ConfigError, match="tokens 'a', 'b', 'c' share one secret; give each its own") as refused:
        load_settings(write(tmp_path / "c.json", {"tokens": tokens}))
    assert "'d'" not in str(refused.value) and SECRETS["alice"] not in str(refused.value)
    assert secret_sha256(SECRETS["alice"]) not in str(refused.value)


def test_metrics_token_may_not_be_a_hashed_token_s_secret(tmp_path: Path) -> None:
    document = {"tokens": {"ci": {"secret_sha256": secret_sha256(SECRETS["alice"])}}, "metrics_token": SECRETS["alice"]}
    with pytest.raises(ConfigError, match="metrics_token is the secret of token 'ci'"):
        load_settings(write(tmp_path / "c.json", document))


@pytest.mark.parametrize(("written", "moment"), [
    ("2027-03-31", datetime(2027, 3, 31, tzinfo=UTC)),
    ("2027-03-31T18:00:00Z", datetime(2027, 3, 31, 18, tzinfo=UTC)),
    ("2027-03-31T18:00:00+02:00", datetime(2027, 3, 31, 18, tzinfo=timezone(timedelta(hours=2)))),
])
def test_expires_at_is_a_date_or_a_moment_with_its_zone(tmp_path: Path, written: str, moment: datetime) -> None:
    path = write(tmp_path / "c.json", {"tokens": {"ci": {"secret": SECRETS["alice"], "expires_at": written}}})
    assert load_settings(path).api_keys()["ci"].expires_at == moment


@pytest.mark.parametrize(("written", "problem"), [
    ("2027-03-31T18:00:00", "'tokens.ci.expires_at': Value error, needs its zone: add Z (UTC)"),
    ("next tuesday", "must be an ISO 8601 date (2027-03-31) or a date and time with its zone"),
    (1806451200, "must be a string: an ISO 8601 date"),
])
def test_an_expires_at_without_a_zone_or_not_iso_8601_is_refused(tmp_path: Path, written: object, problem: str) -> None:
    path = write(tmp_path / "c.json", {"tokens": {"ci": {"secret": SECRETS["alice"], "expires_at": written}}})
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_settings(path)


def test_banner_names_tokens_that_expired_or_expire_within_14_days(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    tokens = {"old": {"secret": "o" * 32, "expires_at": (now - timedelta(days=1)).isoformat()},
              "soon": {"secret": "s" * 32, "expires_at": (now + timedelta(days=5, hours=1)).isoformat()},
              "later": {"secret": "l" * 32, "expires_at": (now + timedelta(days=15)).isoformat()},
              "never": {"secret": "n" * 32}}
    path = write(tmp_path / "c.json", {"tokens": tokens})
    lines = server.banner(load_settings(path), show_token=False, config_path=path).splitlines()
    [old] = [line for line in lines if "'old'" in line]
    [soon] = [line for line in lines if "'soon'" in line]
    assert old.startswith("token 'old' expired at ") and "it is refused (401)" in old
    assert soon.startswith("token 'soon' expires at ") and ", in 5 days: give its holder a new key" in soon
    assert lines.index(old) < lines.index(soon)
    assert not [line for line in lines if "expire" in line and ("'later'" in line or "'never'" in line)]


def hash_token(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str,
               stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    status = server.main(["--hash-token", *args])
    printed = capsys.readouterr()
    return status, printed.out, printed.err


def test_hash_token_prints_the_line_that_stands_for_a_secret_from_stdin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    status, out, err = hash_token(capsys, monkeypatch, stdin=SECRETS["alice"] + "\n")
    assert status == 0 and out == f'"secret_sha256": "{secret_sha256(SECRETS["alice"])}"\n'
    assert "in place of its `secret`" in err
    path = tmp_path / "c.json"
    path.write_text('{"tokens": {"ci": {' + out.strip() + "}}}")
    assert load_settings(path).api_keys()["ci"].sha256.hex() == secret_sha256(SECRETS["alice"])


def test_hash_token_new_prints_a_fresh_secret_once_with_its_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    status, out, err = hash_token(capsys, monkeypatch, "--new")
    secret_line, line = out.splitlines()
    secret = secret_line.removeprefix("secret: ")
    assert status == 0 and len(secret) >= 43 and line == f'"secret_sha256": "{secret_sha256(secret)}"'
    assert "shown this once" in err and secret not in err
    assert hash_token(capsys, monkeypatch, "--new")[1] != out


@pytest.mark.parametrize("secret", ["short", "REPLACE-ME-too-every-token-needs-its-own-secret", ""])
def test_hash_token_refuses_a_secret_the_server_would_refuse(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    status, out, err = hash_token(capsys, monkeypatch, stdin=secret + "\n")
    assert (status, out) == (2, "")
    assert "a secret needs at least 32 characters" in err and (not secret or secret not in err)


def test_new_goes_with_hash_token(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        server.main(["--new"])
    assert "--new goes with --hash-token" in capsys.readouterr().err


OAUTH = {"issuer": "https://login.example.test/realms/acme", "client_id": "nmap-mcp",
         "client_secret": "provider-secret", "base_url": "https://scan.example.test"}


@pytest.mark.parametrize(("document", "problem"), [
    ({"roles": {"scanners": {"groups": ["scanners"]}}}, "`roles` are for people who sign in: configure `oauth` too"),
    ({"oauth": OAUTH}, "`oauth` without `roles` lets nobody in"),
    ({"oauth": OAUTH, "roles": {"empty": {"tools": ["list_tasks"]}}},
     "role 'empty' names no groups, emails or email_domains, so nobody is in it"),
    ({"oauth": OAUTH | {"base_url": "https://scan.example.test/mcp"}, "roles": {"r": {"groups": ["g"]}}},
     "'oauth.base_url'"),
    ({"tokens": {"ci@example.test": {"secret": SECRETS["bob"]}}}, "token name 'ci@example.test' holds '@'"),
])
def test_sign_in_settings_that_cannot_work_are_refused(tmp_path: Path, document: dict[str, object],
                                                       problem: str) -> None:
    path = write(tmp_path / "c.json", {"token": SECRETS["alice"], **document})
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_settings(path)


def test_the_sign_in_state_lives_beside_the_config(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", {"token": SECRETS["alice"], "oauth": OAUTH,
                                       "roles": {"staff": {"email_domains": ["Example.TEST"]}}})
    settings = load_settings(path)
    assert settings.oauth is not None and settings.oauth.state_dir == str(tmp_path / "oauth-state")
    assert settings.roles["staff"].email_domains == ["example.test"]
