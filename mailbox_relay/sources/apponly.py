"""App-only sign-in: tokens an application asks for with its own credential, no person, no
grant file, no refresh token.

- `auth = "client_credentials"` (Microsoft Entra): the client credentials grant (RFC 6749 4.4)
  with a client secret, or with a client assertion (RFC 7523) signed by the app's certificate:
  RS256 with the SHA-1 thumbprint (`x5t`), or PS256 with the SHA-256 one (`x5t#S256`). For
  Microsoft Graph (scope `https://graph.microsoft.com/.default`) and Exchange Online IMAP
  (`https://outlook.office365.com/.default`, the IMAP.AccessAsApp permission).
- `auth = "google_service_account"`: the JWT-bearer grant (RFC 7523 2.1) signed with a
  service account's key, for the mailbox as `sub` (domain-wide delegation), for Gmail IMAP.

`cryptography` is imported only to sign an assertion, never on deliver's path. Tokens live in
memory only (oauth2.TokenSource caches and renews them); a refusal is one line that names the
setting to fix, with the AADSTS code and what it means.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from typing import Any, Dict, Optional, Tuple

from mailbox_relay.accounts import Account, OAuth2
from mailbox_relay.outcome import ConfigError

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFE = 600  # seconds a signed assertion is valid (Entra: 5 to 10 minutes)
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"

# What Entra's AADSTS codes mean for an app-only sign-in, and what to do
# (learn.microsoft.com/en-us/entra/identity-platform/reference-error-codes).
AADSTS: Dict[int, str] = {
    7000215: "the client secret is wrong: oauth2_client_secret_file must hold the secret's Value, "
    "not its Secret ID (a new secret's value is shown once, when it is made)",
    7000222: "the client secret has expired: make a new one in the app registration",
    700016: "there is no such application in this tenant: check oauth2_client_id and oauth2_tenant, "
    "and that an admin consented to the app in this tenant",
    90002: "there is no such tenant: check oauth2_tenant",
    900023: "oauth2_tenant is not a tenant id or domain: check it",
    1002012: "the scope must be RESOURCE/.default (permissions come from admin consent): "
    "remove oauth2_scopes",
    70011: "the scope is invalid: remove oauth2_scopes, or give RESOURCE/.default",
    700027: "the certificate's signature was refused: upload this certificate to the app registration "
    "(Certificates & secrets), or check that oauth2_certificate_file holds its private key",
    700024: "the client assertion is outside its valid time: check this host's clock",
    7000112: "the application is disabled in this tenant",
    7000218: "the app needs a credential: set oauth2_client_secret_file or oauth2_certificate_file",
    500011: "the resource is not in this tenant: check graph_url or oauth2_scopes "
    "(Exchange Online IMAP needs the Office 365 Exchange Online service principal)",
    50034: "the account does not exist in this tenant",
}


def token_request(account: Account, oauth2: OAuth2) -> Tuple[str, Dict[str, str]]:
    """What to post to which token endpoint (oauth2.py posts it): (the URL, the form)."""
    if oauth2.grant == "google_service_account":
        return _service_account_form(account, oauth2)
    return oauth2.provider.token_url, _client_credentials_form(account, oauth2)


def _client_credentials_form(account: Account, oauth2: OAuth2) -> Dict[str, str]:
    form = {
        "grant_type": "client_credentials",
        "client_id": oauth2.client_id,
        "scope": " ".join(oauth2.provider.scopes),
    }
    if oauth2.certificate_file is not None:
        form["client_assertion_type"] = ASSERTION_TYPE
        form["client_assertion"] = client_assertion(account, oauth2)
    else:
        secret = oauth2.client_secret(account.name)
        if not secret:
            raise ConfigError(f"oauth2_client_secret_file of account {account.name} is empty")
        form["client_secret"] = secret
    return form


def client_assertion(account: Account, oauth2: OAuth2, now: Optional[float] = None) -> str:
    """The JWT Entra takes instead of a secret: aud = the token URL, iss = sub = the client,
    a fresh jti, valid for ASSERTION_LIFE; its header names the certificate by thumbprint."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    assert oauth2.certificate_file is not None
    data = _read(oauth2.certificate_file, f"oauth2_certificate_file of account {account.name}")
    where = f"oauth2_certificate_file {oauth2.certificate_file} of account {account.name}"
    key = _private_key(data, where)
    try:
        certificate = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{where} holds no PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    header: Dict[str, Any] = {"alg": oauth2.certificate_alg, "typ": "JWT"}
    if oauth2.certificate_alg == "PS256":
        header["x5t#S256"] = _b64(certificate.fingerprint(hashes.SHA256()))
    else:
        header["x5t"] = _b64(certificate.fingerprint(hashes.SHA1()))  # Entra names certificates by it
    issued = int(now if now is not None else time.time())
    claims = {
        "aud": oauth2.provider.token_url,
        "iss": oauth2.client_id,
        "sub": oauth2.client_id,
        "jti": str(uuid.uuid4()),
        "nbf": issued,
        "iat": issued,
        "exp": issued + ASSERTION_LIFE,
    }
    return sign_jwt(header, claims, key)


def _service_account_form(account: Account, oauth2: OAuth2) -> Tuple[str, Dict[str, str]]:
    """Google's JWT-bearer grant: iss = the service account, sub = the mailbox (domain-wide
    delegation), scope, aud = the token URL, an hour at most."""
    assert oauth2.service_account_file is not None
    where = f"oauth2_service_account_file {oauth2.service_account_file} of account {account.name}"
    raw = _read(oauth2.service_account_file, where)
    try:
        key_file = json.loads(raw)
        email, pem = str(key_file["client_email"]), str(key_file["private_key"]).encode()
    except (ValueError, KeyError, TypeError):
        raise ConfigError(
            f"{where} is not a service account's JSON key (client_email, private_key): download a "
            "new key from the Google Cloud console"
        ) from None
    url = oauth2.provider.token_url or str(key_file.get("token_uri") or GOOGLE_TOKEN_URL)
    if not url.startswith("https://"):
        from mailbox_relay.accounts import _oauth2_url

        url = _oauth2_url(url, f"token_uri of {where}")  # http:// only to loopback
    header: Dict[str, Any] = {"alg": "RS256", "typ": "JWT"}
    if key_file.get("private_key_id"):
        header["kid"] = str(key_file["private_key_id"])
    issued = int(time.time())
    claims = {
        "iss": email,
        "sub": oauth2.subject,
        "scope": " ".join(oauth2.provider.scopes),
        "aud": url,
        "iat": issued,
        "exp": issued + 3600,
    }
    assertion = sign_jwt(header, claims, _private_key(pem, where))
    return url, {"grant_type": JWT_BEARER, "assertion": assertion}


def sign_jwt(header: Dict[str, Any], claims: Dict[str, Any], key: Any) -> str:
    """A compact JWS: RS256 (PKCS#1 v1.5) or PS256 (PSS, salt of the digest's length)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    signing_input = f"{_b64(_json(header))}.{_b64(_json(claims))}".encode("ascii")
    if header["alg"] == "PS256":
        pad: Any = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    else:
        pad = padding.PKCS1v15()
    signature = key.sign(signing_input, pad, hashes.SHA256())
    return f"{signing_input.decode('ascii')}.{_b64(signature)}"


def _private_key(data: bytes, where: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{where} holds no unencrypted PEM private key (-----BEGIN PRIVATE KEY-----): "
            "export the key without a passphrase, beside the certificate"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"{where}: the private key must be RSA (Entra and Google sign with RS256/PS256)")
    return key


def _read(path: str, where: str) -> bytes:
    import os
    import warnings

    from mailbox_relay.settings import PasswordFileWarning

    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_mode & 0o077:
                warnings.warn(
                    f"{where} is readable by others; chmod 600 {path}", PasswordFileWarning, stacklevel=2
                )
            return handle.read()
    except OSError as error:
        raise ConfigError(f"cannot read {where}: {error.strerror or error}") from None


def _json(value: Dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def aadsts_code(answer: Dict[str, Any]) -> Optional[int]:
    """Entra's error code: `error_codes[0]`, else the AADSTSnnn in the description."""
    codes = answer.get("error_codes")
    if isinstance(codes, list) and codes and isinstance(codes[0], int):
        return codes[0]
    found = re.search(r"AADSTS(\d+)", str(answer.get("error_description") or ""))
    return int(found.group(1)) if found else None


def meaning(answer: Dict[str, Any]) -> str:
    """ "AADSTS7000215: the client secret is wrong: ..." — or "" for a code we do not know."""
    code = aadsts_code(answer)
    if code is None:
        return ""
    return f"AADSTS{code}: {AADSTS[code]}" if code in AADSTS else f"AADSTS{code}"


def app_refusal(status: int, answer: Dict[str, Any], account: Account, url: str) -> Optional[Tuple[str, str]]:
    """The (kind, line) for the token endpoint's "no" to an app: the AADSTS code and its
    meaning when Entra says one; a person must fix the app ("client"), never `auth`. None
    leaves it to oauth2.refusal (a redirect, a 5xx or 429, an answer that is not OAuth2's)."""
    if 300 <= status < 400 or status >= 500 or status == 429 or "error" not in answer:
        return None
    error = str(answer.get("error"))
    described = "".join(c if c.isprintable() else " " for c in str(answer.get("error_description") or ""))
    oauth2 = account.oauth2
    assert oauth2 is not None
    if oauth2.grant == "google_service_account":
        fix = (
            "in the Google Workspace admin console (Security, API controls, Domain-wide delegation), "
            f"allow the service account's client id the scope {' '.join(oauth2.provider.scopes)}, and check "
            f"that {account.username} is a mailbox of the domain"
        )
        return (
            "client",
            f"Google refused the service account of account {account.name} "
            f"({error}: {described[:120]}): {fix}",
        )
    said = meaning(answer) or (
        f"{described[:160] or 'no reason given'}: "
        "check oauth2_client_id, oauth2_tenant and the app's credential"
    )
    return (
        "client",
        f"the token endpoint {url} refused app {oauth2.client_id} of account {account.name} "
        f"(HTTP {status} {error}): {said}",
    )
