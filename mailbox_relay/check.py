"""`check`: would delivery work? Step by step, without creating an inbound email.

The HTTP step posts with the right credentials and a deliberately wrong Content-Type. Action
Mailbox checks configuration, then the password, then the media type, so its 415 proves the URL,
the relay ingress and the password are right while storing nothing.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

from mailbox_relay.accounts import Account, SecretCommandFailed, load_accounts
from mailbox_relay.ingress.endpoint import UNREACHABLE_HINT, plain_http_hint
from mailbox_relay.ingress.formats import INGRESSES
from mailbox_relay.ingress.target import Target, target_from
from mailbox_relay.log import Log, nowhere
from mailbox_relay.outcome import ConfigError, Exit, Outcome, Reason, Trouble, UsageError, check_exit_code
from mailbox_relay.settings import open_layers
from mailbox_relay.signals import DeadlinePassed, deadline


@dataclass(frozen=True)
class Step:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    steps: List[Step] = field(default_factory=list)
    exit_code: Exit = Exit.OK
    url: Optional[str] = None

    @property
    def ready(self) -> bool:
        return self.exit_code is Exit.OK

    def passed(self, name: str, detail: str) -> None:
        self.steps.append(Step(name, True, detail))

    def failed(self, name: str, detail: str, code: Exit) -> Report:
        self.steps.append(Step(name, False, detail))
        self.exit_code = code
        return self

    def as_json(self) -> Dict[str, Any]:
        return {
            "ready": self.ready,
            "exit_code": int(self.exit_code),
            "url": self.url,
            "steps": [{"step": s.name, "ok": s.ok, "detail": s.detail} for s in self.steps],
        }


def run_check(
    options: Mapping[str, Any],
    environ: Mapping[str, str],
    log: Log = nowhere,
    accounts: Sequence[str] = (),
) -> Report:
    """Every step in turn, stopping at the first that fails. Raises UsageError for a bad option.
    With `accounts`, each account's IMAP steps come first."""
    report = Report()
    try:
        layers = open_layers(options, environ)
        settings = target_from(layers)
        chosen = load_accounts(layers, accounts) if accounts else []
    except UsageError:
        raise
    except ConfigError as error:
        return report.failed("settings", error.outcome.detail, Exit.CONFIG)
    for line in [*settings.describe(), *(line for account in chosen for line in account.describe())]:
        log(line)  # -v: every setting and where it came from
    report.url = settings.url
    report.passed("settings", _describe_sources(settings))
    try:
        synced = _synced_folders(layers, environ) if chosen else frozenset()
    except ConfigError as error:  # the fetch state exists but cannot be read
        return report.failed("fetch state", error.outcome.detail, Exit.CONFIG)
    if not all(_check_account(report, account, synced) for account in chosen):
        return report
    endpoint = settings.endpoint
    if not _resolve(report, endpoint.host, endpoint.port):
        return report
    connection = _connect(report, endpoint.host, endpoint.port, settings.timeout)
    if connection is None:
        return report
    with connection:
        if endpoint.scheme == "https" and not _handshake(report, connection, endpoint.host, settings):
            return report
    return _probe(report, settings)


def crashed(error: Exception) -> Report:
    """A bug of ours, reported as a failed step with check's "unavailable" code."""
    detail = f"check itself failed ({type(error).__name__}: {error}); please report this"
    return Report().failed("check", detail, Exit.UNAVAILABLE)


def _describe_sources(settings: Target) -> str:
    ingress = settings.ingress_format
    url = f"url {settings.url} ({settings.sources.get('url')})"
    if ingress.name == "relay":
        return f"{url}; password set ({settings.password_source})"
    return (
        f"{url}; the {ingress.name} ingress; its {ingress.secret} set ({settings.password_source}), "
        f"to match the app's {ingress.app_secret}"
    )


def _resolve(report: Report, host: str, port: int, step: str = "dns") -> bool:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        report.failed(step, f"cannot resolve {host}: {error.strerror}", Exit.UNAVAILABLE)
        return False
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    report.passed(step, f"{host} is {', '.join(addresses)}")
    return True


def _connect(
    report: Report, host: str, port: int, timeout: float, step: str = "tcp"
) -> Optional[socket.socket]:
    started = time.monotonic()
    try:
        connection = socket.create_connection((host, port), timeout=timeout)
    except OSError as error:
        why = "timed out" if isinstance(error, socket.timeout) else (error.strerror or str(error))
        if isinstance(error, ConnectionRefusedError):
            why += f"; {UNREACHABLE_HINT}" if step == "tcp" else "; is the IMAP server's host and port right?"
        report.failed(step, f"cannot connect to {host}:{port}: {why}", Exit.UNAVAILABLE)
        return None
    report.passed(step, f"connected to {host}:{port} in {_ms(started)}")
    return connection


# --- IMAP accounts (check --account) ------------------------------------------------------------


def _trouble_code(kind: str) -> Exit:
    """check's exit code for an IMAP or OAuth2 token problem: outcome.Trouble's row."""
    return Trouble.of(kind).check_code


Synced = FrozenSet[Tuple[str, str]]  # (account, folder) pairs the fetch state already knows


def _synced_folders(layers: Any, environ: Mapping[str, str]) -> Synced:
    """The (account, folder) pairs fetch or watch have synced, read without creating anything."""
    from mailbox_relay.settings import FetchSettings
    from mailbox_relay.state.folders import default_path, synced_folders

    return synced_folders(FetchSettings.resolve(layers).fetch_state or default_path(environ))


def _check_account(
    report: Report, account: Account, synced: FrozenSet[Tuple[str, str]] = frozenset()
) -> bool:
    """DNS, TCP, TLS, login, capabilities, then each folder EXAMINEd: read-only, changes nothing."""
    if account.source == "pop3":
        return _check_pop3_account(report, account, synced)
    from mailbox_relay.sources.imap import ImapProblem, capabilities, close, login, open_connection

    if account.source == "graph":
        return _check_graph(report, account, synced)
    if not _resolve(report, account.host, account.port, "imap dns"):
        return False
    probe = _connect(report, account.host, account.port, account.timeout, "imap tcp")
    if probe is None:
        return False
    probe.close()
    if account.oauth2 is not None and not _oauth2_token(report, account):
        return False
    try:
        client = open_connection(account)
    except ImapProblem as problem:
        report.failed(f"imap {problem.kind}", problem.line, Exit.UNAVAILABLE)
        return False
    except ConfigError as error:
        report.failed("imap tls", error.outcome.detail, Exit.CONFIG)
        return False
    try:
        report.passed("imap tls", _imap_tls(client, account))
        login(client, account)
        how = "AUTHENTICATE XOAUTH2" if account.oauth2 else "LOGIN"
        report.passed("imap login", f"{account.username} logged in ({how})")
        found = capabilities(client)
        wanted = ", ".join(
            f"{name} {'yes' if name in found else 'no'}" for name in ("IDLE", "MOVE", "UIDPLUS")
        )
        report.passed("capabilities", wanted)
        first = {name for name in account.folders if (account.name, name) not in synced}
        return all(
            _examine(report, client, account, name, name in first) for name in account.folders
        ) and _move_target(report, client, account)
    except ImapProblem as problem:
        report.failed(f"imap {problem.kind}", problem.line, _trouble_code(problem.kind))
        return False
    except SecretCommandFailed as error:  # its secret store may be locked or restarting
        report.failed("imap login", error.outcome.detail, Exit.UNAVAILABLE)
        return False
    except ConfigError as error:  # the password file
        report.failed("imap login", error.outcome.detail, Exit.CONFIG)
        return False
    finally:
        close(client)


def _check_pop3_account(report: Report, account: Account, synced: Synced) -> bool:
    """DNS, TCP, TLS, login, UIDL (or the header digests it falls back to), the message count
    and what the first pass leaves alone. Read-only: no DELE, so the QUIT changes nothing."""
    from mailbox_relay.accounts import POP3_FOLDER
    from mailbox_relay.sources.mailbox import SourceProblem
    from mailbox_relay.sources.pop3 import Pop3Source, close, login, open_session

    if not _resolve(report, account.host, account.port, "pop3 dns"):
        return False
    probe = _connect(report, account.host, account.port, account.timeout, "pop3 tcp")
    if probe is None:
        return False
    probe.close()
    if account.oauth2 is not None and not _oauth2_token(report, account):
        return False
    step = "pop3 tls"
    try:
        session = open_session(account)
    except SourceProblem as problem:
        report.failed(f"pop3 {problem.kind}", problem.line, Exit.UNAVAILABLE)
        return False
    except ConfigError as error:
        report.failed(step, error.outcome.detail, Exit.CONFIG)
        return False
    try:
        report.passed(
            step, _imap_tls(session.client, account) if account.tls == "none" else _pop3_tls(session)
        )
        step = "pop3 login"
        login(session, account)
        report.passed(
            step, f"{account.username} logged in ({'AUTH XOAUTH2' if account.oauth2 else 'USER/PASS'})"
        )
        step = "maildrop"
        source = Pop3Source(session, account)
        opened = source.open(POP3_FOLDER)
        source.listing(None, None)
        why = session.uidl_problem
        keys = "UIDL" if why is None else f"a digest of each message's headers, since {why}"
        report.passed("uidl", f"messages are told apart by {keys}")
        first = (account.name, POP3_FOLDER) not in synced and account.start == "new" and opened.exists
        note = (
            f"; the first fetch or watch: {_left_alone_line(opened.exists, account.start)}" if first else ""
        )
        report.passed(step, f"{opened.exists} messages{note}")
        return True
    except SourceProblem as problem:
        report.failed(f"pop3 {problem.kind}", problem.line, _trouble_code(problem.kind))
        return False
    except SecretCommandFailed as error:
        report.failed(step, error.outcome.detail, Exit.UNAVAILABLE)
        return False
    except ConfigError as error:  # the password file
        report.failed(step, error.outcome.detail, Exit.CONFIG)
        return False
    finally:
        close(session)


def _pop3_tls(session: Any) -> str:
    sock = session.client.sock
    return f"{sock.version()} ({session.account.tls}), certificate verified"


def _check_graph(report: Report, account: Account, synced: Synced) -> bool:
    """Graph: the token (with the AADSTS code on failure), the permissions it carries, the
    mailbox, each folder and the move target looked up: read-only, changes nothing."""
    from mailbox_relay.sources.graph import GraphProblem, GraphSource, token_roles
    from mailbox_relay.sources.oauth2 import token_source

    if not _oauth2_token(report, account):
        return False
    roles = token_roles(token_source(account).current().access)
    if roles:
        writes = account.after.action != "keep"
        if writes and "Mail.ReadWrite" not in roles:
            report.failed(
                "permissions",
                f"the app has {', '.join(roles)}; after = {account.after} needs the application permission "
                'Mail.ReadWrite (with admin consent), or set after = "keep"',
                Exit.NOPERM,
            )
            return False
        if not {"Mail.Read", "Mail.ReadWrite"} & set(roles):
            report.failed(
                "permissions",
                f"the app has {', '.join(roles)}: it needs the application permission Mail.Read "
                "(Mail.ReadWrite for after) with admin consent",
                Exit.NOPERM,
            )
            return False
        report.passed("permissions", f"application permissions {', '.join(sorted(roles))}")
    else:
        report.passed("permissions", "the token names none (the lookups below show what the app may do)")
    source = GraphSource(account)
    step = "mailbox"
    try:
        inbox = source.folder("inbox")
        count = inbox.get("totalItemCount")
        report.passed(step, f"{account.username} at {account.graph_url} ({count} in Inbox)")
        for name in account.folders:
            step = f"folder {name}"
            info = source.folder(name)
            count = int(info.get("totalItemCount") or 0)
            first = (account.name, name) not in synced and account.start != "all" and count
            note = f"; the first fetch or watch: {_left_alone_line(count, account.start)}" if first else ""
            if first and account.start_date is not None:
                note = f"; the first fetch or watch leaves alone what arrived before {account.start}"
            report.passed(step, f"{info.get('displayName')}: {count} messages{note}")
        if account.after.action == "move":
            step = "after"
            source._target()
            report.passed(step, f"move:{account.after.folder}: the folder exists")
    except GraphProblem as problem:
        report.failed(step, problem.line, _trouble_code(problem.kind))
        return False
    finally:
        source.close()
    return True


def _oauth2_token(report: Report, account: Account) -> bool:
    """A new access token, which proves the stored grant (or the token command) still works."""
    from mailbox_relay.sources.oauth2 import TokenProblem, token_source

    try:
        token = token_source(account).renew()
    except TokenProblem as problem:
        report.failed("oauth2 token", problem.line, _trouble_code(problem.kind))
        return False
    except ConfigError as error:  # the grant file or the client secret file
        report.failed("oauth2 token", error.outcome.detail, Exit.CONFIG)
        return False
    report.passed("oauth2 token", token.describe())
    return True


def _imap_tls(client: Any, account: Account) -> str:
    if account.tls == "none":
        return f"none (allowed: {account.host} is loopback)"
    return f"{client.socket().version()} ({account.tls}), certificate verified"


def _move_target(report: Report, client: Any, account: Account) -> bool:
    if account.after.action != "move":
        return True
    from imapclient.exceptions import IMAPClientError

    from mailbox_relay.sources.imap import server_said

    try:
        exists = client.folder_exists(account.after.folder)
    except IMAPClientError as error:  # refused (a lost connection is an ImapProblem, caught above)
        report.failed(
            "after", f"move:{account.after.folder}: LIST was refused ({server_said(error)})", Exit.CONFIG
        )
        return False
    if exists:
        report.passed("after", f"move:{account.after.folder}: the folder exists")
        return True
    folder = account.after.folder
    report.failed(
        "after", f"move:{folder}: there is no folder {folder!r}; create it, or change after", Exit.CONFIG
    )
    return False


def _examine(report: Report, client: Any, account: Account, name: str, first: bool = False) -> bool:
    """EXAMINE: a refusal (NO, BAD) is this folder's problem (78); a connection lost or too
    slow meanwhile is the network's (69), as at login."""
    from imapclient.exceptions import IMAPClientError

    from mailbox_relay.sources.imap import ImapProblem, folder_refused, refused_for_now

    step = f"folder {name}"
    try:
        try:
            info = client.select_folder(name, readonly=True)
        except IMAPClientError as error:  # the server said no (a lost connection is an ImapProblem)
            missing, why = folder_refused(client, account, name, error)
            if not missing and refused_for_now(why):  # [UNAVAILABLE], [INUSE]...: not the folder
                report.failed(step, f"refused for now ({why}); try again later", Exit.UNAVAILABLE)
                return False
            detail = why if missing else f"cannot be opened: {why}"
            report.failed(step, f"{detail}; check folders", Exit.CONFIG)
            return False
    except ImapProblem as problem:
        report.failed(step, problem.line, _trouble_code(problem.kind))
        return False
    count, validity = int(info.get(b"EXISTS", 0)), int(info.get(b"UIDVALIDITY", 0))
    left = _left_alone(client, account, count) if first and count else 0
    note = f"; the first fetch or watch: {_left_alone_line(left, account.start)}" if left else ""
    report.passed(step, f"{count} messages (UIDVALIDITY {validity}){note}")
    return True


def _left_alone_line(count: int, start: str) -> str:
    from mailbox_relay.fetch.rules import left_alone_line

    return left_alone_line(count, start)


def _left_alone(client: Any, account: Account, count: int) -> int:
    """What the first pass will not deliver: everything there (start = new), or what is older
    than the start date (SEARCH, read-only)."""
    if account.start == "all":
        return 0
    if account.start_date is None:
        return count
    from imapclient.exceptions import IMAPClientError

    try:
        return max(0, count - len(client.search(["SINCE", account.start_date])))
    except IMAPClientError:  # refused: the note is only a note
        return 0


def _handshake(report: Report, connection: socket.socket, host: str, settings: Target) -> bool:
    try:
        # deadline: a server that trickles its handshake is bounded too
        with (
            deadline(settings.timeout),
            settings.tls.context().wrap_socket(connection, server_hostname=host) as tls,
        ):
            version, certificate = tls.version(), tls.getpeercert()
    except DeadlinePassed:
        detail = f"TLS with {host} did not finish within {settings.timeout:g}s"
        report.failed(
            "tls", detail + "; is something other than a TLS server on that port?", Exit.UNAVAILABLE
        )
        return False
    except (ssl.SSLError, OSError) as error:
        detail = f"TLS with {host} failed: {getattr(error, 'verify_message', None) or error}"
        hint = plain_http_hint(error) or "; fix the certificate, or pass --ca-bundle"
        report.failed("tls", detail + hint, Exit.UNAVAILABLE)
        return False
    if not certificate:
        report.passed("tls", f"{version}, certificate NOT verified (--insecure)")
        return True
    subject = dict(item[0] for item in certificate.get("subject", ()))  # type: ignore[misc]
    expires = ssl.cert_time_to_seconds(str(certificate["notAfter"]))
    days = int((expires - time.time()) // 86400)
    soon = " (renew it soon)" if days < 14 else ""
    report.passed(
        "tls",
        f"{version}, certificate for {subject.get('commonName', '?')} verified, "
        f"expires {certificate['notAfter']}, in {days} days{soon}",
    )
    return True


def _probe(report: Report, settings: Target) -> Report:
    from mailbox_relay.ingress.client import make_session, probe

    ingress = settings.ingress_format
    started = time.monotonic()
    with make_session(settings) as session:
        status, outcome = probe(session, settings)
        if status == 404:
            outcome = Outcome(outcome.reason, _other_ingress(session, settings))
    if status == ingress.probe_status:
        report.passed(
            "http",
            f"HTTP {status} to {ingress.probe}: the URL, the {ingress.name} ingress and the "
            f"{ingress.secret} are right (nothing was stored)",
        )
    elif outcome.delivered:
        outcome = Outcome(
            Reason.NOT_ACTION_MAILBOX,
            f"HTTP {status} to a request Action Mailbox would refuse with {ingress.probe_status}: this URL "
            f"is not an Action Mailbox {ingress.name} ingress (and may have stored the probe)",
        )
        return report.failed("http", outcome.line(), check_exit_code(outcome))
    else:
        return report.failed("http", outcome.line(), check_exit_code(outcome))
    report.passed("round trip", _ms(started))
    return report


def _other_ingress(session: Any, settings: Target) -> str:
    """After a 404: which ingress path the app does answer on, next to the URL's."""
    from urllib.parse import urlsplit

    from mailbox_relay.ingress.client import answers_at

    ingress = settings.ingress_format
    url, parts = settings.endpoint.url, urlsplit(settings.endpoint.url)
    # The app's mount point: the URL's path without the ingress's own part.
    prefix = parts.path[: -len(ingress.path)] if parts.path.endswith(ingress.path) else ""
    base = f"{parts.scheme}://{parts.netloc}{prefix}"
    # This ingress first: the mistake may be the URL's path (old guides print /postfix/).
    for other in dict.fromkeys([ingress, *INGRESSES.values()]):
        candidate = base + other.path
        if candidate == url.split("?")[0] or answers_at(session, settings, candidate) in (None, 404):
            continue
        if other is ingress:
            return f"no {ingress.name} ingress at {url} (HTTP 404), but there is one at {candidate}: use it"
        return (
            f"no {ingress.name} ingress at {url} (HTTP 404), but the app answers on the {other.name} "
            f"ingress ({candidate}): set ingress = {other.name} (and its {other.secret}), or "
            f"config.action_mailbox.ingress = :{ingress.name} in the app"
        )
    return (
        f"no {ingress.name} ingress at {url} (HTTP 404), and no other Action Mailbox ingress answers "
        f"under {base}: check the URL's host and path, and that the app sets "
        f"config.action_mailbox.ingress = :{ingress.name}"
    )


def _ms(started: float) -> str:
    return f"{(time.monotonic() - started) * 1000:.0f} ms"


def render(report: Report, stream: Any) -> None:
    """✓/✗ lines: with rich's colours on a terminal, plain text otherwise."""
    if stream.isatty():
        from rich.console import Console

        console = Console(file=stream, highlight=False)
        for step in report.steps:
            mark = "[green]✓[/green]" if step.ok else "[red]✗[/red]"
            console.print(f"{mark} [bold]{step.name}[/bold]: {step.detail}", markup=True)
        console.print(_verdict(report))
        return
    ok, bad = _marks(stream)
    for step in report.steps:
        stream.write(f"{ok if step.ok else bad} {step.name}: {step.detail}\n")
    stream.write(_verdict(report) + "\n")
    stream.flush()


def _marks(stream: Any) -> Tuple[str, str]:
    try:
        "✓✗".encode(getattr(stream, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return "OK  ", "FAIL"
    return "✓", "✗"


def _verdict(report: Report) -> str:
    if report.ready:
        return "ready: mailbox-relay deliver would deliver to this ingress"
    return f"not ready (exit {report.exit_code})"
