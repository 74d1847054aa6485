"""OAuth2 without an IMAP server: account settings, access tokens from the grant file (refresh,
rotation, revocation, a wrong client, an unreachable provider, a token command) and both
`auth` flows, against a real local OAuth2 provider (tests/oauth_provider.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import requests

from mailbox_relay.accounts import Account, parse_account
from mailbox_relay.outcome import ConfigError
from mailbox_relay.sources.oauth2 import TokenProblem, TokenSource, read_grant

from .helpers import invoke
from .oauth_provider import OAuthProvider
from .peers import free_port


@pytest.fixture
def provider() -> Iterator[OAuthProvider]:
    with OAuthProvider() as server:
        yield server


def oauth_account(provider: OAuthProvider, tmp_path: Path, **keys: Any) -> Account:
    table = {"host": "127.0.0.1", "tls": "none", "username": "user1", **provider.account(), **keys}
    return parse_account("box", table, "c.toml", str(tmp_path / "oauth2"))


def seeded(provider: OAuthProvider, tmp_path: Path, **keys: Any) -> Account:
    """An account whose grant file holds a refresh token for user1, as `auth` leaves it."""
    account = oauth_account(provider, tmp_path, **keys)
    assert account.oauth2 is not None
    path = Path(account.oauth2.token_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(provider.grant_file(provider.grant("user1")))
    path.chmod(0o600)
    return account


def refresh_token_in(account: Account) -> str:
    assert account.oauth2 is not None
    grant = read_grant(account.oauth2.token_file)
    assert grant is not None
    return str(grant["refresh_token"])


# --- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys, said",
    [
        ({"password": "pw"}, 'has password, but auth = "xoauth2" logs in with tokens'),
        ({"oauth2_client_id": None}, "needs oauth2_client_id"),
        ({"oauth2_token_command": "print-token"}, "and only one of them"),
        ({"oauth2_token_url": "http://idp.example/token"}, "must be an https:// URL"),
        ({"oauth2_token_url": None}, "needs oauth2_token_url (or provider = gmail or google or microsoft)"),
        ({"oauth2_scopes": [1]}, "oauth2_scopes of [accounts.box] in c.toml must be a list of scopes"),
    ],
)
def test_each_oauth2_mistake_is_one_line_that_names_the_key(
    provider: OAuthProvider, tmp_path: Path, keys: Dict[str, Any], said: str
) -> None:
    table = {"host": "127.0.0.1", "tls": "none", "username": "u", **provider.account(), **keys}
    with pytest.raises(ConfigError) as error:
        parse_account("box", {k: v for k, v in table.items() if v is not None}, "c.toml", str(tmp_path))
    assert said in error.value.outcome.detail
    assert "\n" not in error.value.outcome.detail


def test_oauth2_keys_without_auth_xoauth2_are_refused(tmp_path: Path) -> None:
    table = {"host": "h", "username": "u", "password": "p", "oauth2_client_id": "x"}
    with pytest.raises(ConfigError, match='set auth = "xoauth2"'):
        parse_account("box", table, "c.toml", str(tmp_path))


def test_a_provider_preset_supplies_the_endpoints_scopes_and_grant_file(tmp_path: Path) -> None:
    table = {
        "provider": "microsoft",
        "username": "me@example.com",
        "auth": "xoauth2",
        "oauth2_client_id": "app",
    }
    account = parse_account("work", table, "c.toml", str(tmp_path))
    assert account.oauth2 is not None and (account.host, account.port) == ("outlook.office365.com", 993)
    provider = account.oauth2.provider
    assert provider.token_url.endswith("/oauth2/v2.0/token") and provider.device_url.endswith("/devicecode")
    assert "offline_access" in provider.scopes
    assert account.oauth2.token_file == str(tmp_path / "work.json")
    google = parse_account("g", {**table, "provider": "google"}, "c.toml", str(tmp_path)).oauth2
    assert google is not None and google.provider.scopes == ("https://mail.google.com/",)
    assert not google.provider.device_url  # Google's device flow does not grant the Gmail scope
    assert ("access_type", "offline") in google.provider.authorize_extra


# --- access tokens ------------------------------------------------------------------------


def test_a_token_is_refreshed_once_and_then_reused_while_fresh(
    provider: OAuthProvider, tmp_path: Path
) -> None:
    account = seeded(provider, tmp_path)
    source = TokenSource(account)
    first = source.current()
    assert first.access in provider.access_tokens and first.expires_at > time.time() + 3000
    assert source.current() == first
    assert TokenSource(account).current() == first  # another process: from the grant file
    assert provider.grants_used == {"refresh_token": 1}
    assert account.oauth2 is not None
    assert stat.S_IMODE(os.stat(account.oauth2.token_file).st_mode) == 0o600


def test_a_refused_token_is_replaced_by_a_new_one(provider: OAuthProvider, tmp_path: Path) -> None:
    source = TokenSource(seeded(provider, tmp_path))
    first = source.current()
    provider.forget_access_tokens()
    second = source.renew(first)
    assert second.access != first.access and second.access in provider.access_tokens


def test_a_short_lived_token_is_refreshed_before_each_use(provider: OAuthProvider, tmp_path: Path) -> None:
    provider.lifetime = 5  # less than FRESH_FOR: never worth keeping
    source = TokenSource(seeded(provider, tmp_path))
    tokens = {source.current().access for _ in range(3)}
    assert len(tokens) == 3 and provider.grants_used == {"refresh_token": 3}


def test_a_rotated_refresh_token_is_saved_and_the_old_one_is_no_longer_needed(
    provider: OAuthProvider, tmp_path: Path
) -> None:
    provider.rotate = True
    account = seeded(provider, tmp_path)
    old = refresh_token_in(account)
    TokenSource(account).current()
    new = refresh_token_in(account)
    assert new != old and new in provider.refresh_tokens and old not in provider.refresh_tokens
    assert TokenSource(account).renew().access in provider.access_tokens  # the saved one works
    leftovers = [p.name for p in Path(str(account.oauth2 and account.oauth2.token_file)).parent.iterdir()]
    assert sorted(leftovers) == ["box.json", "box.json.lock"]  # no temporary file left behind


def test_threads_and_processes_refreshing_at_once_never_spend_a_rotated_token_twice(
    provider: OAuthProvider, tmp_path: Path
) -> None:
    provider.rotate, provider.lifetime = True, 1  # every use refreshes, every refresh rotates
    account = seeded(provider, tmp_path)
    problems: List[str] = []
    config = tmp_path / "c.toml"
    config.write_text(
        "[accounts.box]\n"
        + "".join(
            f"{k} = {json.dumps(v)}\n"
            for k, v in {
                "host": "127.0.0.1",
                "tls": "none",
                "username": "user1",
                "oauth2_token_file": account.oauth2.token_file if account.oauth2 else "",
                **provider.account(),
            }.items()
        )
    )
    script = (
        "import os\nfrom mailbox_relay.accounts import load_accounts\n"
        "from mailbox_relay.settings import open_layers\n"
        "from mailbox_relay.sources.oauth2 import TokenSource\n"
        f"a = load_accounts(open_layers({{'config': {str(config)!r}}}, os.environ), ['box'])[0]\n"
        "for _ in range(5): TokenSource(a).renew()\n"
    )
    others = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(2)]

    def refresh() -> None:
        try:
            for _ in range(5):
                TokenSource(account).renew()
        except TokenProblem as problem:
            problems.append(problem.line)

    threads = [threading.Thread(target=refresh) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [process.wait(60) for process in others] == [0, 0]
    assert problems == []
    assert provider.grants_used == {"refresh_token": 25}
    assert refresh_token_in(account) in provider.refresh_tokens


def test_a_revoked_grant_says_to_run_auth_again(provider: OAuthProvider, tmp_path: Path) -> None:
    account = seeded(provider, tmp_path)
    provider.revoke("user1")
    with pytest.raises(TokenProblem) as problem:
        TokenSource(account).current()
    assert problem.value.kind == "grant"
    assert "revoked or has expired; run `mailbox-relay auth box` again" in problem.value.line


def test_no_grant_yet_says_to_run_auth(provider: OAuthProvider, tmp_path: Path) -> None:
    with pytest.raises(TokenProblem, match=r"no OAuth2 grant yet: run `mailbox-relay auth box`"):
        TokenSource(oauth_account(provider, tmp_path)).current()


def test_a_wrong_client_secret_names_the_settings_to_check(provider: OAuthProvider, tmp_path: Path) -> None:
    provider.client_secret = "right"
    secret = tmp_path / "secret"
    secret.write_text("wrong\n")
    secret.chmod(0o600)
    with pytest.raises(TokenProblem) as problem:
        TokenSource(seeded(provider, tmp_path, oauth2_client_secret_file=str(secret))).current()
    assert problem.value.kind == "client"
    assert "check oauth2_client_id and oauth2_client_secret_file" in problem.value.line
    secret.write_text("right\n")
    assert TokenSource(seeded(provider, tmp_path, oauth2_client_secret_file=str(secret))).current().access


def test_an_unreachable_provider_is_temporary_and_a_wrong_address_is_not(
    provider: OAuthProvider, tmp_path: Path
) -> None:
    down = seeded(provider, tmp_path, oauth2_token_url=f"http://127.0.0.1:{free_port()}/token")
    with pytest.raises(TokenProblem) as problem:
        TokenSource(down).current()
    assert problem.value.kind == "network" and "trying again later" in problem.value.line
    missing = seeded(provider, tmp_path, oauth2_token_url=f"{provider.url}/nothing-here")
    with pytest.raises(TokenProblem) as problem:
        TokenSource(missing).current()
    assert problem.value.kind == "client" and "answered HTTP 404: check that address" in problem.value.line


def test_a_token_command_prints_the_token_and_its_failure_is_temporary(tmp_path: Path) -> None:
    table = {"host": "127.0.0.1", "tls": "none", "username": "u", "auth": "xoauth2"}
    command = f"{sys.executable} -c \"print('tok-from-command')\""
    account = parse_account("box", {**table, "oauth2_token_command": command}, "c", str(tmp_path))
    token = TokenSource(account).current()
    assert token.access == "tok-from-command" and token.source == "oauth2_token_command"
    failing = parse_account("box", {**table, "oauth2_token_command": "false"}, "c", str(tmp_path))
    with pytest.raises(TokenProblem) as problem:
        TokenSource(failing).current()
    assert problem.value.kind == "network" and "exited 1" in problem.value.line


# --- mailbox-relay auth -------------------------------------------------------------------


class Auth:
    """`mailbox-relay auth box` as a person runs it, reading what it prints as it prints it."""

    def __init__(self, provider: OAuthProvider, tmp_path: Path, *args: str, **keys: Any) -> None:
        self.grant_file = tmp_path / "grants" / "box.json"
        table = {
            "host": "127.0.0.1",
            "tls": "none",
            "username": "user1",
            "oauth2_token_file": str(self.grant_file),
            **provider.account(),
            **keys,
        }
        config = tmp_path / "auth.toml"
        lines = [f"{key} = {json.dumps(value)}\n" for key, value in table.items() if value is not None]
        config.write_text("[accounts.box]\n" + "".join(lines))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mailbox_relay", "auth", "box", "--config", str(config), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.said: List[str] = []
        self.seen = 0  # lines already matched against
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.said.append(line)

    def line_matching(self, pattern: str, seconds: float = 30) -> re.Match[str]:
        """The next line (after those already matched) that matches, within `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            while self.seen < len(self.said):
                found = re.search(pattern, self.said[self.seen])
                self.seen += 1
                if found:
                    return found
            time.sleep(0.02)
        raise AssertionError(f"auth never said {pattern!r}; it said:\n{''.join(self.said)}")

    def finish(self) -> tuple[int, str, str]:
        assert self.process.stdout is not None
        self.process.wait(60)
        self.reader.join(10)
        return self.process.returncode, self.process.stdout.read(), "".join(self.said)


def test_auth_device_flow_shows_the_code_and_saves_the_grant(provider: OAuthProvider, tmp_path: Path) -> None:
    auth = Auth(provider, tmp_path)
    asked = auth.line_matching(
        r"with the device flow; client mailbox-relay-test; scopes: imap offline_access"
    )
    assert asked
    code = auth.line_matching(r"Open (\S+) and enter the code (\w+)")
    assert code.group(1) == f"{provider.url}/device"
    requests.get(code.group(1), params={"user_code": code.group(2), "user": "user1"}, timeout=10)
    status, out, err = auth.finish()
    assert status == 0, err
    assert f"Account box is authorised; the grant is saved in {auth.grant_file}" in out
    grant = json.loads(auth.grant_file.read_text())
    assert provider.refresh_tokens[grant["refresh_token"]] == "user1"
    assert stat.S_IMODE(auth.grant_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(auth.grant_file.parent.stat().st_mode) == 0o700
    assert not any(token in out + err for token in provider.issued)


def test_auth_loopback_flow_with_pkce_saves_the_grant(provider: OAuthProvider, tmp_path: Path) -> None:
    auth = Auth(provider, tmp_path, "--flow", "loopback")
    address = auth.line_matching(r"^\s+(http://\S+/authorize\?\S+)$").group(1)
    assert "code_challenge_method=S256" in address and "redirect_uri=http%3A%2F%2F127.0.0.1%3A" in address
    stray = requests.get(re.sub(r"state=[^&]+", "state=forged", address), timeout=10)
    assert stray.status_code == 400  # a redirect without our state is not taken
    page = requests.get(address, timeout=10)  # the browser: sign in, then back to 127.0.0.1
    assert page.status_code == 200 and "account box is authorised" in page.text
    status, out, err = auth.finish()
    assert status == 0, err
    assert "Account box is authorised" in out
    assert provider.grants_used == {"authorization_code": 1}
    assert json.loads(auth.grant_file.read_text())["refresh_token"] in provider.refresh_tokens


def test_auth_loopback_listens_on_the_port_given_for_ssh_forwarding(
    provider: OAuthProvider, tmp_path: Path
) -> None:
    port = free_port()
    auth = Auth(provider, tmp_path, "--flow", "loopback", "--port", str(port))
    address = auth.line_matching(r"^\s+(http://\S+)$").group(1)
    assert f"redirect_uri=http%3A%2F%2F127.0.0.1%3A{port}%2F" in address
    auth.line_matching(rf"come back to http://127\.0\.0\.1:{port}/")
    auth.process.terminate()
    auth.process.wait(10)


def test_a_declined_sign_in_exits_77_and_saves_nothing(provider: OAuthProvider, tmp_path: Path) -> None:
    auth = Auth(provider, tmp_path)
    code = auth.line_matching(r"enter the code (\w+)").group(1)
    requests.get(f"{provider.url}/device", params={"user_code": code, "decline": "1"}, timeout=10)
    status, _, err = auth.finish()
    assert status == 77
    assert "the sign-in for account box was declined; nothing was saved" in err
    assert not auth.grant_file.exists()

    provider.decline = True
    auth = Auth(provider, tmp_path, "--flow", "loopback")
    requests.get(auth.line_matching(r"^\s+(http://\S+)$").group(1), timeout=10)
    status, _, err = auth.finish()
    assert status == 77 and "declined" in err and not auth.grant_file.exists()


def test_no_sign_in_in_time_exits_75_with_what_to_do(provider: OAuthProvider, tmp_path: Path) -> None:
    started = time.monotonic()
    status, _, err = Auth(provider, tmp_path, "--flow", "loopback", "--wait", "2").finish()
    assert status == 75 and time.monotonic() - started < 20
    assert "no sign-in for account box in time; nothing was saved: run `mailbox-relay auth box` again" in err


def test_auth_refuses_accounts_it_cannot_authorise(provider: OAuthProvider, tmp_path: Path) -> None:
    status, _, err = Auth(provider, tmp_path, oauth2_client_id=None, oauth2_token_command="true").finish()
    assert status == 78 and "gets its tokens from oauth2_token_command" in err
    config = tmp_path / "plain.toml"
    config.write_text('[accounts.box]\nhost = "h"\nusername = "u"\npassword = "p"\n')
    status, _, err = invoke(["auth", "box", "--config", str(config)])
    assert status == 78 and 'does not use OAuth2: set auth = "xoauth2"' in err
    status, _, err = invoke(["auth", "nobody", "--config", str(config)])
    assert status == 78 and "no account 'nobody'; configured: box" in err
    auth = Auth(provider, tmp_path, "--flow", "device", oauth2_device_url=None)
    status, _, err = auth.finish()
    assert status == 78 and "has no device-code endpoint: use --flow loopback" in err


def test_a_redirecting_token_endpoint_is_not_followed(tmp_path: Path, httpserver: Any) -> None:
    httpserver.expect_request("/token").respond_with_data(
        "", 302, headers={"Location": "http://evil.example/"}
    )
    account = oauth_account(OAuthProvider(), tmp_path, oauth2_token_url=httpserver.url_for("/token"))
    assert account.oauth2 is not None
    Path(account.oauth2.token_file).parent.mkdir(parents=True)
    Path(account.oauth2.token_file).write_text('{"refresh_token": "rt-x"}')
    Path(account.oauth2.token_file).chmod(0o600)
    with pytest.raises(TokenProblem) as problem:
        TokenSource(account).current()
    assert problem.value.kind == "client" and "redirects (HTTP 302)" in problem.value.line
    assert len(httpserver.log) == 1  # and nothing went to evil.example


@pytest.mark.parametrize("expires_in", [0, -5, "soon", None, float("inf")])
def test_a_nonsense_lifetime_counts_as_an_hour(
    provider: OAuthProvider, tmp_path: Path, httpserver: Any, expires_in: Any
) -> None:
    answer = {"access_token": "at-y", "expires_in": expires_in}
    httpserver.expect_request("/token").respond_with_json({k: v for k, v in answer.items() if v is not None})
    account = seeded(provider, tmp_path, oauth2_token_url=httpserver.url_for("/token"))
    token = TokenSource(account).current()
    assert 3500 < token.expires_at - time.time() <= 3600


def test_a_tiny_lifetime_still_gives_each_session_a_minimum(provider: OAuthProvider, tmp_path: Path) -> None:
    provider.lifetime = 1
    token = TokenSource(seeded(provider, tmp_path)).current()
    assert token.replace_session_at() >= token.issued_at + 2  # no reconnect storm in a watch


def test_a_grant_file_others_can_read_is_warned_about(provider: OAuthProvider, tmp_path: Path) -> None:
    account = seeded(provider, tmp_path)
    assert account.oauth2 is not None
    os.chmod(account.oauth2.token_file, 0o644)
    with pytest.warns(UserWarning, match="readable by others; chmod 600"):
        TokenSource(account).current()
    assert stat.S_IMODE(os.stat(account.oauth2.token_file).st_mode) == 0o600  # rewritten as 0600


def test_an_interrupted_auth_saves_nothing_and_says_so(provider: OAuthProvider, tmp_path: Path) -> None:
    auth = Auth(provider, tmp_path)
    auth.line_matching(r"enter the code")
    auth.process.send_signal(signal.SIGINT)
    status, _, err = auth.finish()
    assert status == 75 and "interrupted; nothing was saved: run `mailbox-relay auth box` again" in err
    assert not auth.grant_file.exists()


@pytest.mark.parametrize("status", [500, 503, 429])
def test_a_busy_or_failing_provider_is_temporary(
    provider: OAuthProvider, tmp_path: Path, httpserver: Any, status: int
) -> None:
    httpserver.expect_request("/token").respond_with_data("busy", status)
    account = seeded(provider, tmp_path, oauth2_token_url=httpserver.url_for("/token"))
    with pytest.raises(TokenProblem) as problem:
        TokenSource(account).current()
    assert (
        problem.value.kind == "network"
        and f"answered HTTP {status}; trying again later" in problem.value.line
    )
