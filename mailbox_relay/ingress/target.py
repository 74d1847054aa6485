"""What a post needs: the ingress URL checked into an Endpoint, its TLS policy, the ingress's
row of formats.INGRESSES (path, secret, format), the secret, and the timeouts. Built once from
the connection settings by `target_from`; the client reads nothing else.

settings.py knows values and their sources only; this is where they become a place to post to.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional

from mailbox_relay.ingress.endpoint import Endpoint, TlsPolicy
from mailbox_relay.ingress.formats import INGRESSES, Ingress, ingress_of_path
from mailbox_relay.outcome import ConfigError
from mailbox_relay.settings import Layers, Settings


class Target(Settings):
    """The connection settings, with the ingress they name made concrete. (A Settings still, so
    fetch's context keeps reading max_size and envelope_recipient from it; once fetch keeps the
    two apart it need not be.)"""

    __slots__ = ("endpoint", "ingress_format", "tls")

    def __init__(
        self,
        values: Mapping[str, Any],
        sources: Optional[Mapping[str, str]] = None,
        *,
        password: str = "",
        environ: Mapping[str, str] = {},
    ) -> None:
        super().__init__(values, sources, password=password, environ=environ)
        self.ingress_format: Ingress = INGRESSES[self.ingress]  # looked up once, here
        self.endpoint = Endpoint(self.url, self.ingress_format.path)
        self._values["url"] = self.endpoint.url
        _check_ingress_path(self.endpoint.path, self.ingress, self.sources.get("ingress", "the default"))
        self.endpoint.refuse_plain_http(self.allow_http)
        self.tls = TlsPolicy(
            insecure=self.insecure,
            ca_bundle=self.ca_bundle,
            environ=environ,
            https=self.endpoint.scheme == "https",
        )

    def __repr__(self) -> str:
        return f"Target(url={self.url!r}, password=<hidden>, timeout={self.timeout!r})"

    @property
    def secret(self) -> str:
        """What the password setting holds for this ingress: password, signing key or API key."""
        return self.password

    def describe(self) -> List[str]:
        """Each setting and its source, for -v; the TLS policy; the password only said to be set."""
        *lines, password = super().describe()
        return [
            *lines,
            f"tls = {'not verified' if self.tls.insecure else 'verified'} ({self.tls.source})",
            password,
        ]


def _check_ingress_path(path: str, ingress: str, source: str) -> None:
    """A URL that ends in another ingress's path is a mix-up: say so before anything is sent."""
    named = ingress_of_path(path)
    if named is not None and named.name != ingress:
        raise ConfigError(
            f"the URL ends in the {named.name} ingress's path, but the ingress is {ingress} ({source}): "
            f"set ingress = {named.name}, or give the URL {INGRESSES[ingress].path} (or a bare host)"
        )


def target_from(layers: Layers) -> Target:
    """Resolve every connection setting into a Target; raise ConfigError (a temporary failure
    for deliver) if one is bad."""
    values, sources = Target.values_from(layers)
    password, sources["password"] = layers.password()
    target = Target(values, sources, password=password or "", environ=layers.environ)
    if password is None:  # after the URL's checks, so a missing URL is named first
        raise ConfigError(
            "no ingress password: set MAILBOX_RELAY_PASSWORD (or INGRESS_PASSWORD), pass "
            "--password-file, or put password_file in the config file"
        )
    return target
