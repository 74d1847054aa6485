"""Where the ingress is and how to trust it: the URL parsed once, and one TLS policy.

`deliver`, `import` (through requests) and `check` (through its own handshake) all read the same
`Endpoint` and `TlsPolicy`, so they can never disagree about a host, a port or a CA bundle.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Mapping, Optional, Union
from urllib.parse import urlsplit, urlunsplit

from mailbox_relay.outcome import ConfigError

if TYPE_CHECKING:
    import ssl

RELAY_PATH = "/rails/action_mailbox/relay/inbound_emails"


class Endpoint:
    """The ingress URL, checked and split once. A bare https://host gets the ingress's path
    (`default_path`: the relay path unless another ingress is chosen)."""

    __slots__ = ("host", "port", "scheme", "url")

    def __init__(self, url: str, default_path: str = RELAY_PATH) -> None:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as error:  # "Invalid IPv6 URL", "Port out of range 0-65535", ...
            raise ConfigError(f"the ingress URL {url!r} is not a URL ({error})") from None
        if parts.username is not None or parts.password is not None:
            # Not echoed: the point is that this secret should not be on a command line or in logs.
            raise ConfigError(
                "the ingress URL must not contain credentials (user:password@): set the password with "
                "MAILBOX_RELAY_PASSWORD or --password-file"
            )
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"the ingress URL {url!r} must start with https:// or http:// and name a host")
        _check_host_name(parts.hostname, url)
        if parts.path in ("", "/"):
            parts = parts._replace(path=default_path)
        self.url = urlunsplit(parts)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""  # never empty: checked above
        self.port = port or (443 if parts.scheme == "https" else 80)

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r})"

    @property
    def path(self) -> str:
        return urlsplit(self.url).path

    @property
    def host_port(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def refuse_plain_http(self, allow_http: bool) -> None:
        """The password must not cross a network in clear, unless the user said it may."""
        if self.scheme == "http" and not allow_http and not self.loopback:
            raise ConfigError(
                f"refusing to send the password over plain http to {self.host}: use https://, "
                "or pass --allow-http if the network between here and the app is trusted"
            )


def _check_host_name(host: str, url: str) -> None:
    if ":" in host:  # an IPv6 literal, already checked by urlsplit
        return
    try:
        host.encode("idna")  # labels of 1 to 63 characters, as DNS allows
    except UnicodeError:
        raise ConfigError(
            f"the ingress URL {url!r} names an impossible host: each dot-separated part of a host "
            "name must be 1 to 63 characters"
        ) from None


def is_loopback(host: str) -> bool:
    host = host.lower().strip("[]")
    if host in ("localhost", "::1") or host.endswith(".localhost"):
        return True
    octets = host.split(".")
    return len(octets) == 4 and octets[0] == "127" and all(o.isdigit() for o in octets)


# The variables requests itself honours for its CA bundle, in its order.
CA_BUNDLE_ENV = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


class TlsPolicy:
    """How the ingress's certificate is verified: --insecure, else --ca-bundle, else the CA
    bundle requests would take from the environment, else certifi's."""

    __slots__ = ("bundle", "insecure", "source")

    def __init__(
        self, *, insecure: bool, ca_bundle: Optional[str], environ: Mapping[str, str], https: bool = True
    ) -> None:
        self.insecure = insecure
        self.bundle: Optional[str] = None
        self.source = "certifi"
        if insecure:
            self.source = "--insecure"
            return
        if ca_bundle:
            self.bundle, self.source = ca_bundle, "ca_bundle"
        else:
            for name in CA_BUNDLE_ENV:
                if environ.get(name):
                    self.bundle, self.source = environ[name], f"env {name}"
                    break
        # Checked only where it is used: a stale REQUESTS_CA_BUNDLE must not stop an http:// URL.
        if https and self.bundle is not None and not os.path.exists(self.bundle):
            raise ConfigError(f"the CA bundle {self.bundle} ({self.source}) does not exist")

    @property
    def verify(self) -> Union[bool, str]:
        """What requests' `verify` takes: False, a bundle path, or True for certifi."""
        if self.insecure:
            return False
        return self.bundle or True

    def context(self) -> ssl.SSLContext:
        """An SSL context that trusts exactly what requests would trust (for check's handshake)."""
        import ssl

        if self.insecure:
            return ssl._create_unverified_context()
        if self.bundle is not None and os.path.isdir(self.bundle):
            return ssl.create_default_context(capath=self.bundle)
        import certifi  # what requests verifies against by default

        return ssl.create_default_context(cafile=self.bundle or certifi.where())


# What OpenSSL says when the other side of a TLS handshake speaks plain HTTP.
_PLAIN_HTTP_SIGNS = ("wrong version number", "record layer failure", "packet length too long", "http request")
UNREACHABLE_HINT = "is the app running, and is the port in the URL right?"


def plain_http_hint(error: BaseException) -> str:
    """ "; is this an http port? ..." when a TLS handshake met plain HTTP (an https:// URL with
    the app's http port), else ""."""
    text = " ".join(str(getattr(error, name, "") or "") for name in ("reason", "strerror")) + f" {error}"
    text = text.lower().replace("_", " ")
    if any(sign in text for sign in _PLAIN_HTTP_SIGNS):
        return "; is this an http port? Use the port that serves https, or an http:// URL"
    return ""
