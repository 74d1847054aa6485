"""XOAUTH2 end to end: fetch, watch, check and auth against the real Dovecot, whose oauth2
passdb asks the test OAuth2 provider (tests/oauth_provider.py) about every token, so expiry,
rotation and revocation are the provider's and Dovecot's own verdicts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, List

import pytest
import requests

from ..helpers import invoke
from ..oauth_provider import OAuthProvider
from ..peers import Ingress204, LocalServe
from .test_fetch import Account, Watch, messages
from .world import Dovecot


@pytest.fixture
def ingress() -> Iterator[Ingress204]:
    with Ingress204() as server:
        yield server


def oauth_box(dovecot: Dovecot, idp: OAuthProvider, tmp: Path, url: str, **keys: Any) -> Account:
    """A Dovecot user whose account logs in with XOAUTH2, its grant already stored (as by auth)."""
    grant = tmp / "grants" / "box.json"
    box = Account(dovecot, tmp, url, password=None, oauth2_token_file=str(grant), **idp.account(), **keys)
    grant.parent.mkdir(mode=0o700, exist_ok=True)
    grant.write_text(idp.grant_file(idp.grant(box.user)))
    grant.chmod(0o600)
    return box


def leaked(idp: OAuthProvider, *texts: str) -> List[str]:
    return [token for token in idp.issued if any(token in text for text in texts)]


def dovecot_logins(dovecot: Dovecot, user: str) -> int:
    log = (dovecot.root / "dovecot.log").read_text(errors="replace")
    return len(re.findall(rf"Login: user=<{user}>, method=XOAUTH2", log))


def authorise_again(box: Account, idp: OAuthProvider) -> None:
    """`mailbox-relay auth box` with the device flow, the person entering the code at once."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mailbox_relay", "auth", "box"],
        env={**os.environ, **box.env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:
        found = re.search(r"enter the code (\w+)", line)
        if found:
            requests.get(
                f"{idp.url}/device", params={"user_code": found.group(1), "user": box.user}, timeout=10
            )
            break
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "Account box is authorised" in out


def test_fetch_logs_in_with_xoauth2_and_shows_no_token_anywhere(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthProvider, ingress: Ingress204
) -> None:
    box = oauth_box(oauth_dovecot, idp, tmp_path, ingress.url)
    raws = messages(3, "xoauth2")
    box.append(*raws)
    code, out, err = box.fetch("-v")
    assert code == 0, out + err
    assert sorted(ingress.bodies) == sorted(raws)
    assert dovecot_logins(oauth_dovecot, box.user) == 1  # Dovecot itself took the token
    assert "auth xoauth2, client mailbox-relay-test" in err  # -v says how, never with what
    status = [invoke(["status", *args], env=box.env()) for args in ((), ("--json",))]
    check = invoke(["check", "--account", "box", "-v"], env=box.env())
    texts = [out, err, *[part for result in (*status, check) for part in result[1:]]]
    assert idp.issued and leaked(idp, *texts) == []


def test_a_token_the_server_refuses_is_renewed_once_and_the_fetch_goes_on(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthProvider, ingress: Ingress204
) -> None:
    box = oauth_box(oauth_dovecot, idp, tmp_path, ingress.url)
    box.append(messages(1, "first")[0])
    assert box.fetch()[0] == 0
    idp.forget_access_tokens()  # the stored token still looks valid for an hour
    box.append(messages(1, "second")[0])
    code, out, err = box.fetch()
    assert code == 0, out + err
    assert len(ingress.bodies) == 2 and idp.grants_used.get("refresh_token") == 2


def test_a_revoked_grant_fails_fetch_and_check_with_what_to_do(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthProvider
) -> None:
    with LocalServe(str(tmp_path / "serve")) as serve:
        box = oauth_box(oauth_dovecot, idp, tmp_path, serve.url)
        box.append(*messages(2, "check"))
        code, out, _ = invoke(["check", "--account", "box"], env=box.env())
        assert code == 0, out
        assert re.search(
            r"✓ oauth2 token: obtained from 127\.0\.0\.1:\d+; expires in 60 min; scopes imap", out
        )
        assert f"✓ imap login: {box.user} logged in (AUTHENTICATE XOAUTH2)" in out
        assert serve.maildir.count() == 0  # created nothing
        idp.revoke(box.user)
        code, out, _ = invoke(["check", "--account", "box"], env=box.env())
        assert code == 77 and "✗ oauth2 token: the OAuth2 grant of account box was refused" in out, out
        assert "run `mailbox-relay auth box` again" in out
        code, out, err = box.fetch()
        assert code == 75 and "run `mailbox-relay auth box` again" in out + err
        assert serve.maildir.count() == 0 and box.count() == 2


def test_watch_with_tokens_that_expire_every_few_seconds_loses_nothing(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthProvider, ingress: Ingress204, watches: List[Watch]
) -> None:
    idp.lifetime, idp.rotate = 4, True  # each session is replaced after ~3 s; each refresh rotates
    box = oauth_box(oauth_dovecot, idp, tmp_path, ingress.url, idle_refresh=1)
    watch = Watch(box)
    watches.append(watch)
    raws = messages(12, "expiring")
    for raw in raws:
        box.append(raw)
        time.sleep(0.7)
    watch.wait_for(lambda: len(ingress.bodies) >= len(raws), 30)
    time.sleep(1)
    assert sorted(ingress.bodies) == sorted(raws)  # each exactly once
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert watch.stop() == 0
    said = watch.text()
    assert said.count("runs out; reconnecting with a new one") >= 2, said
    assert dovecot_logins(oauth_dovecot, box.user) >= 3
    assert idp.grants_used.get("refresh_token", 0) >= 3
    grant = (tmp_path / "grants" / "box.json").read_text()
    assert any(token in grant for token in idp.refresh_tokens)  # the rotated one was saved
    assert "refused" not in said and leaked(idp, said, ps) == []


def test_a_revoked_grant_pauses_the_watch_until_auth_is_run_again(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthProvider, ingress: Ingress204, watches: List[Watch]
) -> None:
    idp.lifetime = 4  # the next session (in ~3 s) needs the grant again
    box = oauth_box(oauth_dovecot, idp, tmp_path, ingress.url, idle_refresh=1)
    watch = Watch(box)
    watches.append(watch)
    idp.revoke(box.user)
    watch.wait_for(lambda: "paused: the OAuth2 grant of account box was refused" in watch.text(), 20)
    assert "run `mailbox-relay auth box` again" in watch.text()
    box.append(messages(1, "while revoked")[0])
    time.sleep(2)
    assert ingress.bodies == [] and watch.process.poll() is None  # waiting, not gone
    authorise_again(box, idp)
    watch.wait_for(lambda: len(ingress.bodies) == 1, 20)
    assert "the OAuth2 grant changed; resuming" in watch.text()
    assert watch.stop() == 0
