"""One settings object, with a visible precedence: option > environment > config file > default.

Every value remembers where it came from, so `-v` can say so. The password is never read from
argv; it comes from the environment, a file, or the config file, and is never shown.
"""

from __future__ import annotations

import os
import stat
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

from mailbox_relay import __version__
from mailbox_relay.outcome import RELAY_PATH, ConfigError

Parser = Callable[[Any, str], Any]


def parse_str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string")
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


def _number(value: Any, where: str, kind: Callable[[Any], Any]) -> Any:
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a number, not {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a number, not {value!r}") from None
    if number < 0:
        raise ConfigError(f"{where} must not be negative, not {value!r}")
    return number


def parse_seconds(value: Any, where: str) -> float:
    return float(_number(value, where, float))


def parse_positive_number(value: Any, where: str) -> float:
    seconds = parse_seconds(value, where)
    if seconds == 0:
        raise ConfigError(f"{where} must be more than 0")
    return seconds


def parse_count(value: Any, where: str) -> int:
    count = int(_number(value, where, int))
    if count < 1:
        raise ConfigError(f"{where} must be at least 1, not {value!r}")
    return count


_SIZE_SUFFIXES = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(value: Any, where: str) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024): `25M`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return int(_number(value, where, int))
    text = str(value).strip().upper().removesuffix("B") if isinstance(value, str) else ""
    suffix = text[-1:] if text[-1:] in _SIZE_SUFFIXES else ""
    digits = text[: len(text) - len(suffix)]
    if not digits.isdigit():
        raise ConfigError(f"{where} must be a size in bytes such as 26214400 or 25M, not {value!r}")
    return int(digits) * _SIZE_SUFFIXES[suffix]


def parse_choice(*choices: str) -> Parser:
    def parse(value: Any, where: str) -> str:
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(choices)}, not {value!r}")
        return str(value)

    return parse


def parse_recipients(value: Any, where: str) -> Tuple[str, ...]:
    """Addresses from a repeated option, a TOML list, or one space/comma separated string (%T)."""
    items = [value] if isinstance(value, str) else list(value)
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
    return address


class Field:
    """One setting: its environment names (first set wins), parser and default."""

    __slots__ = ("default", "env", "parse")

    def __init__(self, env: Tuple[str, ...], parse: Parser, default: Any = None) -> None:
        self.env = env
        self.parse = parse
        self.default = default


def _env(name: str, *aliases: str) -> Tuple[str, ...]:
    return ("MAILBOX_RELAY_" + name.upper(), *aliases)


FIELDS: Dict[str, Field] = {
    "url": Field(_env("url", "URL"), parse_str),
    "password_file": Field(_env("password_file"), parse_str),
    "exit_codes": Field(_env("exit_codes"), parse_choice("sysexits", "qmail"), "sysexits"),
    "envelope_recipient": Field(_env("envelope_recipient"), parse_recipients, ()),
    "timeout": Field(_env("timeout"), parse_positive_number, 30.0),
    "retry_for": Field(_env("retry_for"), parse_seconds, 60.0),
    "max_size": Field(_env("max_size"), parse_size),
    "ca_bundle": Field(_env("ca_bundle"), parse_str),
    "insecure": Field(_env("insecure"), parse_bool, False),
    "user_agent": Field(_env("user_agent"), parse_str, f"mailbox-relay/{__version__}"),
    "allow_http": Field(_env("allow_http"), parse_bool, False),
    # import
    "jobs": Field(_env("jobs"), parse_count, 4),
    "rate": Field(_env("rate"), parse_positive_number),
    "state": Field(_env("state"), parse_str),
    "mbox_format": Field(_env("mbox_format"), parse_choice("mboxo", "mboxrd"), "mboxo"),
}

# Keys a config file may hold beyond FIELDS (the password itself may live there, mode 0600).
EXTRA_CONFIG_KEYS = {"password"}


def user_config_path(environ: Mapping[str, str]) -> str:
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "mailbox-relay", "config.toml")


SYSTEM_CONFIG_PATH = "/etc/mailbox-relay/config.toml"


def find_config(option: Optional[str], environ: Mapping[str, str]) -> Optional[str]:
    """The config file to read: --config, MAILBOX_RELAY_CONFIG, the user's, then the system's."""
    explicit = option or environ.get("MAILBOX_RELAY_CONFIG")
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
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    unknown = sorted(set(data) - set(FIELDS) - EXTRA_CONFIG_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r} in {path}; known keys: {', '.join(sorted(FIELDS))}, password"
        )
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

    def get(self, name: str) -> Tuple[Any, str]:
        """A setting's value and where it came from ("option --url", "env URL", ...)."""
        spec = FIELDS[name]
        option = self.options.get(name)
        if option is not None and option != ():
            flag = "--" + name.replace("_", "-")
            return spec.parse(option, flag), f"option {flag}"
        for env in spec.env:
            if self.environ.get(env):
                return spec.parse(self.environ[env], env), f"env {env}"
        if name in self.config:
            return spec.parse(self.config[name], f"{name} in {self.config_path}"), self._from_config
        return spec.default, "default"

    @property
    def _from_config(self) -> str:
        return f"config {self.config_path}"

    def password(self) -> Tuple[Optional[str], str, List[str]]:
        """(password, its source, warnings). Never from argv, only files, env and config."""
        path, source = self.get("password_file")
        if source.startswith("option"):
            return _read_password_file(path, source)
        if self.environ.get("MAILBOX_RELAY_PASSWORD"):
            return self.environ["MAILBOX_RELAY_PASSWORD"], "env MAILBOX_RELAY_PASSWORD", []
        if source.startswith("env"):
            return _read_password_file(path, source)
        if self.environ.get("INGRESS_PASSWORD"):
            return self.environ["INGRESS_PASSWORD"], "env INGRESS_PASSWORD", []
        if "password" in self.config:
            return parse_str(self.config["password"], "password"), self._from_config, []
        if path is not None:
            return _read_password_file(path, source)
        return None, "unset", []


def _read_password_file(path: str, source: str) -> Tuple[str, str, List[str]]:
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            first_line = handle.readline().decode("utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the password file {path} ({source}): {error}") from None
    if not first_line:
        raise ConfigError(f"the password file {path} ({source}) has an empty first line")
    warnings = []
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.append(f"warning: password file {path} is readable by group or others; chmod 600 {path}")
    return first_line, f"file {path} ({source})", warnings


def normalize_url(url: str) -> str:
    """Check the URL and give a bare host the relay path: https://app.example.com → …/relay/…"""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        # Not echoed: the point is that this secret should not be on a command line or in logs.
        raise ConfigError(
            "the ingress URL must not contain credentials (user:password@): set the password with "
            "MAILBOX_RELAY_PASSWORD or --password-file"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"the ingress URL {url!r} must start with https:// or http:// and name a host")
    if parts.path in ("", "/"):
        parts = parts._replace(path=RELAY_PATH)
    return urlunsplit(parts)


def is_loopback(host: str) -> bool:
    host = host.lower().strip("[]")
    if host in ("localhost", "::1") or host.endswith(".localhost"):
        return True
    octets = host.split(".")
    return len(octets) == 4 and octets[0] == "127" and all(o.isdigit() for o in octets)


class Settings:
    """What `deliver`, `import` and `check` need to reach the ingress.

    A plain class (every delivery pays for building a dataclass at import time); its repr
    leaves the password out.
    """

    def __init__(
        self,
        *,
        url: str,
        password: str,
        exit_codes: str = "sysexits",
        envelope_recipients: Tuple[str, ...] = (),
        timeout: float = 30.0,
        retry_for: float = 60.0,
        max_size: Optional[int] = None,
        ca_bundle: Optional[str] = None,
        insecure: bool = False,
        user_agent: str = f"mailbox-relay/{__version__}",
        allow_http: bool = False,
        sources: Optional[Mapping[str, str]] = None,
        warnings: Tuple[str, ...] = (),
    ) -> None:
        self.url = url
        self.password = password
        self.exit_codes = exit_codes
        self.envelope_recipients = envelope_recipients
        self.timeout = timeout
        self.retry_for = retry_for
        self.max_size = max_size
        self.ca_bundle = ca_bundle
        self.insecure = insecure
        self.user_agent = user_agent
        self.allow_http = allow_http
        self.sources: Mapping[str, str] = sources or {}
        self.warnings = warnings

    def __repr__(self) -> str:
        return f"Settings(url={self.url!r}, password=<hidden>, timeout={self.timeout!r})"

    @property
    def password_source(self) -> str:
        return self.sources.get("password", "the password")

    @property
    def verify(self) -> Any:
        """What requests' `verify` takes: a CA bundle path, True, or False with --insecure."""
        if self.insecure:
            return False
        return self.ca_bundle or True

    def describe(self) -> List[str]:
        """Each setting and its source, for -v. The password is only said to be set."""
        lines = []
        for name in (
            "url",
            "exit_codes",
            "envelope_recipients",
            "timeout",
            "retry_for",
            "max_size",
            "ca_bundle",
            "insecure",
            "user_agent",
            "allow_http",
        ):
            value = getattr(self, name)
            lines.append(f"{name} = {value!r} ({self.sources.get(name, 'default')})")
        lines.append(f"password = <set> ({self.password_source})")
        return lines


_SETTINGS_KEYS = {"envelope_recipients": "envelope_recipient"}


def open_layers(options: Mapping[str, Any], environ: Mapping[str, str]) -> Layers:
    """Find and read the config file; the layers then answer any setting by name."""
    config_path = find_config(options.get("config"), environ)
    return Layers(options, environ, read_config(config_path), config_path)


def settings_from(layers: Layers, *, need_password: bool = True) -> Settings:
    """Resolve every connection setting; raise ConfigError (a temporary failure) if one is bad."""
    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    for attr in (
        "url",
        "exit_codes",
        "envelope_recipients",
        "timeout",
        "retry_for",
        "max_size",
        "ca_bundle",
        "insecure",
        "user_agent",
        "allow_http",
    ):
        values[attr], sources[attr] = layers.get(_SETTINGS_KEYS.get(attr, attr))
    if values["url"] is None:
        raise ConfigError(
            "no ingress URL: set MAILBOX_RELAY_URL (or URL), pass --url, or put url in "
            f"{user_config_path(layers.environ)}"
        )
    values["url"] = normalize_url(values["url"])
    _refuse_plain_http(values["url"], values["allow_http"])
    password, sources["password"], warnings = layers.password()
    if password is None and need_password:
        raise ConfigError(
            "no ingress password: set MAILBOX_RELAY_PASSWORD (or INGRESS_PASSWORD), pass "
            "--password-file, or put password_file in the config file"
        )
    return Settings(password=password or "", sources=sources, warnings=tuple(warnings), **values)


def load_settings(options: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    return settings_from(open_layers(options, environ))


def _refuse_plain_http(url: str, allow_http: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme == "http" and not allow_http and not is_loopback(parts.hostname or ""):
        raise ConfigError(
            f"refusing to send the password over plain http to {parts.hostname}: use https://, "
            "or pass --allow-http if the network between here and the app is trusted"
        )
