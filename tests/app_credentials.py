"""An app's credentials for the tests (a certificate with its key, a Google service-account key)
and the checks a token endpoint makes of a signed assertion: the signature, by the registered
certificate's thumbprint, and the claims (Entra's certificate-credentials page; RFC 7523)."""

from __future__ import annotations

import base64
import datetime
import json
import time
from pathlib import Path
from typing import Any, Dict, Optional, Set

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Certificate:
    """A self-signed RSA certificate, as uploaded to an app registration."""

    def __init__(self, name: str = "mailbox-relay test app") -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(self.key, hashes.SHA256())
        )
        self.x5t = b64(self.cert.fingerprint(hashes.SHA1()))
        self.x5t_s256 = b64(self.cert.fingerprint(hashes.SHA256()))

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def pem(self) -> bytes:
        """The private key and the certificate in one file, as oauth2_certificate_file wants."""
        return self.key_pem() + self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> str:
        path.write_bytes(self.pem())
        path.chmod(0o600)
        return str(path)

    def service_account(self, email: str, token_uri: str) -> Dict[str, Any]:
        """A Google service account's JSON key with this key pair."""
        return {
            "type": "service_account",
            "project_id": "test",
            "private_key_id": self.x5t_s256[:40],
            "private_key": self.key_pem().decode(),
            "client_email": email,
            "client_id": "1234567890",
            "token_uri": token_uri,
        }


class AssertionRefused(Exception):
    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code  # Entra's AADSTS code for it
        self.why = why


def verify(
    token: str,
    certificate: Certificate,
    *,
    audience: str,
    issuer: str,
    subject: Optional[str] = None,
    seen: Optional[Set[str]] = None,
    by_thumbprint: bool = True,
) -> Dict[str, Any]:
    """The claims of a signed assertion, once its signature, thumbprint and claims check out;
    AssertionRefused with Entra's code otherwise."""
    try:
        head, body, signature = token.split(".")
        header, claims = json.loads(unb64(head)), json.loads(unb64(body))
    except ValueError:
        raise AssertionRefused(50027, "the assertion is not a JWT") from None
    alg = header.get("alg")
    if by_thumbprint:
        if alg == "RS256" and header.get("x5t") != certificate.x5t:
            raise AssertionRefused(700027, "no registered certificate has this x5t")
        if alg == "PS256" and header.get("x5t#S256") != certificate.x5t_s256:
            raise AssertionRefused(700027, "no registered certificate has this x5t#S256")
    if alg == "PS256":
        pad: Any = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    elif alg == "RS256":
        pad = padding.PKCS1v15()
    else:
        raise AssertionRefused(700027, f"alg {alg!r} is not accepted")
    try:
        certificate.key.public_key().verify(unb64(signature), f"{head}.{body}".encode(), pad, hashes.SHA256())
    except Exception:
        raise AssertionRefused(700027, "the signature does not verify") from None
    now = time.time()
    if claims.get("aud") != audience:
        raise AssertionRefused(700212, f"aud {claims.get('aud')!r} is not {audience}")
    if claims.get("iss") != issuer or claims.get("sub") != (subject or issuer):
        raise AssertionRefused(700211, "iss or sub is wrong")
    exp, iat = claims.get("exp"), claims.get("nbf", claims.get("iat"))
    if (
        not isinstance(exp, int)
        or not isinstance(iat, int)
        or not iat - 300 <= now <= exp
        or exp - iat > 3600
    ):
        raise AssertionRefused(700024, "the assertion is not within its valid time range")
    if seen is not None:
        jti = claims.get("jti")
        if not jti or jti in seen:
            raise AssertionRefused(700025, "the assertion's jti is missing or was used before")
        seen.add(jti)
    return dict(claims)
