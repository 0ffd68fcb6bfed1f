"""config.py and the command line that writes and reads configuration."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest

import server
from config import PLACEHOLDER_SECRETS, ConfigError, Settings, load_settings, write_new_config
from tests.support import ROOT, SECRETS


def write(path: Path, document: dict[str, object]) -> Path:
    path.write_text(json.dumps(document))
    return path


def test_example_config_shows_every_key_and_its_placeholders_never_work() -> None:
    example = json.loads((ROOT / "config.example.json").read_text())
    assert set(example) == set(Settings.model_fields)
    defaults = Settings.model_construct().model_dump(mode="json", exclude={"token", "tokens"})
    assert {k: v for k, v in example.items() if k not in ("token", "tokens")} == defaults
    assert {spec["secret"] for spec in example["tokens"].values()} == PLACEHOLDER_SECRETS
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
    assert load_settings(path).named_secrets() == {"default": SECRETS["alice"], "bob": SECRETS["bob"]}


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
    assert str(path) in notice.err and f"-c {path}" in notice.err and notice.out == ""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = load_settings(path).named_secrets()["default"]
    assert len(first) >= 43
    assert server.main(["--init", "-c", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert load_settings(path).named_secrets()["default"] == first
    assert server.main(["--init", "--force", "-c", str(path)]) == 0
    assert load_settings(path).named_secrets()["default"] != first


def test_init_creates_the_config_s_directory_and_says_plainly_when_it_cannot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--init -c ~/.config/nmap-mcp.json` on a machine without ~/.config."""
    path = tmp_path / "home" / ".config" / "nmap-mcp.json"
    assert server.main(["--init", "-c", str(path)]) == 0
    assert load_settings(path).named_secrets()
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
    path = write_new_config(tmp_path / "c.json") or tmp_path / "c.json"
    settings = load_settings(path)
    secret = settings.named_secrets()["default"]
    hidden = server.banner(settings, show_token=False, config_path=path)
    shown = server.banner(settings, show_token=True, config_path=path)
    assert secret not in hidden and "<TOKEN>" in hidden
    assert shown.count(secret) >= 12
    for client in ("Claude Code", "Claude Desktop", "Cursor", "Windsurf", "VS Code", "Gemini CLI", "Codex",
                   "Antigravity", "ChatGPT", "LM Studio", "DeepSOC", "Cherry Studio"):
        assert client in hidden
    assert f"?token={secret}" in shown and f"Bearer {secret}" in shown


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
