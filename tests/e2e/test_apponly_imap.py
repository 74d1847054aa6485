"""App-only IMAP against the real Dovecot, whose oauth2 passdb asks the test provider
(tests/oauth_provider.py) about each token: Exchange Online's client credentials
(IMAP.AccessAsApp: XOAUTH2 with the mailbox as user) and a Google service account with
domain-wide delegation (the JWT-bearer grant, the mailbox as subject)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

from ..app_credentials import Certificate
from ..helpers import invoke
from ..oauth_provider import CLIENT_ID, OAuthProvider
from ..peers import Ingress204
from .test_fetch import Account, messages
from .world import Dovecot

pytestmark = pytest.mark.e2e


@pytest.fixture
def ingress() -> Iterator[Ingress204]:
    with Ingress204() as server:
        yield server


def test_client_credentials_fetch_with_the_mailbox_as_user(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthProvider, ingress: Ingress204
) -> None:
    secret = tmp_path / "app-secret"
    secret.write_text(idp.app_secret + "\n")
    secret.chmod(0o600)
    box = Account(
        oauth_dovecot,
        tmp_path,
        ingress.url,
        password=None,
        auth="client_credentials",
        oauth2_client_id=CLIENT_ID,
        oauth2_token_url=f"{idp.url}/token",
        oauth2_client_secret_file=str(secret),
    )
    idp.app_mailboxes[:] = [box.user]
    raws = messages(2, "app-only")
    box.append(*raws)
    code, out, err = box.fetch()
    assert code == 0, out + err
    assert sorted(ingress.bodies) == sorted(raws)
    assert idp.grants_used.get("client_credentials") == 1
    assert idp.app_secret not in out + err

    secret.write_text("the-secret-id-pasted-by-mistake\n")
    code, out, err = invoke(["check", "--account", "box"], env=box.env())
    assert code == 78, out + err
    assert "✗ oauth2 token" in out and "AADSTS7000215" in out and "not its Secret ID" in out


def test_google_service_account_fetch_with_the_mailbox_as_subject(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthProvider, ingress: Ingress204
) -> None:
    key = Certificate("service account")
    idp.service_account = key
    key_file = tmp_path / "service-account.json"
    key_file.write_text(json.dumps(key.service_account(idp.service_email, f"{idp.url}/token")))
    key_file.chmod(0o600)
    box = Account(
        oauth_dovecot,
        tmp_path,
        ingress.url,
        password=None,
        auth="google_service_account",
        oauth2_service_account_file=str(key_file),
    )
    raws = messages(2, "service-account")
    box.append(*raws)
    code, out, err = box.fetch()
    assert code == 0, out + err
    assert sorted(ingress.bodies) == sorted(raws)
    assert idp.grants_used.get("urn:ietf:params:oauth:grant-type:jwt-bearer") == 1

    idp.service_account = Certificate("another key")  # the key was deleted in the console
    code, out, err = invoke(["check", "--account", "box"], env=box.env())
    assert code == 78, out + err
    assert "Google refused the service account" in out
