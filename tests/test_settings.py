"""Settings precedence (option > env > config file > default), sources, and refusals."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Dict

import pytest

from mailbox_relay.ingress.endpoint import RELAY_PATH
from mailbox_relay.ingress.target import target_from
from mailbox_relay.outcome import ConfigError, Kind
from mailbox_relay.settings import (
    PasswordFileWarning,
    open_layers,
    parse_recipients,
    parse_size,
)

URL = "https://app.example.com"


def load(options: Dict[str, Any], env: Dict[str, str]) -> Any:
    return target_from(open_layers(options, env))


def write_config(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_option_beats_env_beats_config_beats_default(clean_env: Dict[str, str], tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml",
        'url = "https://config.example.com"\ntimeout = 5\nretry_for = 9\npassword = "from-config"\n',
    )
    env = {**clean_env, "MAILBOX_RELAY_URL": "https://env.example.com", "MAILBOX_RELAY_TIMEOUT": "7"}
    settings = load({"config": config, "url": "https://option.example.com"}, env)
    assert settings.url == "https://option.example.com" + RELAY_PATH
    assert settings.sources["url"] == "option --url"
    assert settings.timeout == 7.0 and settings.sources["timeout"] == "env MAILBOX_RELAY_TIMEOUT"
    assert settings.retry_for == 9.0 and settings.sources["retry_for"] == f"config {config}"
    assert settings.max_size is None and settings.sources["max_size"] == "default"
    assert settings.password == "from-config"


def test_rails_names_are_accepted_only_when_ours_are_unset(clean_env: Dict[str, str]) -> None:
    env = {**clean_env, "URL": "https://rails.example.com", "INGRESS_PASSWORD": "rails-pw"}
    settings = load({}, env)
    assert settings.url.startswith("https://rails.example.com/")
    assert (settings.password, settings.password_source) == ("rails-pw", "env INGRESS_PASSWORD")
    ours = load({}, {**env, "MAILBOX_RELAY_URL": URL, "MAILBOX_RELAY_PASSWORD": "ours"})
    assert ours.url.startswith(URL) and ours.password == "ours"


def test_password_file_option_beats_env_password(clean_env: Dict[str, str], tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\nsecond line ignored\n")
    secret.chmod(0o600)
    env = {**clean_env, "MAILBOX_RELAY_URL": URL, "MAILBOX_RELAY_PASSWORD": "from-env"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settings = load({"password_file": str(secret)}, env)
    assert settings.password == "from-file"
    assert caught == []  # mode 0600: nothing to warn about
    assert "option --password-file" in settings.password_source


def test_readable_password_file_warns_without_failing(clean_env: Dict[str, str], tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("pw\n")
    secret.chmod(0o644)
    with pytest.warns(PasswordFileWarning, match="chmod 600"):
        settings = load({"password_file": str(secret), "url": URL}, clean_env)
    assert settings.password == "pw"


def test_password_file_from_config(clean_env: Dict[str, str], tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("cfg-file-pw\r\n")
    secret.chmod(0o600)
    config = write_config(
        Path(clean_env["XDG_CONFIG_HOME"]) / "mailbox-relay" / "config.toml",
        f'url = "{URL}"\npassword_file = "{secret}"\n',
    )
    settings = load({}, clean_env)
    assert settings.password == "cfg-file-pw"
    assert settings.sources["url"] == f"config {config}"


def test_password_is_never_in_repr_or_describe(clean_env: Dict[str, str]) -> None:
    settings = load({"url": URL}, {**clean_env, "MAILBOX_RELAY_PASSWORD": "hunter2-secret"})
    assert "hunter2-secret" not in repr(settings)
    assert "hunter2-secret" not in "\n".join(settings.describe())
    assert "password = <set> (env MAILBOX_RELAY_PASSWORD)" in settings.describe()


@pytest.mark.parametrize(
    ("options", "env", "words"),
    [
        ({}, {"MAILBOX_RELAY_PASSWORD": "x"}, "no ingress URL"),
        ({"url": URL}, {}, "no ingress password"),
        ({"url": "ftp://x"}, {"MAILBOX_RELAY_PASSWORD": "x"}, "must start with https://"),
        ({"url": "http://app.example.com"}, {"MAILBOX_RELAY_PASSWORD": "x"}, "plain http"),
        ({"url": URL, "timeout": 0}, {"MAILBOX_RELAY_PASSWORD": "x"}, "--timeout must be at least 0.01"),
        ({"url": URL}, {"MAILBOX_RELAY_PASSWORD": "x", "MAILBOX_RELAY_RETRY_FOR": "soon"}, "RETRY_FOR"),
        ({"url": URL}, {"MAILBOX_RELAY_PASSWORD": "x", "MAILBOX_RELAY_INSECURE": "maybe"}, "true or false"),
        ({"url": URL, "config": "/nonexistent.toml"}, {"MAILBOX_RELAY_PASSWORD": "x"}, "does not exist"),
        ({"url": URL, "password_file": "/nonexistent"}, {}, "cannot read the password file"),
        ({"url": URL, "envelope_recipient": ("%(recipient)",)}, {"MAILBOX_RELAY_PASSWORD": "x"}, "multidrop"),
    ],
)
def test_bad_or_missing_settings_are_temporary_and_say_what_to_do(
    clean_env: Dict[str, str], options: Dict[str, Any], env: Dict[str, str], words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(options, {**clean_env, **env})
    assert info.value.outcome.kind is Kind.TEMPORARY
    assert info.value.outcome.line().startswith("4.3.5 ")
    assert words in info.value.outcome.line()


def test_plain_http_is_fine_on_loopback_and_with_allow_http(clean_env: Dict[str, str]) -> None:
    env = {**clean_env, "MAILBOX_RELAY_PASSWORD": "x"}
    for url in ("http://127.0.0.1:3000", "http://localhost:3000", "http://[::1]:3000"):
        assert load({"url": url}, env).url == url + RELAY_PATH
    remote = load({"url": "http://app.internal", "allow_http": True}, env)
    assert remote.url == "http://app.internal" + RELAY_PATH


def test_credentials_in_the_url_are_refused_without_echoing_them(clean_env: Dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load({"url": "https://actionmailbox:hunter2-secret@app.example.com"}, clean_env)
    assert "must not contain credentials" in info.value.outcome.line()
    assert "hunter2-secret" not in info.value.outcome.line()


def test_url_with_a_path_is_kept(clean_env: Dict[str, str]) -> None:
    url = "https://app.example.com/custom/prefix" + RELAY_PATH
    assert load({"url": url}, {**clean_env, "MAILBOX_RELAY_PASSWORD": "x"}).url == url


def test_unknown_config_key_is_named(clean_env: Dict[str, str], tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", 'url = "https://x.example.com"\nretries = 3\n')
    with pytest.raises(ConfigError, match="unknown key 'retries'"):
        load({"config": config}, {**clean_env, "MAILBOX_RELAY_PASSWORD": "x"})


def test_broken_toml_is_a_config_error(clean_env: Dict[str, str], tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", "url = \n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load({"config": config}, {**clean_env, "MAILBOX_RELAY_PASSWORD": "x"})


def test_system_config_is_read_when_no_user_config(
    clean_env: Dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = write_config(tmp_path / "etc.toml", f'url = "{URL}"\npassword = "sys"\n')
    monkeypatch.setattr("mailbox_relay.settings.SYSTEM_CONFIG_PATH", system)
    settings = load({}, clean_env)
    assert settings.sources["url"] == f"config {system}"


def test_recipients_parse_like_fetchmail_passes_them() -> None:
    assert parse_recipients("'a@example.com' 'b@example.com'", "x") == ("a@example.com", "b@example.com")
    assert parse_recipients(("a@example.com, b@example.com", "a@example.com"), "x") == (
        "a@example.com",
        "b@example.com",
    )
    with pytest.raises(ConfigError, match="control character"):
        parse_recipients(["a@example.com\x00"], "x")


@pytest.mark.parametrize(("text", "size"), [("100", 100), ("25M", 25 * 1024**2), ("1k", 1024), (7, 7)])
def test_sizes(text: Any, size: int) -> None:
    assert parse_size(text, "--max-size") == size


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("timeout", "nan"),
        ("timeout", "inf"),
        ("timeout", "1e999"),
        ("timeout", "1e300"),
        ("retry_for", "nan"),
        ("retry_for", "-inf"),
        ("rate", "nan"),
        ("rate", "1e999"),
        ("max_size", "1e999"),
        ("max_size", "٣"),
        ("max_size", "99999999999999999999G"),
        ("timeout", "٣"),
        ("jobs", "٣"),
        ("jobs", "1e999"),
    ],
)
def test_numbers_that_are_not_finite_sane_ascii_numbers_are_refused_from_every_source(
    clean_env: Dict[str, str], tmp_path: Path, name: str, value: str
) -> None:
    from mailbox_relay.settings import FIELDS, ImportSettings, Layers, open_layers

    field = FIELDS[name]
    toml_value = value if re.fullmatch(r"-?(nan|inf|[0-9.e]+)", value) else json.dumps(value)
    config = write_config(tmp_path / "c.toml", f"{name} = {toml_value}\n")
    for layers in (
        Layers({name: value}, {}),
        Layers({}, {field.env[0]: value}),
        open_layers({"config": config}, {}),
    ):
        with pytest.raises(ConfigError) as info:
            layers.get(field)
        assert "must be" in info.value.outcome.detail
    assert ImportSettings.fields()  # the import fields are declared where Layers can find them


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"url": "https://[::1"}, "is not a URL"),
        ({"url": "https://app.example.com:99999"}, "is not a URL"),
        ({"url": "https://app.example.com:abc"}, "is not a URL"),
        ({"url": "https://" + "a" * 64 + ".example.com"}, "1 to 63 characters"),
        ({"url": URL, "ca_bundle": "/nonexistent/ca.pem"}, "CA bundle /nonexistent/ca.pem"),
        ({"url": URL, "user_agent": "agent\nX-Injected: 1"}, "one line"),
        ({"url": URL, "envelope_recipient": 5}, "address"),
    ],
)
def test_garbage_settings_are_one_clear_line(
    clean_env: Dict[str, str], options: Dict[str, Any], words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(options, {**clean_env, "MAILBOX_RELAY_PASSWORD": "x"})
    assert words in info.value.outcome.detail


def test_toml_that_is_not_utf8_or_holds_a_wrong_type_is_one_clear_line(
    clean_env: Dict[str, str], tmp_path: Path
) -> None:
    env = {**clean_env, "MAILBOX_RELAY_PASSWORD": "x", "MAILBOX_RELAY_URL": URL}
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'user_agent = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="cannot read config file"):
        load({"config": str(latin1)}, env)
    wrong_type = write_config(tmp_path / "type.toml", "envelope_recipient = 5\n")
    with pytest.raises(ConfigError, match=r"envelope_recipient in .* must be an address"):
        load({"config": wrong_type}, env)


@pytest.mark.parametrize("recipient", ["relay", "@example.com", "relay@", "'relay'"])
def test_an_envelope_recipient_must_be_an_address(clean_env: Dict[str, str], recipient: str) -> None:
    """fetchmail's %T in single-drop mode is the local name: X-Original-To: relay never routes."""
    with pytest.raises(ConfigError, match="not an address"):
        load({"url": URL, "envelope_recipient": (recipient,)}, {**clean_env, "MAILBOX_RELAY_PASSWORD": "x"})
    assert parse_recipients(["<support@example.com>"], "x") == ("<support@example.com>",)


def test_a_missing_ca_bundle_matters_only_for_https(clean_env: Dict[str, str]) -> None:
    env = {**clean_env, "MAILBOX_RELAY_PASSWORD": "x", "REQUESTS_CA_BUNDLE": "/nonexistent/ca.pem"}
    assert load({"url": "http://127.0.0.1:3025"}, env).tls.bundle == "/nonexistent/ca.pem"
    with pytest.raises(ConfigError, match=re.escape("CA bundle /nonexistent/ca.pem")):
        load({"url": URL}, env)
