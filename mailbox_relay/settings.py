"""Every setting declared once, and one precedence: option > environment > config file > default.

A `Field` is the whole truth about a setting: its option flag, metavar and help (cli/options.py
builds the click options from it), its environment names, its config-file key, its parser and
default. The settings classes below declare their fields as attributes, so `settings.timeout` is
typed and there is no second list of names anywhere.

Every value remembers where it came from, so `-v` can say so. The password is never read from
argv; it comes from the environment, a file, or the config file, and is never shown.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from typing import (
    Any,
    Callable,
    Dict,
    Generic,
    List,
    Mapping,
    Optional,
    Tuple,
    Type,
    TypeVar,
    overload,
)

from mailbox_relay import __version__
from mailbox_relay.outcome import ConfigError, UsageError

T = TypeVar("T")
R = TypeVar("R", bound="Resolved")
Parser = Callable[[Any, str], T]

# Option groups: which commands show a field's option (see cli/options.py).
CONNECTION = "connection"  # every command that talks to an ingress
DELIVERY = "delivery"  # the commands that deliver messages: deliver, import
DELIVER = "deliver"
IMPORT = "import"
FETCH = "fetch"  # fetch and watch
FAILED = "failed"  # import, fetch and watch: where undelivered messages are copied
WATCH = "watch"  # watch only
LOGS = "logs"  # the commands that log for an operator: import, fetch and watch

PASSWORD_ENV = ("MAILBOX_RELAY_PASSWORD", "INGRESS_PASSWORD")
# The names of ingress/formats.py's INGRESSES (tests/test_ingresses.py checks they agree): the
# choice is checked here, where the value's source is known; ingress/target.py makes it concrete.
INGRESS_NAMES = ("relay", "postmark", "sendgrid", "mailgun", "mandrill")


class PasswordFileWarning(UserWarning):
    """The password file can be read by other users."""


# --- parsers: (value from an option, env or TOML, where it came from) -> value, or ConfigError ---


def parse_str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string, not {value!r}")
    return value


def parse_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{where} must be true or false, not {value!r}")


def _number(value: Any, where: str, kind: Callable[[Any], Any], maximum: float) -> Any:
    # bool is an int to Python, and int() reads non-ASCII digits ("٣" is 3): neither is a number here.
    if isinstance(value, bool) or (isinstance(value, str) and not value.isascii()):
        raise ConfigError(f"{where} must be a number, not {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{where} must be a number, not {value!r}") from None
    if not math.isfinite(number) or number > maximum:
        raise ConfigError(f"{where} must be a number up to {maximum:g}, not {value!r}")
    if number < 0:
        raise ConfigError(f"{where} must not be negative, not {value!r}")
    return number


MAX_SECONDS = 7 * 86400.0  # a week: longer is a typo, and sockets refuse absurd timeouts


def parse_seconds(value: Any, where: str) -> float:
    return float(_number(value, where, float, MAX_SECONDS))


def _at_least(number: Any, minimum: float, where: str, value: Any) -> Any:
    if number < minimum:
        raise ConfigError(f"{where} must be at least {minimum:g}, not {value!r}")
    return number


def parse_timeout(value: Any, where: str) -> float:
    return float(_at_least(parse_seconds(value, where), 0.01, where, value))


def parse_rate(value: Any, where: str) -> float:
    """Messages a second: at least one an hour (slower would look like a hang), at most a million."""
    return float(_at_least(_number(value, where, float, 1e6), 1 / 3600, where, value))


MAX_JOBS = 64  # each job is a worker process; more would only exhaust memory


def parse_jobs(value: Any, where: str) -> int:
    return int(_at_least(int(_number(value, where, int, MAX_JOBS)), 1, where, value))


MAX_LOGINS = 1000


def parse_logins(value: Any, where: str) -> int:
    return int(_at_least(int(_number(value, where, int, MAX_LOGINS)), 1, where, value))


def parse_shard(value: Any, where: str) -> Tuple[int, int]:
    """K/N: shard K (counted from 0, as a Kubernetes StatefulSet's ordinal) of N."""
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    k, slash, n = text.partition("/")
    if not (slash and k.isascii() and k.isdigit() and n.isascii() and n.isdigit()):
        raise ConfigError(f"{where} must be K/N such as 0/3 (shard K of N, K counted from 0), not {value!r}")
    shard, shards = int(k), int(n)
    if not 1 <= shards <= 4096 or shard >= shards:
        raise ConfigError(f"{where} must have 0 <= K < N <= 4096, not {value!r}")
    return shard, shards


def parse_tries(value: Any, where: str) -> int:
    return int(_at_least(int(_number(value, where, int, 1000)), 1, where, value))


_SIZE_SUFFIXES = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
MAX_SIZE = 1024**4  # 1 TiB: no message is larger


def parse_size(value: Any, where: str) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024): `25M`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return int(_number(value, where, int, MAX_SIZE))
    text = str(value).strip().upper().removesuffix("B") if isinstance(value, str) else ""
    suffix = text[-1:] if text[-1:] in _SIZE_SUFFIXES else ""
    digits = text[: len(text) - len(suffix)]
    if not (digits.isascii() and digits.isdigit()) or int(digits) * _SIZE_SUFFIXES[suffix] > MAX_SIZE:
        raise ConfigError(f"{where} must be a size in bytes such as 26214400 or 25M, not {value!r}")
    return int(digits) * _SIZE_SUFFIXES[suffix]


def parse_choice(*choices: str) -> Parser[str]:
    def parse(value: Any, where: str) -> str:
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(choices)}, not {value!r}")
        return str(value)

    parse.choices = choices  # type: ignore[attr-defined]  # shown in the option's metavar
    return parse


def parse_recipients(value: Any, where: str) -> Tuple[str, ...]:
    """Addresses from a repeated option, a TOML list, or one space/comma separated string (%T)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{where} must be an address or a list of addresses, not {value!r}")
    addresses: List[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{where} must be addresses, not {item!r}")
        for address in item.replace(",", " ").split():
            addresses.append(_check_address(address.strip("'\""), where))
    return tuple(dict.fromkeys(addresses))


def _check_address(address: str, where: str) -> str:
    if "%(" in address:
        raise ConfigError(
            f"{where} got the literal {address!r}: getmail only expands %(recipient) with multidrop "
            "retrievers; drop --envelope-recipient or use a multidrop retriever"
        )
    if any(ch in address for ch in "\r\n\0") or not address.isprintable():
        raise ConfigError(f"{where} holds a control character in {address!r}")
    local, at, domain = address.strip("<>").rpartition("@")
    if not (local and at and domain):
        # X-Original-To: relay can never route: fetchmail's %T is the local name ("relay") in
        # single-drop mode, so the header would only hide the real recipients.
        raise ConfigError(
            f"{where} got {address!r}, which is not an address (no local@domain): with fetchmail, "
            "%T holds addresses only for a multidrop poll (see contrib/fetchmailrc.example)"
        )
    return address


Address = Tuple[str, int]  # (host, port) to listen on
LOOPBACK_NAMES = {"localhost": "127.0.0.1"}


def parse_listen(value: Any, where: str) -> Address:
    """PORT (on loopback), HOST:PORT or [IPv6]:PORT. HOST is an IP address or localhost: only
    an address given explicitly listens beyond this machine (0.0.0.0, [::])."""
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipv6 = True
    else:
        ipv6 = False
    host = LOOPBACK_NAMES.get(host, host) or "127.0.0.1"
    wrong = f"{where} must be PORT, HOST:PORT or [IPv6]:PORT with an IP address as HOST, not {value!r}"
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(wrong)
    import ipaddress  # only when the setting is used (watch): deliver never pays for it

    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(wrong) from None
    if (address.version == 6) != ipv6:  # an IPv6 address needs its brackets, and only it
        raise ConfigError(wrong)
    return str(address), int(port)


def parse_user_agent(value: Any, where: str) -> str:
    text = parse_str(value, where)
    if not text.isprintable():  # a newline would split the HTTP header
        raise ConfigError(f"{where} must be one line of printable characters, not {value!r}")
    return text


# --- fields ---------------------------------------------------------------------------------


class Field(Generic[T]):
    """One setting, declared once: flag, metavar, help, env names, config key, parser, default.

    As a class attribute of a settings class it is also that setting's typed attribute.
    """

    __slots__ = (
        "aliases",
        "default",
        "group",
        "help",
        "in_file",
        "metavar",
        "name",
        "parse",
        "shown_default",
    )

    def __init__(
        self,
        parse: Parser[T],
        default: Optional[T],
        help: str,
        *,
        group: str,
        metavar: str = "",
        shown_default: str = "",
        aliases: Tuple[str, ...] = (),
        in_file: bool = True,
        name: str = "",
    ) -> None:
        self.parse = parse
        self.default = default
        self.help = help
        self.group = group
        self.metavar = metavar
        self.shown_default = shown_default
        self.aliases = aliases  # other env names, read after ours (Rails' rake relayer's)
        self.in_file = in_file  # may the config file set it?
        self.name = name

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name  # a key named apart from its attribute keeps its name

    @overload
    def __get__(self, instance: None, owner: type) -> Field[T]: ...

    @overload
    def __get__(self, instance: object, owner: type) -> T: ...

    def __get__(self, instance: Optional[object], owner: type) -> Any:
        if instance is None:
            return self
        return instance._values[self.name]  # type: ignore[attr-defined]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> Tuple[str, ...]:
        return ("MAILBOX_RELAY_" + self.name.upper(), *self.aliases)

    @property
    def is_switch(self) -> bool:
        return self.parse is parse_bool

    @property
    def multiple(self) -> bool:
        return self.parse is parse_recipients


class Resolved:
    """Settings resolved from the layers; each value remembers its source."""

    __slots__ = ("_values", "sources")

    def __init__(self, values: Mapping[str, Any], sources: Optional[Mapping[str, str]] = None) -> None:
        fields = {field.name: field for field in self.fields()}
        unknown = set(values) - set(fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no setting {sorted(unknown)[0]!r}")
        self._values = {name: values.get(name, field.default) for name, field in fields.items()}
        self.sources: Dict[str, str] = dict(sources or {})

    @classmethod
    def fields(cls) -> List[Field[Any]]:
        return [
            value
            for klass in reversed(cls.__mro__)
            for value in vars(klass).values()
            if isinstance(value, Field)
        ]

    @classmethod
    def values_from(cls, layers: Layers) -> Tuple[Dict[str, Any], Dict[str, str]]:
        """Each field's value and its source, from the layers."""
        values: Dict[str, Any] = {}
        sources: Dict[str, str] = {}
        for field in cls.fields():
            values[field.name], sources[field.name] = layers.get(field)
        return values, sources

    @classmethod
    def resolve(cls: Type[R], layers: Layers) -> R:
        return cls(*cls.values_from(layers))

    def describe(self) -> List[str]:
        """Each setting and its source, for -v."""
        return [
            f"{name} = {value!r} ({self.sources.get(name, 'default')})"
            for name, value in self._values.items()
        ]


class MessageSettings(Resolved):
    """What shapes the bytes sent: needed even by `import --dry-run`, which sends nothing."""

    __slots__ = ()

    max_size: Field[Optional[int]] = Field(
        parse_size,
        None,
        "Refuse larger messages as permanently undeliverable; K/M/G suffixes allowed.",
        group=DELIVERY,
        metavar="BYTES",
        shown_default="no limit",
    )
    envelope_recipient: Field[Tuple[str, ...]] = Field(
        parse_recipients,
        (),
        "Prepend X-Original-To: ADDR (unless present) so Action Mailbox routes Bcc, forwarded and "
        "catch-all mail. Repeatable, or one space/comma separated list as fetchmail's %T gives.",
        group=DELIVERY,
        metavar="ADDR",
    )


class Settings(MessageSettings):
    """What `deliver`, `import` and `check` need to reach the ingress, as values and sources; the
    place to post to is built from it in ingress/target.py. Its repr hides the password."""

    __slots__ = ("password",)

    url: Field[str] = Field(
        parse_str,
        None,
        "Ingress URL; a bare https://host gets the ingress's path "
        "(relay: /rails/action_mailbox/relay/inbound_emails).",
        group=CONNECTION,
        metavar="URL",
        aliases=("URL",),
    )
    ingress: Field[str] = Field(
        parse_choice(*INGRESS_NAMES),
        "relay",
        "The app's config.action_mailbox.ingress: its path, authentication and format. The password "
        "setting holds its secret (mailgun: the signing key; mandrill: the API key).",
        group=CONNECTION,
        shown_default="relay",
    )
    password_file: Field[Optional[str]] = Field(
        parse_str,
        None,
        "Read the ingress password (or signing key, or API key) from the first line of PATH. "
        "Otherwise MAILBOX_RELAY_PASSWORD, then INGRESS_PASSWORD, then the config file.",
        group=CONNECTION,
        metavar="PATH",
    )
    timeout: Field[float] = Field(
        parse_timeout,
        30.0,
        "Bounds each whole attempt: connect, send and the answer's status line (0.01 s to a week).",
        group=CONNECTION,
        metavar="SECONDS",
        shown_default="30",
    )
    retry_for: Field[float] = Field(
        parse_seconds,
        60.0,
        "Keep retrying network errors, timeouts, 408, 429 and 5xx for this long (0: one attempt). "
        "The last attempt may take up to --timeout more.",
        group=DELIVERY,
        metavar="SECONDS",
        shown_default="60",
    )
    ca_bundle: Field[Optional[str]] = Field(
        parse_str,
        None,
        "Verify TLS with this CA bundle (otherwise REQUESTS_CA_BUNDLE, then certifi's).",
        group=CONNECTION,
        metavar="PATH",
    )
    insecure: Field[bool] = Field(
        parse_bool, False, "Do not verify the TLS certificate (not recommended).", group=CONNECTION
    )
    allow_http: Field[bool] = Field(
        parse_bool,
        False,
        "Allow sending the password over plain http:// to a host that is not loopback.",
        group=CONNECTION,
    )
    user_agent: Field[str] = Field(
        parse_user_agent,
        f"mailbox-relay/{__version__}",
        "User-Agent header.",
        group=CONNECTION,
        metavar="TEXT",
        shown_default="mailbox-relay/VERSION",
    )

    def __init__(
        self,
        values: Mapping[str, Any],
        sources: Optional[Mapping[str, str]] = None,
        *,
        password: str = "",
        environ: Mapping[str, str] = {},
    ) -> None:
        super().__init__(values, sources)
        if self.url is None:
            raise ConfigError(
                "no ingress URL: set MAILBOX_RELAY_URL (or URL), pass --url, or put url in "
                f"{user_config_path(environ)}"
            )
        self.password = password

    def __repr__(self) -> str:
        return f"Settings(url={self.url!r}, password=<hidden>, timeout={self.timeout!r})"

    @property
    def password_source(self) -> str:
        return self.sources.get("password", "the password")

    def describe(self) -> List[str]:
        """Each setting and its source, for -v. The password is only said to be set."""
        return [
            *super().describe(),
            f"password = <set> ({self.password_source})",
        ]


class FailedSettings(Resolved):
    """Where `import`, `fetch` and `watch` copy what they could not deliver: one field for all."""

    __slots__ = ()

    failed_dir: Field[Optional[str]] = Field(
        parse_str,
        None,
        "Write every message that could not be delivered there, as a Maildir message: import's "
        "invalid or still failing ones, fetch's and watch's invalid or quarantined ones (which also "
        "stay on the IMAP server).",
        group=FAILED,
        metavar="DIR",
    )


class ImportSettings(FailedSettings):
    """How `import` runs."""

    __slots__ = ()

    jobs: Field[int] = Field(
        parse_jobs,
        4,
        f"Concurrent deliveries (1 to {MAX_JOBS}).",
        group=IMPORT,
        metavar="N",
        shown_default="4",
    )
    rate: Field[Optional[float]] = Field(
        parse_rate, None, "At most N messages a second.", group=IMPORT, metavar="N", shown_default="unlimited"
    )
    state: Field[Optional[str]] = Field(
        parse_str,
        None,
        "The resume journal (SQLite).",
        group=IMPORT,
        metavar="PATH",
        shown_default="$XDG_STATE_HOME/mailbox-relay/import.sqlite3",
    )
    mbox_format: Field[str] = Field(
        parse_choice("mboxo", "mboxrd"),
        "mboxo",
        "mboxo sends bytes as stored; mboxrd strips one > from >From lines.",
        group=IMPORT,
        shown_default="mboxo",
    )


class FetchSettings(FailedSettings):
    """How `fetch` and `watch` keep their state and treat failures (accounts: accounts.py)."""

    __slots__ = ()

    fetch_state: Field[Optional[str]] = Field(
        parse_str,
        None,
        "The fetch state (SQLite): per account and folder, the last delivered UID, failures, "
        "quarantine; read by `status`.",
        group=FETCH,
        metavar="PATH",
        shown_default="$XDG_STATE_HOME/mailbox-relay/fetch.sqlite3",
    )
    max_tries: Field[int] = Field(
        parse_tries,
        5,
        "Quarantine a message after this many failed tries, once other messages got through.",
        group=FETCH,
        metavar="N",
        shown_default="5",
    )


class LogSettings(Resolved):
    """How `import`, `fetch` and `watch` write their log lines (log.py, logformat.py)."""

    __slots__ = ()

    log_format: Field[str] = Field(
        parse_choice("plain", "json"),
        "plain",
        "plain: one line per event (timestamped unless stderr is the journal); json: one JSON "
        "object per line (ts, level, event, account, folder, uid, code, message).",
        group=LOGS,
        shown_default="plain",
    )


class WatchSettings(Resolved):
    """What only `watch` has: how it shares its work out (posts in flight, logins at once, its
    shard of the accounts) and its health, readiness and metrics endpoint."""

    __slots__ = ()

    jobs = ImportSettings.jobs  # one setting: import's deliveries at once, watch's posts in flight
    logins: Field[int] = Field(
        parse_logins,
        20,
        "Logins at once (at start and after a server restart), so thousands of accounts do not "
        "hit a server in the same second.",
        group=WATCH,
        metavar="N",
        shown_default="20",
    )
    shard: Field[Optional[Tuple[int, int]]] = Field(
        parse_shard,
        None,
        "Watch only shard K of N (K from 0): the accounts whose name hashes (SHA-256) there. N "
        "watchers with 0/N .. N-1/N split the accounts with no coordinator.",
        group=WATCH,
        metavar="K/N",
        shown_default="every account",
    )
    listen: Field[Optional[Address]] = Field(
        parse_listen,
        None,
        "Serve /healthz, /readyz and /metrics on this address: PORT (loopback), HOST:PORT or "
        "[IPv6]:PORT (only an explicit HOST listens beyond this machine).",
        group=WATCH,
        metavar="ADDRESS",
        shown_default="off",
    )


CONFIG: Field[Optional[str]] = Field(
    parse_str,
    None,
    "TOML file with the same keys (url, password_file, timeout, ...).",
    group=CONNECTION,
    metavar="PATH",
    shown_default="$XDG_CONFIG_HOME/mailbox-relay/config.toml, then /etc/mailbox-relay/config.toml",
    in_file=False,
    name="config",
)
EXIT_CODES: Field[str] = Field(
    parse_choice("sysexits", "qmail"),
    "sysexits",
    "Exit-code convention.",
    group=DELIVER,
    shown_default="sysexits",
    name="exit_codes",
)

FIELDS: Dict[str, Field[Any]] = {
    field.name: field
    for field in (
        *Settings.fields(),
        *ImportSettings.fields(),
        *FetchSettings.fields(),
        *LogSettings.fields(),
        *WatchSettings.fields(),
        CONFIG,
        EXIT_CODES,
    )
}

# Keys a config file may hold beyond FIELDS (the password itself may live there, mode 0600).
# The IMAP accounts of fetch and watch are tables of their own, checked in accounts.py.
EXTRA_CONFIG_KEYS = {"password", "accounts"}


# --- where settings come from ---------------------------------------------------------------


def state_home(environ: Mapping[str, str]) -> str:
    """Where journals and fetch state live: $XDG_STATE_HOME/mailbox-relay."""
    base = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "mailbox-relay")


def user_config_path(environ: Mapping[str, str]) -> str:
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "mailbox-relay", "config.toml")


SYSTEM_CONFIG_PATH = "/etc/mailbox-relay/config.toml"


def find_config(option: Optional[str], environ: Mapping[str, str]) -> Optional[str]:
    """The config file to read: --config, MAILBOX_RELAY_CONFIG, the user's, then the system's."""
    explicit = option or environ.get(CONFIG.env[0])
    if explicit:
        if not os.path.isfile(explicit):
            raise ConfigError(f"config file {explicit} does not exist")
        return explicit
    for candidate in (user_config_path(environ), SYSTEM_CONFIG_PATH):
        if os.path.isfile(candidate):
            return candidate
    return None


def read_config(path: Optional[str]) -> Dict[str, Any]:
    if path is None:
        return {}
    import sys

    # Imported only when a config file exists: TOML parsing costs every delivered message.
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python < 3.11 only
        import tomli as tomllib
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    known = {name for name, field in FIELDS.items() if field.in_file} | EXTRA_CONFIG_KEYS
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {path}; known keys: {', '.join(sorted(known))}")
    return data


class Layers:
    """The three sources of settings, asked in order: option, environment, config file."""

    def __init__(
        self,
        options: Mapping[str, Any],
        environ: Mapping[str, str],
        config: Optional[Mapping[str, Any]] = None,
        config_path: Optional[str] = None,
    ) -> None:
        self.options = options
        self.environ = environ
        self.config: Mapping[str, Any] = config or {}
        self.config_path = config_path

    def get(self, field: Field[T]) -> Tuple[T, str]:
        """A setting's value and where it came from ("option --url", "env URL", ...)."""
        option = self.options.get(field.name)
        if option is not None and option != ():
            try:
                return field.parse(option, field.flag), f"option {field.flag}"
            except ConfigError as error:  # typed by the user just now: a usage error
                raise UsageError(error.outcome.detail) from None
        for env in field.env:
            if self.environ.get(env):
                return field.parse(self.environ[env], env), f"env {env}"
        if field.in_file and field.name in self.config:
            where = f"{field.name} in {self.config_path}"
            return field.parse(self.config[field.name], where), self._from_config
        return field.default, "default"  # type: ignore[return-value]  # None only where T allows it

    @property
    def _from_config(self) -> str:
        return f"config {self.config_path}"

    def password(self) -> Tuple[Optional[str], str]:
        """(password, its source). Never from argv, only files, env and config."""
        path, source = self.get(Settings.password_file)
        ours, rails = PASSWORD_ENV
        if source.startswith("option"):
            return read_password_file(path, source)
        if self.environ.get(ours):
            return self.environ[ours], f"env {ours}"
        if source.startswith("env"):
            return read_password_file(path, source)
        if self.environ.get(rails):
            return self.environ[rails], f"env {rails}"
        if "password" in self.config:
            return parse_str(self.config["password"], "password"), self._from_config
        if path is not None:
            return read_password_file(path, source)
        return None, "unset"


def read_password_file(path: Optional[str], source: str) -> Tuple[str, str]:
    try:
        with open(str(path), "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            first_line = handle.readline().decode("utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the password file {path} ({source}): {error}") from None
    if not first_line:
        raise ConfigError(f"the password file {path} ({source}) has an empty first line")
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.warn(
            f"password file {path} is readable by group or others; chmod 600 {path}",
            PasswordFileWarning,
            stacklevel=2,
        )
    return first_line, f"file {path} ({source})"


def open_layers(options: Mapping[str, Any], environ: Mapping[str, str]) -> Layers:
    """Find and read the config file; the layers then answer any setting by name."""
    config_path = find_config(options.get(CONFIG.name), environ)
    return Layers(options, environ, read_config(config_path), config_path)
