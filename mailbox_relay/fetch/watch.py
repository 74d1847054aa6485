"""`watch`: stay connected, and deliver each message about as soon as it arrives.

One thread per account and folder (IDLE watches one selected folder per connection), each with
its own IMAP connection, state connection and ingress session, all in one process: one
folder's slow or retried posts never hold up another's. A thread never gives up on network,
IMAP, ingress, state or password-command trouble, nor on a server's temporary refusal
(RFC 5530 UNAVAILABLE, INUSE, LIMIT): it reconnects with capped exponential backoff and
jitter and catches up by UID. Only rejected credentials, after a few tries, stop the whole
watch (exit 78), because no retry can fix them.

Every IMAP command and every post is bounded as a whole by `timeout` (deadline.py), so a
server that trickles never holds a thread; on SIGTERM the watch lets deliveries in flight
finish for STOP_GRACE seconds, then cuts every connection it still has and exits.

Each folder's row in the state says when its last server round-trip was (a heartbeat), and
its last problem, so `status` calls a folder watched only while that is fresh.

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

import contextlib
import os
import threading
import time
from typing import TYPE_CHECKING, List, Optional

from mailbox_relay import deadline
from mailbox_relay.accounts import Account, SecretCommandFailed
from mailbox_relay.backoff import Backoff
from mailbox_relay.fetch.once import CONNECTION_ERRORS, FetchContext, make_post
from mailbox_relay.fetch.rules import FolderResult, FolderSync
from mailbox_relay.log import Log
from mailbox_relay.outcome import ConfigError, Exit, RelayError
from mailbox_relay.signals import Interrupted, stop_signals

if TYPE_CHECKING:
    from mailbox_relay.sources.mailbox import Source
from mailbox_relay.sources import connect
from mailbox_relay.sources.mailbox import SourceProblem, describe
from mailbox_relay.sources.oauth2 import grant_stamp
from mailbox_relay.state.folders import FetchState, FolderBusy, StateProblem

LOGIN_TRIES = 3  # rejected logins in a row before the watch gives up (exit 78)
# Refusals at login that no retry fixes: the password (or an expired one), or TLS the server
# requires ([PRIVACYREQUIRED]) or that fails. Anything else passes by itself.
NEEDS_A_PERSON = frozenset({"login", "tls"})
RECONNECT = Backoff(first=1.0, cap=60.0)
# The server refused us for now (RFC 5530 UNAVAILABLE, INUSE, LIMIT: a connection cap): back off
# longer, or every folder reconnecting at once keeps the account over its cap.
REFUSED_FOR_NOW = Backoff(first=15.0, cap=300.0)
PAUSED = Backoff(first=5.0, cap=300.0)  # after the ingress paused a folder: try again this often
TICK = 0.5  # how often an idle thread looks at the stop flag
GRANT_RECHECK = 300.0  # a refused OAuth2 grant is tried again this often even if its file is unchanged
STOP_GRACE = 2.0  # after SIGTERM: seconds for deliveries in flight to finish before connections are cut
STOP_CUT = 1.5  # then: seconds for the threads to notice their cut connections
BUSY_RETRY = 5.0  # another process is passing over the folder: look again this much later
LOCK_WAIT = 2.0  # how long a pass waits for that other process first


class Watch:
    """The threads and the flag that stops them."""

    def __init__(self, context: FetchContext, log: Log) -> None:
        self.context = context
        self.log = log
        self.stop = threading.Event()
        self.fatal: Optional[str] = None
        self._lock = threading.Lock()

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
        with stop_signals(self._signalled):
            for thread in threads:
                thread.start()
            self.stop.wait()  # a signal, or a thread that gave up
            left = self._join(threads, STOP_GRACE)
            if left:
                deadline.cancel_all("stopping")  # cut what still waits on a server or the ingress
                left = self._join(threads, STOP_CUT)
        if self.fatal:
            self.log(self.fatal)
            return Exit.CONFIG
        if left:  # daemon threads: they end with the process; nothing they hold is acknowledged
            unfinished = f"{len(left)} of the folders had not finished"
            self.log(f"stopped ({unfinished}; what they had not acknowledged is fetched next time)")
        else:
            self.log("stopped")
        return Exit.OK

    @staticmethod
    def _join(threads: List[threading.Thread], seconds: float) -> List[threading.Thread]:
        until = time.monotonic() + seconds
        for thread in threads:
            thread.join(max(0.0, until - time.monotonic()))
        return [thread for thread in threads if thread.is_alive()]

    def _signalled(self) -> None:
        if not self.stop.is_set():
            self.log("stopping: finishing the deliveries in flight, then logging out")
        self.stop.set()


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
        self.busy_said = False  # "another process is passing over it" is said once per streak
        self.refused_for_now = False  # the server's last answer was a temporary refusal
        # A round-trip at least this often proves the connection alive (IDLE re-issue, NOOP).
        cycle = (
            account.idle_refresh if account.poll_interval <= account.idle_refresh else account.poll_interval
        )
        self.fresh_for = 2 * cycle + account.timeout  # status calls the folder watched this long after

    def run(self) -> None:
        try:
            state = self.watch.context.open_state()
        except RelayError as error:  # a thread that ended quietly would leave its folder unwatched
            self.watch.give_up(f"{self.where}: {error.outcome.detail}")
            return
        session, post = make_post(self.watch.context.settings, self._say, threaded=True, pause=self._pause)
        sync = self.watch.context.folder_sync(
            self.account, state, post, self.log, self.log, self.watch.stop.is_set, lock_wait=LOCK_WAIT
        )
        sync.heartbeat = lambda: self._alive(state)  # a long catch-up is round-trips too
        attempt = 0
        try:
            while not self.watch.stop.is_set():
                attempt = 0 if self._connected(sync, state) else attempt + 1
                if self.grant_refused is not None:
                    self._wait_for_grant(self.grant_refused)
                elif not self.watch.stop.is_set():
                    backoff = REFUSED_FOR_NOW if self.refused_for_now else RECONNECT
                    self.watch.stop.wait(backoff.delay(max(attempt, 1)))
        finally:
            session.close()
            state.close()

    def _say(self, line: str) -> None:
        """The ingress client's retry lines, named by account and folder."""
        self.log(f"{self.where}: {line}")

    def _pause(self, seconds: float) -> None:
        """The retry loop's wait, cut short (raising Interrupted) when the watch stops."""
        if self.watch.stop.wait(seconds):
            raise Interrupted("stopping")

    def _connected(self, sync: FolderSync, state: FetchState) -> bool:
        """One connection's life. True when it ended after working (reconnect at once)."""
        self.grant_refused = None  # set again below if this attempt finds the grant refused
        self.refused_for_now = False  # likewise, for a server's temporary refusal
        try:
            source = connect(self.account)
        except SourceProblem as problem:
            self._failed(problem, state)
            return False
        except SecretCommandFailed as error:  # its secret store may be locked or restarting
            self._problem(state, f"{error.outcome.detail}; trying again")
            return False
        except ConfigError as error:  # the password file: no retry can fix it
            self._record(state, error.outcome.detail)
            self.watch.give_up(f"{self.where}: {error.outcome.detail}")
            return False
        self.login_failures = 0
        self.session_ends = _monotonic_at(source.replace_at())
        self.log(f"{self.where}: connected to {self.account.host}")
        worked = False
        try:
            self._serve(source, sync, state)
            worked = True
        except SourceProblem as problem:
            self._failed(problem, state)
            worked = problem.kind == "network"  # lost, after working: reconnect at once
        except CONNECTION_ERRORS as error:
            if not self.watch.stop.is_set():
                self._problem(state, f"connection lost ({describe(error)}); reconnecting")
            worked = True
        except StateProblem as problem:  # locked, full or damaged: try again after the backoff
            self.log(f"{self.where}: {problem.outcome.detail}")
        except Exception as error:  # a bug of ours: say so, and start over after the backoff
            self.log(f"{self.where}: internal error ({type(error).__name__}: {error}); please report this")
        finally:
            with contextlib.suppress(StateProblem):
                state.watching(self.account.name, self.folder, None)
            source.close()
        return worked

    def _failed(self, problem: SourceProblem, state: FetchState) -> None:
        if self.watch.stop.is_set():  # cut off by the stop itself: nothing to report or record
            return
        if problem.kind == "grant":  # a person must run `auth`: wait for that, say it once
            self.grant_refused = problem.line
            self._record(state, problem.line)
            return
        self.refused_for_now = problem.kind == "unavailable"
        if problem.kind in NEEDS_A_PERSON:
            self.login_failures += 1
            if self.login_failures >= LOGIN_TRIES:
                line = f"{problem.line} (rejected {LOGIN_TRIES} times; stopping)"
                self._record(state, line)
                self.watch.give_up(f"{self.where}: {line}")
                return
        self._problem(state, f"{problem.line}; trying again")

    def _problem(self, state: FetchState, line: str) -> None:
        self.log(f"{self.where}: {line}")
        self._record(state, line)

    def _record(self, state: FetchState, line: str) -> None:
        """The folder's last error, for `status` (and readiness): never lost to a broken state."""
        with contextlib.suppress(StateProblem):
            state.error(self.account.name, self.folder, line)

    def _alive(self, state: FetchState) -> None:
        """A server round-trip just worked: the heartbeat `status` judges "watched now" by."""
        state.watching(self.account.name, self.folder, os.getpid(), self.fresh_for)

    def _serve(self, source: Source, sync: FolderSync, state: FetchState) -> None:
        caught_up = False
        while not self.watch.stop.is_set():
            if time.monotonic() >= self.paused_until and self._pass(sync, source, state) and not caught_up:
                caught_up = True
                self.log(f"{self.where}: caught up; waiting for new mail ({source.waiting})")
            if time.monotonic() >= self.session_ends:
                self.log(
                    f"{self.where}: the OAuth2 token of this connection runs out; reconnecting with a new one"
                )
                return
            source.wait(min(self.wake_at, self.session_ends), self.watch.stop)
            self._alive(state)

    def _pass(self, sync: FolderSync, source: Source, state: FetchState) -> bool:
        """One pass; False when another process was passing over the folder (try again soon)."""
        try:
            result = sync.run(source, self.folder)
        except FolderBusy as busy:
            if not self.busy_said:
                self.log(f"{busy}; trying again every {BUSY_RETRY:g}s")
                self.busy_said = True
            self.paused_until = self.wake_at = time.monotonic() + BUSY_RETRY
            return False
        self.busy_said = False
        self._alive(state)
        self._after_pass(result, state)
        return True

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
