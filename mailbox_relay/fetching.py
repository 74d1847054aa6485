"""`fetch`: one pass over every chosen account and folder (for cron and systemd timers), and
what `fetch` and `watch` share: settings, one account's session with the ingress, the summary.

Messages go through the same `prepare` and `post_with_retry` as `deliver` and `import`.
"""

from __future__ import annotations

import imaplib
import os
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Type

from mailbox_relay.accounts import Account, load_accounts
from mailbox_relay.fetcher import FolderResult, FolderSync, Post
from mailbox_relay.fetchstate import FetchState, default_path
from mailbox_relay.imap import ImapFolder, ImapProblem, close, connect, describe
from mailbox_relay.log import Log, nowhere
from mailbox_relay.maildir import MaildirWriter
from mailbox_relay.outcome import ConfigError, Exit, UsageError
from mailbox_relay.settings import FetchSettings, Settings, open_layers, settings_from

# What a broken IMAP connection raises, besides our own ImapProblem.
CONNECTION_ERRORS: Tuple[Type[BaseException], ...] = (OSError, EOFError, socket.timeout, imaplib.IMAP4.error)


@dataclass
class FetchContext:
    settings: Settings
    fetch: FetchSettings
    accounts: List[Account]
    state_path: str
    failed: Optional[MaildirWriter]

    def describe(self) -> List[str]:
        lines = [*self.fetch.describe(), *self.settings.describe(), f"state {self.state_path}"]
        return lines + [line for account in self.accounts for line in account.describe()]

    def open_state(self) -> FetchState:
        try:
            return FetchState(self.state_path)
        except (OSError, sqlite3.Error) as error:
            raise UsageError(
                f"cannot open the fetch state {self.state_path} ({error}): set fetch_state to a writable path"
            ) from None

    def folder_sync(
        self,
        account: Account,
        state: FetchState,
        post: Post,
        log: Log,
        events: Log,
        stopping: Callable[[], bool],
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
        )


def open_context(
    options: Mapping[str, Any], environ: Mapping[str, str], names: Sequence[str]
) -> FetchContext:
    """Everything `fetch` and `watch` need, checked before any connection. Raises ConfigError."""
    layers = open_layers(options, environ)
    fetch = FetchSettings.resolve(layers)
    settings = settings_from(layers)
    accounts = load_accounts(layers, names)
    failed = None
    if fetch.failed_dir:
        try:
            failed = MaildirWriter(fetch.failed_dir)
        except OSError as error:
            raise ConfigError(
                f"cannot use failed_dir {fetch.failed_dir} ({error.strerror or error})"
            ) from None
    return FetchContext(settings, fetch, accounts, fetch.fetch_state or default_path(environ), failed)


def make_post(settings: Settings, log: Log) -> Tuple[Any, Post]:
    """A keep-alive session with the ingress and the function that posts through it."""
    from mailbox_relay.ingress.client import make_session, post_with_retry

    session = make_session(settings)
    return session, lambda prepared: post_with_retry(session, settings, prepared, log=log)


# --- one pass ------------------------------------------------------------------------------


@dataclass
class FetchSummary:
    folders: List[FolderResult] = field(default_factory=list)
    problems: List[Dict[str, str]] = field(default_factory=list)  # accounts or folders not reached
    interrupted: bool = False
    started: float = field(default_factory=time.monotonic)

    def total(self, name: str) -> int:
        return sum(int(getattr(result, name)) for result in self.folders)

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
            yield f"{result.account}/{result.folder}: {', '.join(counts)}"
            if result.paused:
                yield f"  paused: {result.paused}"
        for problem in self.problems:
            yield f"{problem['where']}: {problem['problem']}"
        yield _verdict(self.exit_code())


def _verdict(code: Exit) -> str:
    return {
        Exit.OK: "Everything found was delivered.",
        Exit.DATAERR: "Invalid messages were left on the server (see above); everything else was delivered.",
    }.get(code, "Some mail is still on the server, undelivered; it is tried again on the next run.")


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
            if stopping():
                summary.interrupted = True
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
    `problems`, and the other folders (and accounts) carry on."""
    results: List[FolderResult] = []
    try:
        client = connect(account)
    except ImapProblem as problem:
        _problem(problems, account.name, problem.line, log)
        return results
    except ConfigError as error:  # its password file or command; the other accounts go on
        _problem(problems, account.name, error.outcome.detail, log)
        return results
    try:
        folder = ImapFolder(client, account)
        for name in account.folders:
            if sync.stopping():
                break
            try:
                results.append(sync.run(folder, name))
            except ImapProblem as problem:  # this folder only
                _problem(problems, f"{account.name}/{name}", problem.line, log)
    except CONNECTION_ERRORS as error:
        _problem(problems, account.name, f"connection to {account.host} lost: {describe(error)}", log)
    finally:
        close(client)
    return results


def _problem(problems: List[Dict[str, str]], where: str, line: str, log: Log) -> None:
    problems.append({"where": where, "problem": line})
    log(f"{where}: {line}")


def folder_status(
    options: Mapping[str, Any], environ: Mapping[str, str], names: Sequence[str]
) -> Tuple[List[Dict[str, Any]], str]:
    """`status`: every folder's row of the state file (which is not created if missing)."""
    layers = open_layers(options, environ)
    path = FetchSettings.resolve(layers).fetch_state or default_path(environ)
    if names:
        load_accounts(layers, names)  # a misspelt name is said, not shown as "nothing"
    if not os.path.exists(path):
        return [], path
    state = FetchState(path)
    try:
        rows = [row for row in state.report() if not names or row["account"] in names]
    finally:
        state.close()
    for row in rows:
        row["watching"] = _pid_alive(row["watcher_pid"])
    return rows, path


def _pid_alive(pid: Optional[int]) -> bool:
    """A watch that was killed (-9) leaves its pid behind: ask the kernel whether it still runs."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
