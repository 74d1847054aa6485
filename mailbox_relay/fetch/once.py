"""`fetch`: one pass over every chosen account and folder (for cron and systemd timers), and
what `fetch` and `watch` share: settings, one account's session with the ingress, the summary.

Messages go through the same `prepare` and `post_with_retry` as `deliver` and `import`.
"""

from __future__ import annotations

import contextlib
import imaplib
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Type

from mailbox_relay.accounts import Account, load_accounts
from mailbox_relay.fetch.rules import FolderResult, FolderSync, Post, left_alone_line
from mailbox_relay.ingress.target import Target, target_from
from mailbox_relay.log import Log, about, nowhere
from mailbox_relay.maildir import MaildirWriter, open_failed_dir
from mailbox_relay.message import Prepared
from mailbox_relay.outcome import ConfigError, Exit
from mailbox_relay.settings import FetchSettings, WatchSettings, open_layers
from mailbox_relay.sources import connect
from mailbox_relay.sources.mailbox import SourceProblem, describe
from mailbox_relay.state.folders import FetchState, FolderBusy, StateProblem, default_path

FETCH_LOCK_WAIT = 10.0  # seconds fetch waits for another process's pass over a folder

# What a broken connection raises, besides a source's own SourceProblem (IMAP: a lost or too
# slow connection is one already; imaplib's error is a NO or BAD the IMAP source did not name).
CONNECTION_ERRORS: Tuple[Type[BaseException], ...] = (OSError, EOFError, socket.timeout, imaplib.IMAP4.error)


@dataclass
class FetchContext:
    settings: Target
    fetch: FetchSettings
    accounts: List[Account]
    state_path: str
    failed: Optional[MaildirWriter]
    watch: WatchSettings

    def describe(self) -> List[str]:
        lines = [*self.fetch.describe(), *self.watch.describe(), *self.settings.describe()]
        lines.append(f"state {self.state_path}")
        return lines + [line for account in self.accounts for line in account.describe()]

    def open_state(self) -> FetchState:
        """The state store; a StateProblem (a ConfigError) names the file and what is wrong."""
        return FetchState(self.state_path)

    def folder_sync(
        self,
        account: Account,
        state: FetchState,
        post: Post,
        log: Log,
        events: Log,
        stopping: Callable[[], bool],
        lock_wait: float = FETCH_LOCK_WAIT,
    ) -> FolderSync:
        return FolderSync(
            account,
            state,
            post,
            max_size=self.settings.max_size,
            recipients=self.settings.envelope_recipient,
            max_tries=self.fetch.max_tries,
            failed=self.failed,
            log=log,
            events=events,
            stopping=stopping,
            lock_wait=lock_wait,
        )


def open_context(
    options: Mapping[str, Any], environ: Mapping[str, str], names: Sequence[str]
) -> FetchContext:
    """Everything `fetch` and `watch` need, checked before any connection. Raises ConfigError."""
    layers = open_layers(options, environ)
    fetch = FetchSettings.resolve(layers)
    watch = WatchSettings.resolve(layers)  # a mistyped --shard is a usage error before anything else
    settings = target_from(layers)
    accounts = load_accounts(layers, names)
    failed = open_failed_dir(fetch.failed_dir, fetch.sources.get("failed_dir", "default"))
    path = fetch.fetch_state or default_path(environ)
    return FetchContext(settings, fetch, accounts, path, failed, watch)


def make_post(
    settings: Target,
    log: Log,
    *,
    threaded: bool = False,
    pause: Optional[Callable[[float], None]] = None,
) -> Tuple[Any, Post]:
    """A keep-alive session with the ingress and the function that posts through it.

    `log` gets the retry lines of a post given no log of its own (rules.py gives each message
    one that names its account, folder and UID). `threaded`: posts run off the main thread,
    where each whole attempt is bounded by the deadline watchdog instead of SIGALRM. `pause`
    replaces the retry loop's sleep; it raises `Interrupted` when the work is stopping, and the
    message then stays for next time."""
    from mailbox_relay.ingress.client import Clock, make_session, post_with_retry
    from mailbox_relay.outcome import Outcome, Reason
    from mailbox_relay.signals import Interrupted

    session = make_session(settings, threaded=threaded)
    clock = Clock(sleep=pause) if pause is not None else None

    fallback = log

    def post(prepared: Prepared, log: Optional[Log] = None) -> Outcome:
        try:
            return post_with_retry(session, settings, prepared, log=log or fallback, clock=clock)
        except Interrupted:
            return Outcome(Reason.INTERRUPTED, "stopping; the message stays on the server for next time")

    return session, post


# --- one pass ------------------------------------------------------------------------------


@dataclass
class FetchSummary:
    folders: List[FolderResult] = field(default_factory=list)
    problems: List[Dict[str, str]] = field(default_factory=list)  # accounts or folders not reached
    interrupted: bool = False
    started: float = field(default_factory=time.monotonic)

    def total(self, name: str) -> int:
        return sum(int(getattr(result, name)) for result in self.folders)

    @property
    def state_failed(self) -> bool:
        return any(result.state_failed for result in self.folders)

    def exit_code(self) -> Exit:
        """75 something may pass on a later run; 65 only invalid messages are left; 0 all done."""
        stuck = any(result.paused for result in self.folders)
        later = sum(self.total(name) for name in ("failed", "quarantined", "waiting"))
        if self.problems or stuck or later or self.interrupted:
            return Exit.TEMPFAIL
        return Exit.DATAERR if self.total("invalid") else Exit.OK

    def as_json(self) -> Dict[str, Any]:
        return {
            "folders": [result.as_json() for result in self.folders],
            "problems": self.problems,
            "interrupted": self.interrupted,
            "delivered": self.total("delivered"),
            "invalid": self.total("invalid"),
            "failed": self.total("failed") + self.total("waiting"),
            "quarantined": self.total("quarantined"),
            "seconds": round(time.monotonic() - self.started, 3),
            "exit_code": int(self.exit_code()),
        }

    def lines(self) -> Iterable[str]:
        for result in self.folders:
            counts = [f"{result.found} found", f"{result.delivered} delivered"]
            counts += [
                f"{getattr(result, name)} {name}"
                for name in ("invalid", "failed", "quarantined", "gone")
                if getattr(result, name)
            ]
            if result.waiting:
                counts.append(f"{result.waiting} waiting to be tried again")
            if result.removed:
                counts.append(f"{result.removed} delivered earlier deleted from the server")
            yield f"{result.account}/{result.folder}: {', '.join(counts)}"
            if result.left_alone:
                yield f"  {left_alone_line(result.left_alone, result.start)}"
            if result.paused:
                yield f"  {'stopped' if result.state_failed else 'paused'}: {result.paused}"
        for problem in self.problems:
            yield f"{problem['where']}: {problem['problem']}"
        yield from self._verdict()

    def _verdict(self) -> Iterable[str]:
        """What the run knows, and only that: mail it never saw is neither delivered nor not."""
        undelivered = any(result.paused for result in self.folders) or any(
            self.total(name) for name in ("failed", "quarantined", "waiting")
        )
        if undelivered:
            yield "Some mail is still on the server, undelivered; it is tried again on the next run."
        if self.problems:
            yield "Some accounts or folders could not be read (see above); they are tried on the next run."
        if self.interrupted:
            yield "Stopped before the end; the next run carries on from where this one stopped."
        if not (undelivered or self.problems or self.interrupted):
            if self.total("invalid"):
                yield "Invalid messages were left on the server (see above); everything else was delivered."
            else:
                yield "Everything found was delivered."


def fetch_once(
    context: FetchContext,
    *,
    log: Log = nowhere,
    events: Log = nowhere,
    stopping: Callable[[], bool] = lambda: False,
) -> FetchSummary:
    summary = FetchSummary()
    state = context.open_state()
    session, post = make_post(context.settings, log)
    try:
        for account in context.accounts:
            if stopping() or summary.state_failed:  # a failing state file fails every folder
                summary.interrupted = summary.interrupted or stopping()
                break
            sync = context.folder_sync(account, state, post, log, events, stopping)
            summary.folders += sync_account(account, sync, summary.problems, log)
    finally:
        session.close()
        state.close()
    summary.interrupted = summary.interrupted or stopping()
    return summary


def sync_account(
    account: Account, sync: FolderSync, problems: List[Dict[str, str]], log: Log
) -> List[FolderResult]:
    """Every folder of one account over one connection; what could not be reached goes to
    `problems` (and to the state, for `status`), and the other folders (and accounts) carry on."""
    results: List[FolderResult] = []
    report = _Problems(problems, sync.state, account, log)
    try:
        source = connect(account)
    except SourceProblem as problem:
        report.account(problem.line)
        return results
    except ConfigError as error:  # its password file or command; the other accounts go on
        report.account(error.outcome.detail)
        return results
    try:
        for name in account.folders:
            if sync.stopping():
                break
            try:
                results.append(sync.run(source, name))
            except SourceProblem as problem:
                if problem.kind == "network":  # the connection is gone: not this folder's problem
                    report.account(problem.line)
                    break
                report.folder(name, problem.line)  # this folder only
            except FolderBusy as busy:
                report.folder(name, str(busy).split(": ", 1)[1], record=False)
            if results and results[-1].state_failed:
                break
    except CONNECTION_ERRORS as error:
        report.account(f"connection to {account.host} lost: {describe(error)}")
    finally:
        source.close()
    return results


class _Problems:
    """What could not be reached: for the summary, for stderr, and for `status` (last_error)."""

    def __init__(self, problems: List[Dict[str, str]], state: FetchState, account: Account, log: Log) -> None:
        self.problems = problems
        self.state = state
        self.account_ = account
        self.log = log

    def account(self, line: str) -> None:
        self._add(self.account_.name, None, line)
        for name in self.account_.folders:
            self._record(name, line)

    def folder(self, name: str, line: str, record: bool = True) -> None:
        self._add(f"{self.account_.name}/{name}", name, line)
        if record:
            self._record(name, line)

    def _add(self, where: str, folder: Optional[str], line: str) -> None:
        self.problems.append({"where": where, "problem": line})
        account = self.account_.name
        self.log(about(f"{where}: {line}", "unreachable", account=account, folder=folder, level="warning"))

    def _record(self, folder: str, line: str) -> None:
        with contextlib.suppress(StateProblem):  # a broken state is said where it breaks
            self.state.error(self.account_.name, folder, line)
