"""`migrate getmailrc` and `migrate fetchmailrc`: a getmail6 or fetchmail configuration as
`[accounts.NAME]` tables for `fetch` and `watch`. Pure: text in, accounts out; the command
(cli/migrate.py) reads the files and writes the password files it is asked to.

Every account says, in comments, what had no equivalent and what was chosen instead. A
password found in the file is never printed: it becomes a `password_file` (which `--save-
passwords` writes, 0600), so the printed TOML holds no secret.
"""

from __future__ import annotations

import ast
import configparser
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from mailbox_relay.ingress.endpoint import is_loopback


class MigrateError(Exception):
    """A file that cannot be understood, with the line that says why."""


@dataclass
class Migrated:
    """One account: its TOML keys in order, the comments above it, and the password it needs
    written to its password_file (kept here, never rendered)."""

    name: str
    origin: str  # "getmailrc PATH", "fetchmailrc PATH, poll HOST"
    table: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    secret: Optional[str] = None

    def note(self, line: str) -> None:
        self.notes.append(line)


def account_name(username: str, host: str) -> str:
    """A bare TOML key from the login and the server: "support-imap-example-com"."""
    local = username.split("@")[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"{local}-{host}").strip("-").lower() or "account"


def password_path(directory: str, name: str) -> str:
    return os.path.join(directory, f"{name}.password")


def _set_password(account: Migrated, secret: str, directory: str, where: str) -> None:
    path = password_path(directory, account.name)
    account.table["password_file"] = path
    account.secret = secret
    account.note(
        f"the password in {where} is not printed: put it on the first line of {path} (chmod 600), "
        "or run migrate again with --save-passwords"
    )


# --- deliver's command line, as getmail's MDA_external or fetchmail's mda runs it ---------------

_DELIVER_VALUE_OPTIONS = ("--url", "--ingress", "--envelope-recipient", "--config", "--max-size", "--timeout")


def _deliver_options(words: Sequence[str]) -> Optional[Dict[str, List[str]]]:
    """deliver's options when `words` run `mailbox-relay deliver`; None when they run anything else."""
    try:
        start = next(
            n
            for n, word in enumerate(words)
            if os.path.basename(word) == "mailbox-relay" or word == "deliver"
        )
    except StopIteration:
        return None
    rest = list(words[start:])
    if os.path.basename(rest[0]) == "mailbox-relay":
        rest = rest[1:]
    if not rest or rest[0] != "deliver":
        return None
    found: Dict[str, List[str]] = {}
    args = iter(rest[1:])
    for word in args:
        name, equals, value = word.partition("=")
        if name in _DELIVER_VALUE_OPTIONS:
            found.setdefault(name, []).append(value if equals else next(args, ""))
        else:
            found.setdefault(word, []).append("")
    return found


def _apply_deliver(
    account: Migrated, options: Dict[str, List[str]], expands: Tuple[str, ...], known: Dict[str, str]
) -> None:
    """deliver's options as account keys where there is one, and as comments where they are
    the whole config's (fetch posts every account to one ingress). `known`: expansions that are
    the same for every message (fetchmail's %T of a single-drop poll)."""
    recipients = [known.get(r, r) for r in options.pop("--envelope-recipient", [])]
    fixed = [r for r in recipients if r and not any(token in r for token in expands)]
    if fixed:
        account.table["envelope_recipient"] = fixed
    if len(fixed) < len(recipients):
        account.note(
            "--envelope-recipient with the message's own envelope recipient has no equivalent: fetch "
            "reads a mailbox, not an SMTP envelope; set envelope_recipient to the mailbox's own address "
            "if Rails must route on it whatever To: says"
        )
    for option, key in (("--url", "url"), ("--ingress", "ingress"), ("--max-size", "max_size")):
        for value in options.pop(option, []):
            shown = int(value) if option == "--max-size" and value.isdigit() else value
            account.note(
                f"deliver {option} {value}: a setting of the whole config file, not of an account: put "
                f"{key} = {json.dumps(shown)} at its top (before any [accounts] table)"
            )
    for option, values in options.items():
        account.note(f"deliver {option} {' '.join(values)}".rstrip() + ": left out (no account key for it)")


# --- getmail -----------------------------------------------------------------------------------

_GETMAIL_RETRIEVERS = {
    "SimplePOP3Retriever": ("pop3", "none"),
    "SimplePOP3SSLRetriever": ("pop3", "implicit"),
    "BrokenUIDLPOP3Retriever": ("pop3", "none"),
    "BrokenUIDLPOP3SSLRetriever": ("pop3", "implicit"),
    "SimpleIMAPRetriever": ("imap", "none"),
    "SimpleIMAPSSLRetriever": ("imap", "implicit"),
}


def _literal(value: str) -> Any:
    """A getmail value: a Python literal (tuples, numbers, booleans) or the text itself."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _true(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def from_getmailrc(text: str, path: str, password_dir: str) -> Migrated:
    parser = configparser.RawConfigParser()
    try:
        parser.read_string(text, path)
    except configparser.Error as error:
        raise MigrateError(f"{path}: not a getmailrc: {str(error).splitlines()[0]}") from None
    if not parser.has_section("retriever"):
        raise MigrateError(f"{path}: no [retriever] section")
    retriever = dict(parser.items("retriever"))
    kind = retriever.get("type", "")
    if kind not in _GETMAIL_RETRIEVERS:
        known = ", ".join(_GETMAIL_RETRIEVERS)
        raise MigrateError(f"{path}: retriever type {kind or '(none)'} has no equivalent; known: {known}")
    source, tls = _GETMAIL_RETRIEVERS[kind]
    host, username = retriever.get("server", ""), retriever.get("username", "")
    if not host or not username:
        raise MigrateError(f"{path}: [retriever] needs server and username")
    account = Migrated(account_name(username, host), f"getmailrc {path} ({kind})")
    table = account.table
    table["source"] = source
    table["host"] = host
    tls = _getmail_tls(account, tls, host)
    if "port" in retriever:
        table["port"] = int(retriever["port"])
    table["tls"] = tls
    table["username"] = username
    _getmail_password(account, retriever, password_dir, path)
    if kind.startswith("BrokenUIDL"):
        account.note("BrokenUIDL: mailbox-relay finds out by itself when UIDLs are missing or repeated")
    _getmail_mailboxes(account, retriever.get("mailboxes"), source)
    if retriever.get("ca_certs"):
        table["ca_bundle"] = retriever["ca_certs"]
    options = dict(parser.items("options")) if parser.has_section("options") else {}
    _getmail_options(account, options, source)
    if parser.has_section("destination"):
        _getmail_destination(account, dict(parser.items("destination")))
    return account


def _getmail_tls(account: Migrated, tls: str, host: str) -> str:
    if tls == "none" and not is_loopback(host):
        account.note(
            "the retriever has no SSL; mailbox-relay sends no password in clear beyond this machine: "
            'chose tls = "starttls" (if the server has no STARTTLS, use the SSL port with "implicit")'
        )
        return "starttls"
    return tls


def _getmail_password(account: Migrated, retriever: Dict[str, str], password_dir: str, path: str) -> None:
    if "password_command" in retriever:
        command = _literal(retriever["password_command"])
        words = (
            [str(word) for word in command]
            if isinstance(command, (tuple, list))
            else shlex.split(str(command))
        )
        account.table["password_command"] = shlex.join(words)
    elif "password" in retriever:
        _set_password(account, retriever["password"], password_dir, path)
    else:
        account.table["password_file"] = password_path(password_dir, account.name)
        account.note(
            "getmail asks for the password when it runs; put it in "
            f"{account.table['password_file']} (chmod 600)"
        )
    if _true(retriever.get("use_xoauth2")):
        account.note(
            'use_xoauth2: set auth = "xoauth2" with oauth2_client_id (mailbox-relay refreshes the '
            "tokens; run `mailbox-relay auth NAME`) or oauth2_token_command, instead of the password"
        )


def _getmail_mailboxes(account: Migrated, value: Optional[str], source: str) -> None:
    if value is None or source == "pop3":
        return
    mailboxes = _literal(value)
    if mailboxes == "ALL" or mailboxes == ("ALL",):
        account.note(
            "mailboxes = ALL: list the folders by name (check --account prints them all when one is missing)"
        )
        return
    names = [str(name) for name in (mailboxes if isinstance(mailboxes, (tuple, list)) else (mailboxes,))]
    if names != ["INBOX"]:
        account.table["folders"] = names


def _getmail_options(account: Migrated, options: Dict[str, str], source: str) -> None:
    table = account.table
    table["after"] = "delete" if _true(options.get("delete")) else "keep"
    if table["after"] == "delete":
        table["start"] = "all"
        account.note(
            'start = "all": getmail deleted what it delivered, so what is left is undelivered: the '
            "first pass delivers it, once; later passes deliver only new mail"
        )
    else:
        table["start"] = "new"
        account.note(
            'start = "new": getmail kept what it delivered on the server, and it added Return-Path: '
            "and X-getmail-retrieved-from-mailbox: to each, so Rails would store a second copy of "
            "anything posted again; run getmail one last time just before the first fetch"
        )
    if _true(options.get("read_all")):
        account.note(
            "read_all = true posted every message on every run; mailbox-relay delivers each once "
            "(Rails stored the copies once anyway)"
        )
    days = options.get("delete_after")
    if days and days.strip() not in ("0", "") and table["after"] == "keep":
        if source == "pop3":
            table["delete_after"] = f"{int(days)}d"
        else:
            account.note(
                f'delete_after = {days} has no IMAP equivalent: kept on the server (after = "keep"); '
                'use after = "delete" or "move:FOLDER" to clean up at delivery'
            )
    size = options.get("max_message_size")
    if size and size.strip() != "0":
        account.note(
            f"max_message_size = {size}: a setting of the whole config file: put "
            f"max_size = {int(size)} at its top; a larger message is recorded as invalid, left on the server"
        )
    for key in ("delivered_to", "received"):
        if _true(options.get(key, "true")):
            account.note(f"{key}: mailbox-relay never adds headers: the bytes posted are the server's")
    for key in ("message_log", "verbose", "message_log_syslog"):
        if key in options:
            account.note(f"{key}: no equivalent; fetch prints a summary, watch logs each delivery to stderr")


def _getmail_destination(account: Migrated, destination: Dict[str, str]) -> None:
    kind = destination.get("type", "")
    if kind != "MDA_external":
        account.note(f"destination {kind}: fetch posts to the ingress instead")
        return
    arguments = _literal(destination.get("arguments", "()"))
    words = [destination.get("path", "")] + [
        str(word) for word in (arguments if isinstance(arguments, tuple) else ())
    ]
    options = _deliver_options(words)
    if options is None:
        account.note(
            f"destination runs {shlex.join(words)}, not mailbox-relay deliver: "
            "fetch posts to the ingress instead"
        )
        return
    _apply_deliver(account, options, ("%(",), {})


# --- fetchmail ---------------------------------------------------------------------------------

# Keywords of a poll that take a value, and the names they go by.
_FETCHMAIL_VALUE_WORDS = frozenset(
    (
        "protocol",
        "proto",
        "port",
        "service",
        "user",
        "username",
        "password",
        "pass",
        "mda",
        "folder",
        "folders",
        "via",
        "auth",
        "authenticate",
        "timeout",
        "limit",
        "is",
        "to",
        "sslproto",
        "sslcertfile",
        "sslcertpath",
        "smtphost",
        "sslfingerprint",
        "plugin",
        "preconnect",
        "envelope",
        "localdomains",
        "",
    )
)
_FETCHMAIL_ALIASES = {
    "proto": "protocol",
    "service": "port",
    "username": "user",
    "pass": "password",
    "folders": "folder",
    "authenticate": "auth",
    "to": "is",
}
_FETCHMAIL_WORDS_IGNORED = frozenset(
    {"there", "with", "and", "here", "has", "wants", "options", ",", ";", ":"}
)


def _fetchmail_tokens(text: str) -> List[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars="")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError as error:
        raise MigrateError(f"cannot split into words: {error}") from None


def _statements(tokens: List[str]) -> Iterator[Tuple[str, List[str]]]:
    """fetchmail's statements: each starts with poll, skip, defaults or set."""
    words: List[str]
    keyword, words = "", []
    for token in tokens:
        if token in ("poll", "skip", "defaults", "set"):
            if keyword:
                yield keyword, words
            keyword, words = token, []
        else:
            words.append(token)
    if keyword:
        yield keyword, words


def from_fetchmailrc(text: str, path: str, password_dir: str) -> List[Migrated]:
    try:
        tokens = _fetchmail_tokens(text)
    except MigrateError as error:
        raise MigrateError(f"{path}: {error}") from None
    defaults: List[str] = []
    globals_: List[str] = []
    accounts = []
    for keyword, words in _statements(tokens):
        if keyword == "set":
            globals_.append(" ".join(words))
        elif keyword == "defaults":
            defaults = words
        elif words:
            accounts.append(_fetchmail_poll(keyword, words, defaults, path, password_dir))
    if not accounts:
        raise MigrateError(f"{path}: no poll statement")
    for account in accounts:
        for line in globals_:
            account.note(_fetchmail_global(line))
    return accounts


def _fetchmail_global(line: str) -> str:
    if line.startswith("daemon"):
        return f"set {line}: run `mailbox-relay watch` (IDLE, or polls every poll_interval seconds)"
    if line == "invisible":
        return "set invisible: mailbox-relay never adds a Received: header"
    return f"set {line}: no equivalent"


def _take(words: List[str], n: int) -> str:
    return words[n + 1] if n + 1 < len(words) else ""


def _fetchmail_poll(
    keyword: str, words: List[str], defaults: List[str], path: str, password_dir: str
) -> Migrated:
    host, options = words[0], defaults + words[1:]
    found: Dict[str, str] = {}
    flags: List[str] = []
    n = 0
    while n < len(options):
        word = options[n].lower()
        if word in _FETCHMAIL_VALUE_WORDS:
            found[_FETCHMAIL_ALIASES.get(word, word)] = _take(options, n)
            n += 2
        else:
            if word not in _FETCHMAIL_WORDS_IGNORED:
                flags.append(word)
            n += 1
    user = found.get("user", "")
    if not user:
        raise MigrateError(f"{path}: poll {host} has no user")
    server = found.get("via") or host
    account = Migrated(account_name(user, server), f"fetchmailrc {path}, poll {host}")
    if keyword == "skip":
        account.note("this poll is a `skip` in the fetchmailrc: leave the account out of --account lists")
    _fetchmail_server(account, server, found, flags)
    account.table["username"] = user
    _fetchmail_auth(account, found, password_dir, path)
    folders = [name for name in re.split(r"[,\s]+", found.get("folder", "")) if name]
    if folders and account.table["source"] == "imap" and folders != ["INBOX"]:
        account.table["folders"] = folders
    _fetchmail_keep(account, flags)
    _fetchmail_rest(account, found, flags)
    return account


def _fetchmail_server(account: Migrated, server: str, found: Dict[str, str], flags: List[str]) -> None:
    table = account.table
    protocol = found.get("protocol", "auto").lower()
    if protocol not in ("imap", "pop3", "auto"):
        raise MigrateError(f"poll {server}: protocol {protocol} has no equivalent (imap or pop3 only)")
    if protocol == "auto":
        account.note('protocol auto: chose imap (set source = "pop3" if the server has only POP3)')
        protocol = "imap"
    table["source"] = protocol
    table["host"] = server
    if "ssl" in flags:
        tls = "implicit"
    elif found.get("sslproto") == "" and is_loopback(server):
        tls = "none"
    else:
        tls = "starttls"
        if "sslproto" in found and found["sslproto"] == "":
            account.note(
                "sslproto '' turned TLS off; mailbox-relay allows that only to a loopback host: "
                "chose starttls"
            )
        else:
            account.note(
                'no ssl: chose tls = "starttls", which fetchmail 6.4 also tries by itself, but required'
            )
    if "port" in found:
        table["port"] = int(found["port"])
    table["tls"] = tls
    if found.get("sslcertfile"):
        table["ca_bundle"] = found["sslcertfile"]
    if "nosslcertck" in flags:
        account.note("no sslcertck: mailbox-relay always verifies certificates (ca_bundle for a private CA)")


def _fetchmail_auth(account: Migrated, found: Dict[str, str], password_dir: str, path: str) -> None:
    auth = found.get("auth", "").lower()
    if auth in ("xoauth2", "oauthbearer"):
        account.table["auth"] = "xoauth2"
        account.table["oauth2_token_command"] = "CHANGE-ME: a command that prints an access token"
        account.note(
            f"auth {auth}: fetchmail takes the token as the password; give oauth2_token_command, or "
            "oauth2_client_id with `mailbox-relay auth NAME` (then remove oauth2_token_command)"
        )
        return
    if "password" in found:
        _set_password(account, found["password"], password_dir, path)
    else:
        account.table["password_file"] = password_path(password_dir, account.name)
        account.note(
            f"no password in the fetchmailrc (fetchmail asks, or reads ~/.netrc): put it in "
            f"{account.table['password_file']} (chmod 600)"
        )


def _fetchmail_keep(account: Migrated, flags: List[str]) -> None:
    table = account.table
    table["after"] = "keep" if "keep" in flags else "delete"
    if "keep" not in flags:
        account.note('no keep: fetchmail deletes what it delivered: after = "delete" (only after a 2xx)')
    table["start"] = "all"
    if "keep" in flags:
        table["start"] = "new"
        account.note(
            'keep: what fetchmail delivered is still there, so start = "new" leaves everything there '
            "now alone (fetchmail's Received: lines would make Rails store second copies); run "
            "fetchmail one last time just before the first fetch"
        )
    elif "fetchall" not in flags:
        account.note(
            'start = "all": fetchmail without fetchall skips what is marked seen (or, over POP3, what '
            "its .fetchids lists); mailbox-relay delivers each message there once, seen or not, "
            'and then only new ones (start = "new" leaves what is there now alone)'
        )
    if "flush" in flags:
        account.note(
            "flush: old messages are not deleted before fetching: "
            'after = "delete" removes each once delivered'
        )


def _fetchmail_rest(account: Migrated, found: Dict[str, str], flags: List[str]) -> None:
    mda = found.get("mda")
    if mda is None:
        account.note("no mda: fetchmail forwarded over SMTP; fetch posts to the ingress instead")
    else:
        options = _deliver_options(shlex.split(mda))
        if options is None:
            account.note(f"mda {mda!r} is not mailbox-relay deliver: fetch posts to the ingress instead")
        else:
            name = found.get("is", "")
            single = "@" in name and "multidrop" not in flags and "envelope" not in found
            # In a single-drop poll %T is the name after `is`: an address there is the same for all.
            known = {"%T": name} if single else {}
            _apply_deliver(account, options, ("%T", "%F", "%t", "%f"), known)
    local = found.get("is")
    if local and local != "*" and "@" not in local:
        account.note(f"is {local} here: no equivalent (no local users; Rails routes on the message)")
    if local == "*" or "multidrop" in flags or "envelope" in found or "localdomains" in found:
        account.note(
            "multidrop (is * here, envelope, localdomains): no equivalent: each message is posted "
            "unchanged, and Rails routes on To:, Cc:, Bcc:, X-Original-To: and X-Forwarded-To:, not "
            "on Delivered-To:; route on that header in the app, or keep fetchmail for this mailbox"
        )
    if "limit" in found:
        account.note(
            f"limit {found['limit']}: a setting of the whole config file: "
            f"put max_size = {found['limit']} at its top"
        )
    if "timeout" in found:
        account.table["timeout"] = int(found["timeout"])
    for flag in flags:
        if flag in ("ssl", "sslcertck", "nosslcertck", "keep", "nokeep", "fetchall", "flush", "multidrop"):
            continue
        account.note(f"{flag}: no equivalent")


# --- TOML --------------------------------------------------------------------------------------


def unique(accounts: Sequence[Migrated], password_dir: str) -> None:
    """Two accounts of one name get -2, -3... (and their password files follow)."""
    seen: Dict[str, int] = {}
    for account in accounts:
        seen[account.name] = seen.get(account.name, 0) + 1
        if seen[account.name] > 1:
            old = password_path(password_dir, account.name)
            account.name = f"{account.name}-{seen[account.name]}"
            if account.table.get("password_file") == old:
                account.table["password_file"] = password_path(password_dir, account.name)


def render(accounts: Sequence[Migrated]) -> str:
    """The accounts as TOML tables with their comments."""
    parts = []
    for account in accounts:
        lines = [f"# from {account.origin}"]
        lines += [f"# - {note}" for note in account.notes]
        lines.append(f"[accounts.{account.name}]")
        lines += [f"{key} = {json.dumps(value, ensure_ascii=False)}" for key, value in account.table.items()]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
