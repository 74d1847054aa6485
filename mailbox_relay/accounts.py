"""Accounts for `fetch`, `watch`, `check --account`, `status` and `auth`: the `[accounts.NAME]`
tables of the config file, checked once into typed `Account`s. Pure: no I/O but reading a
password file or running a password command, and those only when asked.

Every key is a `Field` of `Account`, declared once with its parser, default and help, the same
machinery as the top-level settings (settings.py); an account field has no option and no
environment name: its value comes from the table, a provider preset, or the default, and
remembers which, so `-v` can say so. An unknown key is an error, as at the top level. The
README's table of account keys is generated from these fields (tests/test_repo.py checks it).
"""

from __future__ import annotations

import datetime
import os
import shlex
import subprocess
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mailbox_relay.ingress.endpoint import is_loopback
from mailbox_relay.outcome import ConfigError
from mailbox_relay.settings import (
    Field,
    Layers,
    Resolved,
    parse_choice,
    parse_logins,
    parse_recipients,
    parse_seconds,
    parse_str,
    parse_timeout,
    read_password_file,
    state_home,
)

# Where each provider's IMAP lives. Both want implicit TLS on 993 (see docs: Gmail needs IMAP
# turned on and an app password; Microsoft 365 turned basic auth off in 2022).
PRESETS: Dict[str, Tuple[str, int, str]] = {
    "gmail": ("imap.gmail.com", 993, "implicit"),
    "google": ("imap.gmail.com", 993, "implicit"),
    "microsoft": ("outlook.office365.com", 993, "implicit"),
}
# ... and their POP3 (source = "pop3"): implicit TLS on 995.
POP3_PRESETS: Dict[str, Tuple[str, int, str]] = {
    "gmail": ("pop.gmail.com", 995, "implicit"),
    "google": ("pop.gmail.com", 995, "implicit"),
    "microsoft": ("outlook.office365.com", 995, "implicit"),
}
TLS_MODES = ("implicit", "starttls", "none")
AFTER_MODES = ("keep", "seen", "delete", "move:FOLDER")
PASSWORD_COMMAND_SECONDS = 30.0
AUTH_MODES = ("password", "xoauth2", "client_credentials", "google_service_account")
# App-only sign-in (sources/apponly.py): no person, no grant file; a secret, a certificate or a
# service-account key gets each token.
APP_AUTH = ("client_credentials", "google_service_account")
# Which source module reads an account.
SOURCES = ("imap", "pop3", "graph")
SUPPORTED_SOURCES = ("imap", "pop3", "graph")
POP3_AFTER = ("keep", "delete")  # POP3 has no flags and no folders: no seen, no move
POP3_FOLDER = "INBOX"  # POP3's one maildrop, by the name the state keeps it under
GRAPH_URL = "https://graph.microsoft.com/v1.0"
GRAPH_POLL = 15.0  # graph: seconds between delta rounds in watch, unless poll_interval says
EXCHANGE_APP_SCOPE = "https://outlook.office365.com/.default"  # IMAP.AccessAsApp
MICROSOFT_LOGIN = "https://login.microsoftonline.com"
ACCOUNT = "account"  # the Field group of account keys: no option, no environment name


@dataclass(frozen=True)
class OAuth2Provider:
    """A provider's OAuth2 endpoints, and how `mailbox-relay auth` obtains the first grant."""

    token_url: str
    authorize_url: str = ""  # the loopback flow (RFC 8252, with PKCE)
    device_url: str = ""  # the device-code flow (RFC 8628)
    scopes: Tuple[str, ...] = ()
    authorize_extra: Tuple[Tuple[str, str], ...] = ()  # e.g. Google's access_type=offline


_GOOGLE = OAuth2Provider(
    token_url="https://oauth2.googleapis.com/token",
    authorize_url="https://accounts.google.com/o/oauth2/v2/auth",
    scopes=("https://mail.google.com/",),
    # Without these Google issues no refresh token (or only on the very first consent).
    authorize_extra=(("access_type", "offline"), ("prompt", "consent")),
)
_MICROSOFT = "https://login.microsoftonline.com/common/oauth2/v2.0"
OAUTH2_PRESETS: Dict[str, OAuth2Provider] = {
    "gmail": _GOOGLE,  # Google's device flow does not grant the Gmail scope: loopback only
    "google": _GOOGLE,
    "microsoft": OAuth2Provider(
        token_url=f"{_MICROSOFT}/token",
        authorize_url=f"{_MICROSOFT}/authorize",
        device_url=f"{_MICROSOFT}/devicecode",
        scopes=("https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access"),
    ),
}


@dataclass(frozen=True)
class OAuth2:
    """How an OAuth2 account gets its access tokens: a token command, or our own refresh with a
    grant that `mailbox-relay auth` stored in `token_file` (auth = "xoauth2"); or app-only
    (`grant` client_credentials or google_service_account), asking anew with the app's own
    credential: a secret, a certificate, a service-account key."""

    provider: OAuth2Provider
    client_id: str
    client_secret_file: Optional[str]
    token_command: Optional[str]
    token_file: str
    grant: str = "refresh"  # refresh | client_credentials | google_service_account
    certificate_file: Optional[str] = None  # client_credentials: PEM key and certificate
    certificate_alg: str = "RS256"  # RS256 (header x5t) or PS256 (header x5t#S256)
    service_account_file: Optional[str] = None  # google_service_account: the JSON key
    subject: str = ""  # google_service_account: the mailbox the token is for

    @property
    def app_only(self) -> bool:
        return self.grant != "refresh"

    def client_secret(self, account: str) -> Optional[str]:
        if self.client_secret_file is None:
            return None
        where = f"oauth2_client_secret_file of account {account}"
        return read_password_file(self.client_secret_file, where)[0]

    def describe(self) -> str:
        if self.grant == "google_service_account":
            return (
                f"auth google_service_account, key {self.service_account_file}, mailbox {self.subject}, "
                f"scopes {' '.join(self.provider.scopes)}"
            )
        if self.grant == "client_credentials":
            credential = (
                f"certificate {self.certificate_file} ({self.certificate_alg})"
                if self.certificate_file
                else f"secret in {self.client_secret_file}"
            )
            return (
                f"auth client_credentials, client {self.client_id} at {self.provider.token_url}, "
                f"{credential}, scopes {' '.join(self.provider.scopes)}"
            )
        if self.token_command is not None:
            return f"auth xoauth2, tokens from oauth2_token_command {self.token_command}"
        return (
            f"auth xoauth2, client {self.client_id} at {self.provider.token_url}, "
            f"scopes {' '.join(self.provider.scopes) or '(none)'}, grant in {self.token_file}"
        )


@dataclass(frozen=True)
class After:
    """What to do with a message once the ingress answered 2xx (never before)."""

    action: str  # keep | seen | delete | move
    folder: str = ""  # for move

    def __str__(self) -> str:
        return f"move:{self.folder}" if self.action == "move" else self.action


class SecretCommandFailed(ConfigError):
    """A password or token command failed or printed nothing. Temporary for `watch`: the secret
    store behind it may be locked or restarting, so it is run again after a backoff."""


def run_secret_command(command: str, key: str, account: str) -> str:
    """The first line a password or token command prints; it runs without a shell, and what it
    prints is never logged (only that it failed, and its exit code)."""
    try:
        result = subprocess.run(
            shlex.split(command),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=PASSWORD_COMMAND_SECONDS,
            check=False,
        )
    except (OSError, ValueError, subprocess.TimeoutExpired) as error:
        raise SecretCommandFailed(f"{key} of account {account} failed to run: {error}") from None
    first_line = result.stdout.decode("utf-8", "replace").split("\n")[0].rstrip("\r")
    if result.returncode != 0 or not first_line:
        problem = f"exited {result.returncode}" if result.returncode else "printed nothing"
        raise SecretCommandFailed(f"{key} of account {account} {problem}; run it by hand to see why")
    return first_line


# --- parsing ----------------------------------------------------------------------------------


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(f"{where} must be a port number (1 to 65535), not {value!r}")
    return value


def _folders(value: Any, where: str) -> Tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(f, str) and f for f in value):
        raise ConfigError(f"{where} must be a non-empty list of folder names, not {value!r}")
    return tuple(dict.fromkeys(value))


def _after(value: Any, where: str) -> After:
    text = parse_str(value, where)
    if text in ("keep", "seen", "delete"):
        return After(text)
    if text.startswith("move:") and text[5:]:
        return After("move", text[5:])
    raise ConfigError(f"{where} must be one of {', '.join(AFTER_MODES)}, not {value!r}")


def _start(value: Any, where: str) -> str:
    if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        return value.isoformat()  # TOML's bare date: start = 2024-01-31
    text = parse_str(value, where)
    if text in ("new", "all"):
        return text
    try:
        return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        raise ConfigError(f"{where} must be new, all or a date such as 2024-01-31, not {value!r}") from None


def _oauth2_url(value: Any, where: str) -> str:
    """https, or http to a loopback host only: grants and tokens must not cross a network in clear."""
    from urllib.parse import urlsplit

    text = parse_str(value, where)
    parts = urlsplit(text)
    if parts.scheme == "https" and parts.hostname:
        return text
    if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
        return text
    raise ConfigError(f"{where} must be an https:// URL (http:// only to a loopback host), not {value!r}")


def _scopes(value: Any, where: str) -> Tuple[str, ...]:
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or not all(isinstance(s, str) and s and " " not in s for s in value):
        raise ConfigError(f"{where} must be a list of scopes, not {value!r}")
    return tuple(value)


def _command(value: Any, where: str) -> str:
    text = parse_str(value, where)
    try:
        if not shlex.split(text):
            raise ValueError("it is empty")
    except ValueError as error:
        raise ConfigError(f"{where} cannot be split into words: {error}") from None
    return text


_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def _age(value: Any, where: str) -> float:
    """A duration as seconds: "30d", "12h", "90m", "45s", or a number of days (getmail's
    delete_after counts days)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value * _UNITS["d"]
    text = parse_str(value, where).strip()
    number, unit = text[:-1], text[-1:].lower()
    try:
        if unit in _UNITS and float(number) >= 0:
            return float(number) * _UNITS[unit]
    except ValueError:
        pass
    raise ConfigError(f'{where} must be a duration such as "30d", "12h" or "90m", not {value!r}')


def _poll(value: Any, where: str) -> float:
    seconds = parse_seconds(value, where)
    if seconds < 1:
        raise ConfigError(f"{where} must be at least 1 second, not {value!r}")
    return seconds


def _field(parse: Any, default: Any, help: str, **kwargs: Any) -> Any:
    return Field(parse, default, help, group=ACCOUNT, **kwargs)


class Account(Resolved):
    """One `[accounts.NAME]` table, checked. Each key below is a typed attribute, declared once;
    `sources` says where each value came from ("config PATH [accounts.NAME]", "preset gmail",
    "default"). The password itself is never shown: `password()` reads it when asked."""

    __slots__ = ("name", "oauth2", "password_source")

    source: Field[str] = _field(
        parse_choice(*SOURCES),
        "imap",
        "Which source reads the account: imap; pop3 (one maildrop, kept under the folder name "
        'INBOX); or graph (Microsoft Graph, with auth = "client_credentials").',
    )
    provider: Field[Optional[str]] = _field(
        parse_choice(*PRESETS),
        None,
        "A preset for host, port and tls, and for OAuth2's endpoints and scopes: gmail (or google), "
        "microsoft.",
    )
    host: Field[str] = _field(
        parse_str,
        None,
        "The IMAP (or POP3) server (required without a provider).",
        shown_default="the provider's",
    )
    port: Field[int] = _field(
        _port,
        None,
        "The server's port.",
        shown_default="the provider's, else 993 (implicit TLS) or 143; POP3: 995 or 110",
    )
    tls: Field[str] = _field(
        parse_choice(*TLS_MODES),
        None,
        "implicit (TLS from the first byte), starttls, or none (only to a loopback host).",
        shown_default="the provider's, else implicit",
    )
    username: Field[str] = _field(parse_str, None, "The IMAP login name (required).")
    password_file: Field[Optional[str]] = _field(
        parse_str,
        None,
        "Read the IMAP password from the first line of this file (the top-level password_file is "
        "the ingress's).",
    )
    password_command: Field[Optional[str]] = _field(
        _command,
        None,
        "Run this command (without a shell) at each login; its first output line is the IMAP password.",
    )
    password_value: Field[Optional[str]] = _field(
        parse_str,
        None,
        "The IMAP password itself (keep the config file 0600); one of the three password keys.",
        name="password",
    )
    auth: Field[str] = _field(
        parse_choice(*AUTH_MODES),
        "password",
        "How to log in: password (LOGIN), xoauth2 (AUTHENTICATE XOAUTH2 with OAuth2 tokens), "
        "client_credentials (app-only: Microsoft Graph, or Exchange Online IMAP with IMAP.AccessAsApp), "
        "or google_service_account (Gmail IMAP, domain-wide delegation, the username as subject).",
    )
    oauth2_client_id: Field[Optional[str]] = _field(
        parse_str, None, "xoauth2: the OAuth2 client (mailbox-relay refreshes the tokens itself)."
    )
    oauth2_client_secret_file: Field[Optional[str]] = _field(
        parse_str,
        None,
        "xoauth2: a file whose first line is the client secret, where the provider wants one.",
    )
    oauth2_token_url: Field[Optional[str]] = _field(
        _oauth2_url,
        None,
        "xoauth2, client_credentials: the token endpoint (https://; the provider's preset, or "
        "Microsoft's for oauth2_tenant, otherwise).",
    )
    oauth2_tenant: Field[Optional[str]] = _field(
        parse_str,
        None,
        "client_credentials: the Entra tenant (its id or a domain such as contoso.onmicrosoft.com); "
        "the token endpoint is login.microsoftonline.com/TENANT/oauth2/v2.0/token.",
    )
    oauth2_certificate_file: Field[Optional[str]] = _field(
        parse_str,
        None,
        "client_credentials: a PEM file with the private key and the certificate uploaded to the app "
        "registration; signs a client assertion instead of sending a secret.",
    )
    oauth2_certificate_alg: Field[str] = _field(
        parse_choice("RS256", "PS256"),
        "RS256",
        "client_credentials: how the client assertion is signed: RS256 (with the certificate's SHA-1 "
        "thumbprint, x5t) or PS256 (with its SHA-256 thumbprint, x5t#S256).",
    )
    oauth2_service_account_file: Field[Optional[str]] = _field(
        parse_str,
        None,
        "google_service_account: the service account's JSON key file (keep it 0600); the username is "
        "the mailbox the token is for.",
    )
    oauth2_authorize_url: Field[Optional[str]] = _field(
        _oauth2_url, None, "xoauth2: the authorization endpoint of `auth`'s loopback flow."
    )
    oauth2_device_url: Field[Optional[str]] = _field(
        _oauth2_url, None, "xoauth2: the device-code endpoint of `auth`'s device flow."
    )
    oauth2_scopes: Field[Optional[Tuple[str, ...]]] = _field(
        _scopes, None, "xoauth2: the scopes to ask for (a list, or one space separated string)."
    )
    oauth2_token_command: Field[Optional[str]] = _field(
        _command,
        None,
        "xoauth2: run this command (without a shell) at each login; its first output line is an "
        "access token. Instead of oauth2_client_id.",
    )
    oauth2_token_file: Field[Optional[str]] = _field(
        parse_str,
        None,
        "xoauth2: where `auth` stores the grant (0600).",
        shown_default="$XDG_STATE_HOME/mailbox-relay/oauth2/NAME.json",
    )
    folders: Field[Tuple[str, ...]] = _field(_folders, ("INBOX",), "The folders to fetch and watch.")
    after: Field[After] = _field(
        _after,
        After("keep"),
        "What to do with a message once the ingress answered 2xx, never before: keep, seen, delete, "
        "or move:FOLDER.",
    )
    start: Field[str] = _field(
        _start,
        "new",
        "The first pass: new (only mail that arrives from then on), all, or a date such as "
        "2024-01-31 (mail on or after it).",
    )
    delete_after: Field[Optional[float]] = _field(
        _age,
        None,
        'pop3, with after = "keep": delete what was delivered longer ago than this ("30d", "12h"; '
        "getmail's delete_after).",
    )
    envelope_recipient: Field[Tuple[str, ...]] = _field(
        parse_recipients, (), "Add X-Original-To: ADDR to each message, as deliver's option does."
    )
    poll_interval: Field[float] = _field(
        _poll,
        None,
        "watch: seconds between polls where the server has no IDLE, and between Graph's delta "
        "rounds (at least 1).",
        shown_default="60; 15 for graph",
    )
    idle_refresh: Field[float] = _field(
        _poll, 90.0, "watch: re-issue IDLE this often, which proves the connection alive (at least 1)."
    )
    max_connections: Field[int] = _field(
        parse_logins,
        15,
        "watch: at most this many connections to the account at once (one per folder; Gmail "
        "allows 15); folders beyond it wait for one.",
    )
    timeout: Field[float] = _field(
        parse_timeout,
        30.0,
        "Seconds that bound each whole IMAP command (connect and login included) and each whole "
        "OAuth2 token request, not each read (the top-level timeout bounds each post to the ingress).",
    )
    graph_url: Field[str] = _field(
        _oauth2_url,
        GRAPH_URL,
        "graph: the Microsoft Graph endpoint (a national cloud's, e.g. https://graph.microsoft.us/v1.0).",
    )
    spool_dir: Field[Optional[str]] = _field(
        parse_str,
        None,
        "graph: where each downloaded message waits (0700) until it is acknowledged, so every retry "
        "posts the first download's bytes.",
        shown_default="$XDG_STATE_HOME/mailbox-relay/spool/NAME",
    )
    ca_bundle: Field[Optional[str]] = _field(
        parse_str,
        None,
        "Verify the IMAP server's certificate with this CA bundle (the top-level ca_bundle is the "
        "ingress's); certifi's otherwise.",
    )

    def __init__(
        self,
        name: str,
        values: Mapping[str, Any],
        sources: Optional[Mapping[str, str]] = None,
        *,
        password_source: Tuple[str, str] = ("", ""),
        oauth2: Optional[OAuth2] = None,
    ) -> None:
        super().__init__(values, sources)
        self.name = name
        # ("file" | "command" | "config" | "xoauth2", its value): never logged
        self.password_source = password_source
        self.oauth2 = oauth2  # set exactly when auth = "xoauth2"

    def __repr__(self) -> str:
        return f"Account({self.name!r}, {self.username!r} at {self.host}:{self.port})"

    @property
    def start_date(self) -> Optional[datetime.date]:
        return None if self.start in ("new", "all") else datetime.date.fromisoformat(self.start)

    def password(self) -> str:
        """The IMAP password, read now (a password command runs each time, without a shell)."""
        kind, value = self.password_source
        if kind == "file":
            return read_password_file(value, f"password_file of account {self.name}")[0]
        if kind == "command":
            return run_secret_command(value, "password_command", self.name)
        return value

    def describe(self) -> List[str]:
        """For -v and check: the account in two lines, then every value set and where it came
        from. The password only by where it lives."""
        kind, value = self.password_source
        where = "in the config file" if kind == "config" else f"{kind} {value}"
        auth = self.oauth2.describe() if self.oauth2 else f"password {where}"
        lines = [
            f"account {self.name}: {self.username} at {self.host}:{self.port} (tls {self.tls})",
            f"account {self.name}: folders {', '.join(self.folders)}; after {self.after}; "
            f"start {self.start}; {auth}",
        ]
        for key, value in self._values.items():
            if value is not None:
                shown = "<set>" if key == "password" else repr(str(value) if key == "after" else value)
                lines.append(f"account {self.name}: {key} = {shown} ({self.sources.get(key, 'default')})")
        return lines


ACCOUNT_FIELDS: Dict[str, Field[Any]] = {field.name: field for field in Account.fields()}
PASSWORD_KEYS = ("password_file", "password_command", "password")
OAUTH2_KEYS = tuple(key for key in ACCOUNT_FIELDS if key.startswith("oauth2_"))


def parse_account(name: str, table: Any, path: str, token_dir: str = "") -> Account:
    """One [accounts.NAME] table. `token_dir` holds the OAuth2 grants `auth` stores (default:
    the state directory's oauth2/)."""
    where = f"[accounts.{name}] in {path}"
    if not isinstance(table, dict):
        raise ConfigError(f"accounts.{name} in {path} must be a table ([accounts.{name}])")
    unknown = sorted(set(table) - set(ACCOUNT_FIELDS))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; known keys: {', '.join(ACCOUNT_FIELDS)}")
    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    for key, field in ACCOUNT_FIELDS.items():
        if key in table:
            values[key], sources[key] = (
                field.parse(table[key], f"{key} of {where}"),
                f"config {path} [accounts.{name}]",
            )
        else:
            values[key], sources[key] = field.default, "default"
    if values["source"] not in SUPPORTED_SOURCES:
        raise ConfigError(
            f"{where}: source = {values['source']} is not supported yet; "
            f"only {', '.join(SUPPORTED_SOURCES)} is"
        )
    if values["source"] == "pop3":
        _pop3(values, table, where)
    elif values["delete_after"] is not None:
        raise ConfigError(f'{where}: delete_after applies to POP3 accounts only (source = "pop3")')
    if values["source"] == "graph":
        _graph(values, sources, name, where)
    if values["poll_interval"] is None:
        values["poll_interval"] = GRAPH_POLL if values["source"] == "graph" else 60.0
    _server(values, sources, where)
    if values["username"] is None:
        raise ConfigError(f"{where} has no username")
    if values["auth"] in APP_AUTH:
        oauth2 = _app_only(values, where)
        return Account(name, values, sources, password_source=(values["auth"], ""), oauth2=oauth2)
    if values["auth"] == "xoauth2":
        token_dir = token_dir or os.path.join(state_home(os.environ), "oauth2")
        oauth2 = _oauth2(values, name, where, token_dir)
        return Account(name, values, sources, password_source=("xoauth2", ""), oauth2=oauth2)
    given = [key for key in OAUTH2_KEYS if values[key] is not None and key != "oauth2_certificate_alg"]
    if given:
        raise ConfigError(f'{where} has {given[0]} but auth = "password": set auth = "xoauth2" to use OAuth2')
    return Account(name, values, sources, password_source=_password_source(values, where))


def _oauth2(values: Mapping[str, Any], name: str, where: str, token_dir: str) -> OAuth2:
    """auth = "xoauth2": either a token command, or a client of a provider (preset or URLs)."""
    given = [key for key in PASSWORD_KEYS if values[key] is not None]
    if given:
        raise ConfigError(f'{where} has {given[0]}, but auth = "xoauth2" logs in with tokens: remove it')
    preset = OAUTH2_PRESETS.get(values["provider"] or "")
    provider = OAuth2Provider(
        token_url=values["oauth2_token_url"] or (preset.token_url if preset else ""),
        authorize_url=values["oauth2_authorize_url"] or (preset.authorize_url if preset else ""),
        device_url=values["oauth2_device_url"] or (preset.device_url if preset else ""),
        scopes=values["oauth2_scopes"] or _preset_scopes(preset, values["source"]),
        authorize_extra=preset.authorize_extra if preset else (),
    )
    command, client_id = values["oauth2_token_command"], values["oauth2_client_id"]
    if (command is None) == (client_id is None):
        raise ConfigError(
            f'{where}: auth = "xoauth2" needs oauth2_client_id (mailbox-relay refreshes the tokens) '
            "or oauth2_token_command (a command prints one), and only one of them"
        )
    if client_id is not None and not provider.token_url:
        raise ConfigError(f"{where} needs oauth2_token_url (or provider = {' or '.join(OAUTH2_PRESETS)})")
    token_file = values["oauth2_token_file"] or os.path.join(token_dir, f"{name}.json")
    return OAuth2(provider, client_id or "", values["oauth2_client_secret_file"], command, token_file)


def _pop3(values: Dict[str, Any], table: Mapping[str, Any], where: str) -> None:
    """What POP3 cannot do is said at load time, not at the first message: one maildrop (no
    folders), no flags (after = keep or delete), no dates to search (start = new or all)."""
    if "folders" in table and values["folders"] != (POP3_FOLDER,):
        raise ConfigError(
            f'{where}: POP3 has one maildrop and no folders: remove folders (or set ["{POP3_FOLDER}"])'
        )
    if values["after"].action not in POP3_AFTER:
        raise ConfigError(
            f'{where}: after = "{values["after"]}" is not possible over POP3: use "keep" or "delete"'
        )
    if values["start"] not in ("new", "all"):
        raise ConfigError(
            f'{where}: POP3 cannot search by date: start must be "new" or "all" for source = "pop3"'
        )
    if values["delete_after"] is not None and values["after"].action == "delete":
        raise ConfigError(
            f'{where}: delete_after keeps mail on the server for a while: set after = "keep" with it '
            '(after = "delete" deletes at once)'
        )


def _preset_scopes(preset: Optional[OAuth2Provider], source: str) -> Tuple[str, ...]:
    """The preset's scopes; Microsoft grants POP3 under its own scope, not IMAP's."""
    if preset is None:
        return ()
    if source == "pop3":
        return tuple(
            scope.replace("/IMAP.AccessAsUser.All", "/POP.AccessAsUser.All") for scope in preset.scopes
        )
    return preset.scopes


def _graph(values: Dict[str, Any], sources: Dict[str, str], name: str, where: str) -> None:
    """source = "graph": host, port and tls are the Graph endpoint's (for -v and the log lines);
    it signs in with tokens only; its spool lives beside the state unless spool_dir says."""
    from urllib.parse import urlsplit

    if values["auth"] not in ("client_credentials", "xoauth2"):
        raise ConfigError(
            f'{where}: source = "graph" signs in with OAuth2: set auth = "client_credentials" '
            '(an app registration; see README, "Microsoft Graph")'
        )
    for key in ("host", "port", "tls"):
        if values[key] is not None:
            raise ConfigError(f'{where}: {key} is for IMAP; source = "graph" uses graph_url')
    url = urlsplit(values["graph_url"])
    values["host"], sources["host"] = url.hostname, sources.get("graph_url", "default")
    values["port"] = url.port or (443 if url.scheme == "https" else 80)
    values["tls"] = "implicit" if url.scheme == "https" else "none"
    sources["port"] = sources["tls"] = sources["host"]
    if values["spool_dir"] is None:
        values["spool_dir"] = os.path.join(state_home(os.environ), "spool", name)
    if values["folders"] == ("INBOX",):  # the IMAP default: Graph's well-known name
        values["folders"] = ("inbox",)


def _app_only(values: Mapping[str, Any], where: str) -> OAuth2:
    """auth = "client_credentials" (a secret or a certificate) or "google_service_account" (a
    JSON key): tokens are asked for anew with the app's own credential; there is no grant file."""
    auth = values["auth"]
    given = [key for key in (*PASSWORD_KEYS, "oauth2_token_command", "oauth2_token_file") if values[key]]
    if given:
        raise ConfigError(f"{where} has {given[0]}, but auth = {auth!r} signs in as an app: remove it")
    if auth == "google_service_account":
        return _service_account(values, where)
    secret, certificate = values["oauth2_client_secret_file"], values["oauth2_certificate_file"]
    if values["oauth2_client_id"] is None or (secret is None) == (certificate is None):
        raise ConfigError(
            f'{where}: auth = "client_credentials" needs oauth2_client_id, and oauth2_client_secret_file '
            "or oauth2_certificate_file (only one of them)"
        )
    tenant, token_url = values["oauth2_tenant"], values["oauth2_token_url"]
    if token_url is None:
        if tenant is None:
            raise ConfigError(
                f'{where}: auth = "client_credentials" needs oauth2_tenant (or oauth2_token_url)'
            )
        token_url = f"{MICROSOFT_LOGIN}/{tenant}/oauth2/v2.0/token"
    if values["oauth2_scopes"]:
        scopes = values["oauth2_scopes"]
    elif values["source"] == "graph":
        from urllib.parse import urlsplit

        scopes = (f"https://{urlsplit(values['graph_url']).netloc}/.default",)
    else:
        scopes = (EXCHANGE_APP_SCOPE,)
    return OAuth2(
        OAuth2Provider(token_url=token_url, scopes=tuple(scopes)),
        values["oauth2_client_id"],
        secret,
        None,
        "",
        grant="client_credentials",
        certificate_file=certificate,
        certificate_alg=values["oauth2_certificate_alg"],
    )


def _service_account(values: Mapping[str, Any], where: str) -> OAuth2:
    key_file = values["oauth2_service_account_file"]
    if key_file is None:
        raise ConfigError(f'{where}: auth = "google_service_account" needs oauth2_service_account_file')
    if values["source"] != "imap":
        raise ConfigError(f'{where}: auth = "google_service_account" is for Gmail IMAP (source = "imap")')
    others = [
        key
        for key in ("oauth2_client_secret_file", "oauth2_certificate_file", "oauth2_tenant")
        if values[key]
    ]
    if others:
        raise ConfigError(
            f'{where} has {others[0]}, but auth = "google_service_account" uses the JSON key only'
        )
    return OAuth2(
        OAuth2Provider(
            token_url=values["oauth2_token_url"] or "",  # "": the key file's token_uri
            scopes=tuple(values["oauth2_scopes"] or _GOOGLE.scopes),
        ),
        values["oauth2_client_id"] or "",
        None,
        None,
        "",
        grant="google_service_account",
        service_account_file=key_file,
        subject=values["username"],
    )


def _server(values: Dict[str, Any], sources: Dict[str, str], where: str) -> None:
    """host, port and tls: the preset's, each overridable; without a preset, host is required."""
    provider = values["provider"] or ""
    presets = POP3_PRESETS if values["source"] == "pop3" else PRESETS
    preset_host, preset_port, preset_tls = presets.get(provider, ("", 0, "implicit"))
    preset = f"preset {provider}" if provider else "default"
    if not values["host"]:
        if not preset_host:
            raise ConfigError(f"{where} needs host (or provider = {' or '.join(PRESETS)})")
        values["host"], sources["host"] = preset_host, preset
    if not values["tls"]:
        values["tls"], sources["tls"] = preset_tls, preset
    if not values["port"]:
        pop3 = values["source"] == "pop3"
        port = preset_port or (
            (995 if pop3 else 993) if values["tls"] == "implicit" else (110 if pop3 else 143)
        )
        values["port"], sources["port"] = port, preset if preset_port else "default"
    if values["tls"] == "none" and not is_loopback(values["host"]):
        # The IMAP password would cross the network in clear.
        raise ConfigError(f"{where}: tls = none is allowed only to a loopback host, not {values['host']}")


def _password_source(values: Mapping[str, Any], where: str) -> Tuple[str, str]:
    given = [key for key in PASSWORD_KEYS if values[key] is not None]
    if not given:
        raise ConfigError(f"{where} has no password_file, password_command or password")
    if len(given) > 1:
        raise ConfigError(f"{where} has {' and '.join(given)}: give only one of them")
    key = given[0]
    return ("config" if key == "password" else key.split("_")[1], values[key])


def accounts_from(config: Mapping[str, Any], path: Optional[str], token_dir: str = "") -> Dict[str, Account]:
    """Every account of the config file, checked; {} when it has none."""
    tables = config.get("accounts", {})
    where = path or "the config file"
    if not isinstance(tables, dict):
        raise ConfigError(f"accounts in {where} must be tables: [accounts.NAME]")
    return {name: parse_account(name, table, where, token_dir) for name, table in tables.items()}


def choose_accounts(
    accounts: Mapping[str, Account], names: Tuple[str, ...], path: Optional[str]
) -> List[Account]:
    """The accounts named (all of them when none is), or ConfigError naming what exists."""
    if not accounts:
        raise ConfigError(
            f"no IMAP accounts: add an [accounts.NAME] table to {path or 'the config file'} "
            '(see README, "Fetching from IMAP")'
        )
    missing = [name for name in names if name not in accounts]
    if missing:
        raise ConfigError(f"no account {missing[0]!r}; configured: {', '.join(accounts)}")
    return [accounts[name] for name in (names or tuple(accounts))]


def load_accounts(layers: Layers, names: Sequence[str]) -> List[Account]:
    """The accounts of the layers' config file that `names` choose (all when empty)."""
    token_dir = os.path.join(state_home(layers.environ), "oauth2")
    accounts = accounts_from(layers.config, layers.config_path, token_dir)
    return choose_accounts(accounts, tuple(names), layers.config_path)
