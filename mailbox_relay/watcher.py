"""`watch`: stay connected, and deliver each message about as soon as it arrives.

One thread per account and folder (IDLE watches one selected folder per connection), each with
its own IMAP connection and state connection, all in one process; the main thread posts what
they find (see Courier). A thread
never gives up on network, IMAP or ingress trouble: it reconnects with capped exponential
backoff and jitter and catches up by UID. Only rejected credentials, after a few tries, stop
the whole watch (exit 78), because no retry can fix them.

Liveness: IDLE is re-issued every `idle_refresh` seconds (default 90, well under the 29 minutes
servers allow), and each re-issue waits at most `timeout` for the server's answer, so a
connection that went silent (no FIN, no RST: a blackhole) is noticed within about two minutes.
TCP keepalive covers the rest.

OAuth2 (auth = "xoauth2"): each connection logs in with a fresh token and is replaced by a new
one shortly before that token expires (Exchange Online ends the session then). A refused grant
pauses the account's folders, with the line that says to run `auth` again, until the grant file
changes (that is, `auth` ran) or GRANT_RECHECK passes.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any, Optional

from mailbox_relay.accounts import Account
from mailbox_relay.fetcher import FolderResult, FolderSync, Post
from mailbox_relay.fetching import CONNECTION_ERRORS, FetchContext, make_post
from mailbox_relay.fetchstate import FetchState
from mailbox_relay.imap import ImapFolder, ImapProblem, close, connect, describe, session_replace_at
from mailbox_relay.ingress.client import Backoff
from mailbox_relay.log import Log
from mailbox_relay.message import Prepared
from mailbox_relay.oauth2 import grant_stamp
from mailbox_relay.outcome import ConfigError, Exit, Outcome, RelayError, internal_error
from mailbox_relay.signals import stop_signals

LOGIN_TRIES = 3  # rejected logins in a row before the watch gives up (exit 78)
RECONNECT = Backoff(first=1.0, cap=60.0)
PAUSED = Backoff(first=5.0, cap=300.0)  # after the ingress paused a folder: try again this often
TICK = 0.5  # how often an idle thread looks at the stop flag
GRANT_RECHECK = 300.0  # a refused OAuth2 grant is tried again this often even if its file is unchanged


class Watch:
    """The threads and the flag that stops them."""

    def __init__(self, context: FetchContext, log: Log) -> None:
        self.context = context
        self.log = log
        self.stop = threading.Event()
        self.fatal: Optional[str] = None
        self._lock = threading.Lock()
        self.courier = Courier()

    def give_up(self, line: str) -> None:
        with self._lock:
            self.fatal = self.fatal or line
        self.stop.set()

    def run(self) -> Exit:
        threads = [
            threading.Thread(
                target=FolderWatcher(self, account, name).run, name=f"{account.name}/{name}", daemon=True
            )
            for account in self.context.accounts
            for name in account.folders
        ]
        session, post = make_post(self.context.settings, self.log)
        try:
            with stop_signals(self._signalled):
                for thread in threads:
                    thread.start()
                while any(thread.is_alive() for thread in threads):
                    self.courier.serve(post, TICK)  # until every thread has finished its delivery
        finally:
            session.close()
        if self.fatal:
            self.log(self.fatal)
            return Exit.CONFIG
        self.log("stopped")
        return Exit.OK

    def _signalled(self) -> None:
        if not self.stop.is_set():
            self.log("stopping: finishing the delivery in flight, then logging out")
        self.stop.set()


class _Answer:
    """The outcome of one message, handed from the main thread to the folder thread."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.outcome: Optional[Outcome] = None
        self.done = threading.Event()


class Courier:
    """Carries each folder thread's messages to the main thread, which posts them: only the main
    thread can take SIGALRM, which bounds each whole attempt by --timeout (signals.deadline), and
    one keep-alive connection serves every account."""

    def __init__(self) -> None:
        self._queue: queue.Queue[_Answer] = queue.Queue()

    def post(self, prepared: Prepared) -> Outcome:
        """For a folder thread: blocks until the main thread has posted the message."""
        answer = _Answer(prepared)
        self._queue.put(answer)
        answer.done.wait()
        assert answer.outcome is not None
        return answer.outcome

    def serve(self, post: Post, wait: float) -> None:
        """For the main thread: post the next message, if one comes within `wait` seconds."""
        try:
            answer = self._queue.get(timeout=wait)
        except queue.Empty:
            return
        try:
            answer.outcome = post(answer.prepared)
        except Exception as error:  # a bug of ours: this message fails (temporarily), the watch goes on
            answer.outcome = internal_error(error)
        finally:
            answer.done.set()


class FolderWatcher:
    """One folder of one account, for as long as the watch runs."""

    def __init__(self, watch: Watch, account: Account, folder: str) -> None:
        self.watch = watch
        self.account = account
        self.folder = folder
        self.where = f"{account.name}/{folder}"
        self.log = watch.log
        self.login_failures = 0
        self.pauses = 0
        self.paused_until = 0.0  # monotonic: no pass before this (the ingress paused the folder)
        self.wake_at = float("inf")  # monotonic: a pass is due then even without news (a retry)
        self.session_ends = float("inf")  # monotonic: its OAuth2 token runs out; reconnect first
        self.grant_refused: Optional[str] = None  # the line, while the account's grant is refused

    def run(self) -> None:
        try:
            state = self.watch.context.open_state()
        except RelayError as error:  # a thread that ended quietly would leave its folder unwatched
            self.watch.give_up(f"{self.where}: {error.outcome.detail}")
            return
        sync = self.watch.context.folder_sync(
            self.account, state, self.watch.courier.post, self.log, self.log, self.watch.stop.is_set
        )
        attempt = 0
        try:
            while not self.watch.stop.is_set():
                attempt = 0 if self._connected(sync, state) else attempt + 1
                if self.grant_refused is not None:
                    self._wait_for_grant(self.grant_refused)
                elif not self.watch.stop.is_set():
                    self.watch.stop.wait(RECONNECT.delay(max(attempt, 1)))
        finally:
            state.close()

    def _connected(self, sync: FolderSync, state: FetchState) -> bool:
        """One connection's life. True when it ended after working (reconnect at once)."""
        self.grant_refused = None  # set again below if this attempt finds the grant refused
        try:
            client = connect(self.account)
        except ImapProblem as problem:
            self._failed(problem)
            return False
        except ConfigError as error:  # the password file or command: no retry can fix it
            self.watch.give_up(f"{self.where}: {error.outcome.detail}")
            return False
        self.login_failures = 0
        self.session_ends = _monotonic_at(session_replace_at(client))
        self.log(f"{self.where}: connected to {self.account.host}")
        worked = False
        try:
            self._serve(client, sync, state)
            worked = True
        except ImapProblem as problem:
            self._failed(problem)
        except CONNECTION_ERRORS as error:
            self.log(f"{self.where}: connection lost ({describe(error)}); reconnecting")
            worked = True
        except Exception as error:  # a bug of ours: say so, and start over after the backoff
            self.log(f"{self.where}: internal error ({type(error).__name__}: {error}); please report this")
        finally:
            state.watching(self.account.name, self.folder, None)
            close(client)
        return worked

    def _failed(self, problem: ImapProblem) -> None:
        if problem.kind == "grant":  # a person must run `auth`: wait for that, say it once
            self.grant_refused = problem.line
            return
        if problem.kind == "login":
            self.login_failures += 1
            if self.login_failures >= LOGIN_TRIES:
                self.watch.give_up(f"{self.where}: {problem.line} (rejected {LOGIN_TRIES} times; stopping)")
                return
        self.log(f"{self.where}: {problem.line}; trying again")

    def _serve(self, client: Any, sync: FolderSync, state: FetchState) -> None:
        folder = ImapFolder(client, self.account)
        idle = client.has_capability("IDLE")
        marked = False  # in the state, for `status` (the folder's row exists after a pass)
        while not self.watch.stop.is_set():
            if time.monotonic() >= self.paused_until:
                self._after_pass(sync.run(folder, self.folder), state)
                if not marked:
                    state.watching(self.account.name, self.folder, os.getpid())
                    marked = True
                    how = "IDLE" if idle else f"polling every {self.account.poll_interval:g}s"
                    self.log(f"{self.where}: caught up; waiting for new mail ({how})")
            if time.monotonic() >= self.session_ends:
                self.log(
                    f"{self.where}: the OAuth2 token of this connection runs out; reconnecting with a new one"
                )
                return
            if idle:
                self._idle(client)
            else:
                self._poll(client)

    def _after_pass(self, result: FolderResult, state: FetchState) -> None:
        now = time.monotonic()
        if result.paused:
            self.pauses += 1
            self.paused_until = self.wake_at = now + PAUSED.delay(self.pauses)
            return
        self.pauses = 0
        self.paused_until = 0.0
        next_try = state.next_try(self.account.name, self.folder)
        self.wake_at = float("inf") if next_try is None else now + max(0.0, next_try - time.time())

    def _idle(self, client: Any) -> None:
        """Until something arrives, `idle_refresh` passes, a pass is due, or stop."""
        wake = min(time.monotonic() + self.account.idle_refresh, self.wake_at, self.session_ends)
        client.idle()
        try:
            while not self.watch.stop.is_set() and time.monotonic() < wake:
                if client.idle_check(timeout=TICK):
                    return  # EXISTS, EXPUNGE, FETCH...: a pass now
        finally:
            client.idle_done()  # waits at most `timeout` for the answer: a dead line raises

    def _poll(self, client: Any) -> None:
        wake = min(time.monotonic() + self.account.poll_interval, self.wake_at, self.session_ends)
        while not self.watch.stop.is_set() and time.monotonic() < wake:
            self.watch.stop.wait(min(TICK, max(0.0, wake - time.monotonic())))
        client.noop()

    def _wait_for_grant(self, line: str) -> None:
        """Until `auth` replaced the grant file, GRANT_RECHECK passed, or stop."""
        self.log(f"{self.where}: paused: {line}")
        stamp = grant_stamp(self.account)
        until = time.monotonic() + GRANT_RECHECK
        while not self.watch.stop.is_set() and time.monotonic() < until:
            if grant_stamp(self.account) != stamp:
                self.log(f"{self.where}: the OAuth2 grant changed; resuming")
                return
            self.watch.stop.wait(TICK)


def _monotonic_at(epoch: Optional[float]) -> float:
    return float("inf") if epoch is None else time.monotonic() + (epoch - time.time())


def run_watch(context: FetchContext, log: Log) -> Exit:
    return Watch(context, log).run()
