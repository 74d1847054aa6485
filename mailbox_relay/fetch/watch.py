"""`watch`: stay connected, and deliver each message about as soon as it arrives.

One event loop (fetch/loop.py) in the main thread waits on every folder's connection at once
(IDLE watches one selected folder per connection), and on timers: the IDLE re-issue, polls,
backoffs, retries due, OAuth2 sessions that end. Nothing in it blocks on a server, the ingress
or SQLite: that work runs in bounded pools of worker threads, which hand the next step back to
the loop. Logins run `logins` at a time (so 10,000 accounts don't hit a server in one second),
IDLE and NOOP round trips in a pool of their own (a hanging one never holds up a login), and
passes (fetch, post, acknowledge) `jobs` at a time: at most `jobs` posts are in flight across
every folder. An account never has more than its `max_connections` connections.

A lost connection is noticed when it happens: a FIN, an RST or a TLS close makes the socket
readable, and the source's `readable()` raises. One line, a reconnect with capped exponential
backoff and jitter, and a catch-up by UID. A connection that goes silent (a blackhole) is caught
by the IDLE re-issue every `idle_refresh`, whose answer must come within `timeout`, and by TCP
keepalive. A folder never gives up on network, IMAP, ingress, state or password-command trouble,
nor on a server's temporary refusal (RFC 5530 UNAVAILABLE, INUSE, LIMIT); only rejected
credentials, after a few tries, stop the whole watch (exit 78), because no retry can fix them.

SIGHUP re-reads the config: added accounts and folders start, removed ones log out, changed
ones reconnect, the others keep their connections; a config that no longer parses changes
nothing. `shard` K/N watches only the accounts whose name hashes (SHA-256) to shard K.

SIGTERM: deliveries in flight get STOP_GRACE seconds, then every connection still in use is cut
(deadline.cancel_all) and the watch exits within about 3 s, whatever the connections do.

Each folder's row in the state says when its last server round trip was (a heartbeat, written
in batches from the loop), and its last problem, so `status` calls a folder watched only while
that is fresh. Listeners (health, metrics) hear everything through `Watch.events`.

OAuth2 (auth = "xoauth2"): each connection logs in with a fresh token and is replaced by a new
one shortly before that token expires (Exchange Online ends the session then). A refused grant
pauses the account's folders, with the line that says to run `auth` again, until the grant file
changes (that is, `auth` ran) or GRANT_RECHECK passes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from mailbox_relay import deadline
from mailbox_relay.accounts import Account, SecretCommandFailed
from mailbox_relay.backoff import Backoff
from mailbox_relay.fetch.events import Fanout, WatchEvents
from mailbox_relay.fetch.loop import Handle, Loop
from mailbox_relay.fetch.once import CONNECTION_ERRORS, FetchContext, make_post
from mailbox_relay.fetch.rules import FolderResult
from mailbox_relay.log import Log
from mailbox_relay.outcome import ConfigError, Exit, RelayError
from mailbox_relay.settings import Address
from mailbox_relay.signals import Interrupted

if TYPE_CHECKING:
    import socket

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
GRANT_RECHECK = 300.0  # a refused OAuth2 grant is tried again this often even if its file is unchanged
GRANT_LOOK = 1.0  # while a grant is refused: how often its file is looked at (`auth` replaces it)
STOP_GRACE = 1.5  # after SIGTERM: seconds for deliveries in flight to finish before connections are cut
STOP_CUT = 1.0  # then: seconds for the workers to notice their cut connections
BUSY_RETRY = 5.0  # another process is passing over the folder: look again this much later
LOCK_WAIT = 2.0  # how long a pass waits for that other process first
ROUND_TRIPS = 16  # workers for IDLE, DONE, NOOP and LOGOUT round trips
HEARTBEATS = 5.0  # seconds between batched heartbeat writes (a folder's first is written at once)

Step = Optional[Callable[[], None]]  # what a worker hands back to the loop: the folder's next step


class Pool:
    """Daemon worker threads taking jobs from one queue: daemon, so a worker stuck past the
    stop's cut never holds the process (nothing it holds is acknowledged)."""

    def __init__(self, size: int, name: str) -> None:
        self.jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.size = size
        self.name = name
        self.threads: List[threading.Thread] = []
        self._free = 0  # threads waiting for a job (or started for one)
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:  # a thread is started only when none is free, never more than size
            start = self._free == 0 and len(self.threads) < self.size
            if start:
                self._free += 1
        if start:
            thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self.threads)}", daemon=True)
            self.threads.append(thread)
            thread.start()
        self.jobs.put(job)

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            with self._lock:
                self._free -= 1
            try:
                job()
            except BaseException:  # a job reports its own errors; the thread goes on
                pass
            finally:
                with self._lock:
                    self._free += 1


class Worker(threading.local):
    """What each worker thread keeps for itself: its state connection and ingress session."""

    state: Optional[FetchState] = None
    post: Any = None
    session: Any = None
    generation = -1  # the config generation its session was made for (SIGHUP may change the ingress)


class Watch:
    """The loop, the pools, and every folder's watcher."""

    def __init__(
        self, context: FetchContext, log: Log, reread: Optional[Callable[[], FetchContext]] = None
    ) -> None:
        self.context = context
        self.log = log
        self.reread = reread  # SIGHUP: the config read again (ConfigError if it no longer parses)
        self.events: Fanout = Fanout()
        self.loop = Loop(log)
        self.stopping = threading.Event()
        self.fatal: Optional[str] = None
        settings = context.watch
        self.logins = Pool(settings.logins, "login")
        self.round_trips = Pool(ROUND_TRIPS, "imap")
        self.passes = Pool(settings.jobs, "pass")
        self.watchers: Dict[Tuple[str, str], FolderWatcher] = {}
        self.accounts: Dict[str, Account] = {}
        self.slots: Dict[str, AccountSlots] = {}
        self.generation = 0
        self._worker = Worker()
        self._first_round: Optional[set[Tuple[str, str]]] = set()
        self._beats: Dict[Tuple[str, str], float] = {}  # folder: fresh_for, waiting for the next write
        self._beat_soon: Optional[Handle] = None

    # --- for listeners (health, metrics) ---------------------------------------------------------

    def folders(self) -> List[Tuple[str, str]]:
        return sorted(self.watchers)

    def account(self, name: str) -> Account:
        return self.accounts[name]

    # --- running -----------------------------------------------------------------------------

    def run(self) -> Exit:
        import signal

        previous = {
            number: signal.signal(number, handler)
            for number, handler in (
                (signal.SIGTERM, self._signalled),
                (signal.SIGINT, self._signalled),
                (signal.SIGHUP, self._hangup),
            )
        }
        try:
            self._start(self.context.accounts)
            self.loop.call_later(HEARTBEATS, self._heartbeats)
            self.loop.run()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            self.loop.close()
        self._let_go()
        if self.fatal:
            self.log(self.fatal)
            return Exit.CONFIG
        busy = [watcher for watcher in self.watchers.values() if watcher.busy]
        if busy:  # daemon threads: they end with the process; nothing they hold is acknowledged
            unfinished = f"{len(busy)} of the folders had not finished"
            self.log(f"stopped ({unfinished}; what they had not acknowledged is fetched next time)")
        else:
            self.log("stopped")
        return Exit.OK

    def _start(self, accounts: List[Account]) -> None:
        shard = self.context.watch.shard
        for account in accounts:
            if shard is not None and shard_of(account.name, shard[1]) != shard[0]:
                continue
            self._add_account(account)
        if shard is not None:
            watched = f"watching {len(self.accounts)} of {len(accounts)} accounts"
            self.log(f"shard {shard[0]}/{shard[1]}: {watched}")
        if not self.watchers:
            self._round_done()

    def _add_account(self, account: Account) -> None:
        self.accounts[account.name] = account
        self.slots[account.name] = AccountSlots(account.max_connections)
        for folder in account.folders:
            self._add_folder(account, folder)

    def _add_folder(self, account: Account, folder: str) -> None:
        watcher = FolderWatcher(self, account, folder)
        self.watchers[(account.name, folder)] = watcher
        if self._first_round is not None:
            self._first_round.add((account.name, folder))
        self.events.folder_added(account.name, folder)
        watcher.start()

    def first_round(self, watcher: FolderWatcher) -> None:
        """The folder connected or failed for the first time (loop thread)."""
        if self._first_round is not None:
            self._first_round.discard((watcher.account.name, watcher.folder))
            if not self._first_round:
                self._round_done()

    def _round_done(self) -> None:
        self._first_round = None
        self.events.first_round_done()

    def give_up(self, line: str) -> None:
        """Any thread: rejected credentials or an unusable password file stop the watch (78)."""
        self.fatal = self.fatal or line
        self.loop.call_soon_threadsafe(self.stop)

    def _signalled(self, signum: int, frame: object) -> None:
        self.loop.call_soon_threadsafe(self.stop)

    def stop(self) -> None:
        """Loop thread: stop every folder; deliveries in flight get STOP_GRACE, then are cut."""
        if self.stopping.is_set():
            return
        if self.fatal is None:
            self.log("stopping: finishing the deliveries in flight, then logging out")
        self.stopping.set()
        self.events.stopping()
        for watcher in self.watchers.values():
            watcher.stop()
        self._stop_when_idle(time.monotonic() + STOP_GRACE, cut=False)

    def _stop_when_idle(self, until: float, cut: bool) -> None:
        if not any(watcher.busy for watcher in self.watchers.values()) or (cut and time.monotonic() >= until):
            self.loop.stop()
            return
        if not cut and time.monotonic() >= until:
            deadline.cancel_all("stopping")  # cut what still waits on a server or the ingress
            until, cut = time.monotonic() + STOP_CUT, True
        self.loop.call_later(0.05, lambda: self._stop_when_idle(until, cut))

    def _let_go(self) -> None:
        """Tell `status` this process no longer watches its folders (one transaction)."""
        with contextlib.suppress(RelayError):
            state = self.context.open_state()
            try:
                state.heartbeats(None, [(account, folder, 0.0) for account, folder in self.watchers])
            finally:
                state.close()

    # --- SIGHUP --------------------------------------------------------------------------------

    def _hangup(self, signum: int, frame: object) -> None:
        self.loop.call_soon_threadsafe(self.reload)

    def reload(self) -> None:
        """Loop thread: the config read again, applied folder by folder."""
        if self.reread is None or self.stopping.is_set():
            return
        self.events.reloading()
        try:
            context = self.reread()
        except RelayError as error:  # a config that no longer parses changes nothing
            self.log(f"reload: the config was not changed: {error.outcome.detail}")
            self.events.reloaded()
            return
        old = self.context
        self.context = context
        if context.settings != old.settings or context.fetch.describe() != old.fetch.describe():
            self.generation += 1  # each worker makes a new ingress session on its next pass
        kept, changed, added, removed = self._diff(context)
        for name in removed + changed:
            self._remove_account(name, "reload")
        for account in context.accounts:
            if account.name in added or account.name in changed:
                self._add_account(account)
            elif account.name in kept:
                self._refolder(account)
        if context.watch.jobs != old.watch.jobs or context.watch.logins != old.watch.logins:
            self.log("reload: jobs and logins take effect at the next start")
        parts = [f"{len(added)} added", f"{len(removed)} removed", f"{len(changed)} changed"]
        self.log(f"reload: {', '.join(parts)}; {len(kept)} unchanged keep their connections")
        self.events.reloaded()

    def _diff(self, context: FetchContext) -> Tuple[List[str], List[str], List[str], List[str]]:
        shard = context.watch.shard
        wanted = {
            account.name: account
            for account in context.accounts
            if shard is None or shard_of(account.name, shard[1]) == shard[0]
        }
        kept, changed, added = [], [], []
        for name, account in wanted.items():
            if name not in self.accounts:
                added.append(name)
            elif same_account(self.accounts[name], account):
                kept.append(name)
            else:
                changed.append(name)
        removed = [name for name in self.accounts if name not in wanted]
        return kept, changed, added, removed

    def _refolder(self, account: Account) -> None:
        """An unchanged account's folders: only a change of `folders` itself reaches here."""
        current = {folder for name, folder in self.watchers if name == account.name}
        for folder in current - set(account.folders):
            self._remove_folder(account.name, folder, "reload")
        for folder in account.folders:
            if folder not in current:
                self._add_folder(account, folder)
        self.accounts[account.name] = account

    def _remove_account(self, name: str, cause: str) -> None:
        for account, folder in list(self.watchers):
            if account == name:
                self._remove_folder(account, folder, cause)
        del self.accounts[name]

    def _remove_folder(self, account: str, folder: str, cause: str) -> None:
        watcher = self.watchers.pop((account, folder))
        watcher.remove(cause)
        self._beats.pop((account, folder), None)
        if self._first_round is not None:
            self.first_round(watcher)
        self.events.folder_removed(account, folder)

    # --- what workers share ----------------------------------------------------------------

    def worker_state(self) -> FetchState:
        """This worker thread's own state connection (SQLite connections stay in their thread)."""
        worker = self._worker
        if worker.state is None:
            worker.state = self.context.open_state()
        return worker.state

    def worker_post(self) -> Any:
        """This worker thread's own ingress session and post function."""
        worker = self._worker
        if worker.generation != self.generation:
            if worker.session is not None:
                worker.session.close()
            worker.session, worker.post = make_post(
                self.context.settings, self.log, threaded=True, pause=self._pause
            )
            worker.generation = self.generation
        return worker.post

    def _pause(self, seconds: float) -> None:
        """The retry loop's wait, cut short (raising Interrupted) when the watch stops."""
        if self.stopping.wait(seconds):
            raise Interrupted("stopping")

    # --- heartbeats --------------------------------------------------------------------------

    def beat(self, watcher: FolderWatcher, first: bool) -> None:
        """Loop thread: the folder's server answered; written in the next batch (its first at once)."""
        self._beats[(watcher.account.name, watcher.folder)] = watcher.fresh_for
        if first and self._beat_soon is None:
            self._beat_soon = self.loop.call_later(0.0, self._write_beats)

    def _heartbeats(self) -> None:
        self._write_beats()
        self.loop.call_later(HEARTBEATS, self._heartbeats)

    def _write_beats(self) -> None:
        self._beat_soon = None
        if not self._beats:
            return
        rows = [(account, folder, fresh_for) for (account, folder), fresh_for in self._beats.items()]
        self._beats = {}
        pid = os.getpid()

        def write() -> None:
            with contextlib.suppress(StateProblem):  # said by the pass that meets it
                self.worker_state().heartbeats(pid, rows)

        self.round_trips.submit(write)


class AccountSlots:
    """An account's connections: at most `cap` at once (Gmail allows 15); a folder beyond it
    waits for one to be free."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self.waiting: List[Callable[[], None]] = []

    def take(self, then: Callable[[], None]) -> None:
        if self.used < self.cap:
            self.used += 1
            then()
        else:
            self.waiting.append(then)

    def give_back(self) -> None:
        if self.waiting:
            self.waiting.pop(0)()
        else:
            self.used -= 1

    def forget(self, then: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self.waiting.remove(then)


class FolderWatcher:
    """One folder of one account, for as long as the watch runs. Its fields are touched by the
    loop between jobs and by its one job in flight (`busy`), never by both at once."""

    def __init__(self, watch: Watch, account: Account, folder: str) -> None:
        self.watch = watch
        self.account = account
        self.folder = folder
        self.where = f"{account.name}/{folder}"
        self.log = watch.log
        self.source: Optional[Source] = None
        self.sock: Optional[socket.socket] = None  # the socket the loop watches while waiting
        self.timers: List[Handle] = []
        self.busy = False  # a job of this folder is in a pool or running
        self.gone = False  # stopped or removed: no next step
        self.has_slot = False  # holds one of the account's connections
        self.attempt = 0
        self.login_failures = 0
        self.pauses = 0
        self.paused_until = 0.0  # monotonic: no pass before this (the ingress paused the folder)
        self.wake_at = float("inf")  # monotonic: a pass is due then even without news (a retry)
        self.session_ends = float("inf")  # monotonic: its OAuth2 token runs out; reconnect first
        self.grant_refused: Optional[str] = None  # the line, while the account's grant is refused
        self.busy_said = False  # "another process is passing over it" is said once per streak
        self.refused_for_now = False  # the server's last answer was a temporary refusal
        self.caught_up = False
        self.idling = False  # the source is waiting (IDLE sent): DONE before anything else
        self.slot_said = False  # "waits for a connection of the account" is said once
        self.beaten = False  # its first heartbeat of this connection was asked for
        # A round-trip at least this often proves the connection alive (IDLE re-issue, NOOP).
        cycle = (
            account.idle_refresh if account.poll_interval <= account.idle_refresh else account.poll_interval
        )
        self.fresh_for = 2 * cycle + account.timeout  # status calls the folder watched this long after

    @property
    def events(self) -> WatchEvents:
        return self.watch.events

    # --- the loop's side ---------------------------------------------------------------------

    def start(self) -> None:
        self._connect()

    def stop(self) -> None:
        """The watch stops: let go of the connection (a job in flight ends on its own)."""
        self.gone = True
        self._unwait()
        if self.has_slot and not self.busy:
            self._job(self.watch.round_trips, self._close_job)

    def remove(self, cause: str) -> None:
        """SIGHUP removed or changed the folder's account: log out, and never start again."""
        if self.source is not None:
            self.events.lost(self.account.name, self.folder, cause)
        self.stop()
        self.watch.slots[self.account.name].forget(self._connected_slot)

    def _connect(self) -> None:
        if self.gone:
            return
        slots = self.watch.slots[self.account.name]
        if slots.used >= slots.cap and not self.slot_said:
            self.slot_said = True
            self.log(
                f"{self.where}: account {self.account.name} has all its {slots.cap} connections "
                "(max_connections) in use; this folder waits for one to be free"
            )
        slots.take(self._connected_slot)

    def _connected_slot(self) -> None:
        self.has_slot = True
        if self.gone:
            self._give_back()
            return
        self.events.connecting(self.account.name, self.folder)
        self._job(self.watch.logins, self._connect_job)

    def _give_back(self) -> None:
        if self.has_slot:
            self.has_slot = False
            self.watch.slots[self.account.name].give_back()

    def _job(self, pool: Pool, work: Callable[[], Step]) -> None:
        """`work` in a worker; the step it returns runs in the loop."""
        self.busy = True

        def job() -> None:
            try:
                step = work()
            except BaseException as error:  # a bug of ours (or a BaseException such as
                # DeadlinePassed escaping): say so, and start over after the backoff. Never let
                # it end the job without a step: the folder would wait for it forever.
                what = f"{type(error).__name__}: {error}"
                self.log(f"{self.where}: internal error ({what}); please report this")
                self._drop_source()
                step = self._backoff_step("internal error")
            self.watch.loop.call_soon_threadsafe(lambda: self._step(step))

        pool.submit(job)

    def _step(self, step: Step) -> None:
        self.busy = False
        if self.gone:  # stopped or removed meanwhile: log out, give the account its slot back
            if self.source is not None:
                self._job(self.watch.round_trips, self._close_job)
            else:
                self._give_back()
            return
        if step is not None:
            step()

    def _wait(self, sock: Optional[socket.socket]) -> None:
        """Connected and caught up: wait for news, the next round trip, a retry or the session's end."""
        assert self.source is not None
        self._beat()
        now = time.monotonic()
        refresh = self.source.refresh_every
        # Every re-issue is followed by a pass (catching up by UID), not only a poll: a server
        # may send news with DONE's answer, or never (a notification lost while a connection
        # was hibernated), and a message must then wait at most idle_refresh, not forever.
        self._timer(refresh, self._wake)
        if self.wake_at < float("inf"):
            self._timer(max(self.wake_at, self.paused_until) - now, self._wake)
        if self.session_ends < float("inf"):
            self._timer(self.session_ends - now, self._session_ends)
        if sock is None:
            return
        self.sock = sock
        self._readable()  # what came with IDLE's answer
        if self.sock is not None:
            self.watch.loop.add_reader(sock, self._readable)

    def _readable(self) -> None:
        assert self.source is not None
        try:
            news = self.source.readable()
        except SourceProblem as problem:
            self._unwait()
            lost = problem  # `problem` is unbound once the except block ends
            self._job(self.watch.round_trips, lambda: self._lost_job(lost))
            return
        if news:
            self._wake()

    def _wake(self) -> None:
        """News, a poll, a retry or the IDLE re-issue (each then passes): end the wait first."""
        self._unwait()
        self._job(self.watch.round_trips, self._stop_waiting_job)

    def _session_ends(self) -> None:
        self._unwait()
        self._job(self.watch.round_trips, self._session_ends_job)

    def _unwait(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers = []
        if self.sock is not None:
            self.watch.loop.remove_reader(self.sock)
            self.sock = None

    def _timer(self, seconds: float, callback: Callable[[], None]) -> None:
        self.timers.append(self.watch.loop.call_later(seconds, callback))

    def _beat(self) -> None:
        self.watch.beat(self, first=not self.beaten)
        self.beaten = True

    def _after_connect(self) -> None:
        self.watch.first_round(self)
        self.events.connected(self.account.name, self.folder)
        self._pass()

    def _pass(self) -> None:
        self._job(self.watch.passes, self._pass_job)

    def _start_waiting(self) -> None:
        self._job(self.watch.round_trips, self._start_waiting_job)

    def _retry_in(self, seconds: float, reason: str) -> None:
        """Loop thread: connect again after `seconds` (the connection and its slot are gone)."""
        self._give_back()
        self.watch.first_round(self)
        self.events.backoff(self.account.name, self.folder, reason, seconds)
        self._timer(seconds, self._connect)

    def _wait_for_grant(self, line: str) -> None:
        """Loop thread: until `auth` replaced the grant file, or GRANT_RECHECK passed."""
        self._give_back()
        self.watch.first_round(self)
        self.log(f"{self.where}: paused: {line}")
        self.events.paused(self.account.name, self.folder, line)
        self.events.grant(self.account.name, "refused")
        stamp = grant_stamp(self.account)
        until = time.monotonic() + GRANT_RECHECK

        def look() -> None:
            self.timers = []
            if grant_stamp(self.account) != stamp:
                self.log(f"{self.where}: the OAuth2 grant changed; resuming")
                self._connect()
            elif time.monotonic() >= until:
                self._connect()
            else:
                self._timer(GRANT_LOOK, look)

        self._timer(GRANT_LOOK, look)

    # --- the workers' side -------------------------------------------------------------------

    def _connect_job(self) -> Step:
        self.grant_refused = None  # set again below if this attempt finds the grant refused
        self.refused_for_now = False  # likewise, for a server's temporary refusal
        state = self.watch.worker_state()
        try:
            source = connect(self.account)
        except SourceProblem as problem:
            return self._failed(problem, state)
        except SecretCommandFailed as error:  # its secret store may be locked or restarting
            self._problem(state, f"{error.outcome.detail}; trying again")
            return self._backoff_step("password command failed")
        except ConfigError as error:  # the password file: no retry can fix it
            self._record(state, error.outcome.detail)
            self.watch.give_up(f"{self.where}: {error.outcome.detail}")
            return None
        self.source = source
        self.login_failures = 0
        self.caught_up = False
        self.beaten = False
        self.session_ends = _monotonic_at(source.replace_at())
        if self.account.oauth2 is not None:
            self.events.grant(self.account.name, "ok")
        self.log(f"{self.where}: connected to {self.account.host}")
        return self._after_connect

    def _pass_job(self) -> Step:
        """One pass, then IDLE again; any trouble closes the connection and says when to retry."""
        source = self.source
        assert source is not None
        state = self.watch.worker_state()
        try:
            if time.monotonic() >= self.paused_until:
                self._one_pass(source, state)
            if time.monotonic() >= self.session_ends:
                return self._session_ends_job()
            return self._start_waiting
        except SourceProblem as problem:
            return self._lost_job(problem)
        except CONNECTION_ERRORS as error:
            line = f"connection lost ({describe(error)}); reconnecting"
            return self._lost_job(SourceProblem("network", line))
        except StateProblem as problem:  # locked, full or damaged: try again after the backoff
            self.log(f"{self.where}: {problem.outcome.detail}")
            self._drop_source()
            return self._backoff_step("state problem")

    def _one_pass(self, source: Source, state: FetchState) -> None:
        sync = self.watch.context.folder_sync(
            self.account,
            state,
            self.watch.worker_post(),
            self.log,
            self.log,
            self.watch.stopping.is_set,
            lock_wait=LOCK_WAIT,
        )
        sync.listener = self.watch.events
        sync.heartbeat = self._batch_done
        try:
            result = sync.run(source, self.folder)
        except FolderBusy as busy:
            if not self.busy_said:
                self.log(f"{busy}; trying again every {BUSY_RETRY:g}s")
                self.busy_said = True
            self.paused_until = self.wake_at = time.monotonic() + BUSY_RETRY
            return
        self.busy_said = False
        self.events.round_trip(self.account.name, self.folder)
        if not self.beaten:  # the connection's first heartbeat at once: status knows it is watched
            state.watching(self.account.name, self.folder, os.getpid(), self.fresh_for)
            self.beaten = True
        self._after_pass(result, state)
        if not self.caught_up and not self.watch.stopping.is_set():
            self.caught_up = True
            self.log(f"{self.where}: caught up; waiting for new mail ({source.waiting})")

    def _batch_done(self) -> None:
        """A batch of a long pass: the server answered (a heartbeat, written by the loop)."""
        self.events.round_trip(self.account.name, self.folder)
        self.watch.loop.call_soon_threadsafe(self._beat)

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

    def _start_waiting_job(self) -> Step:
        source = self.source
        assert source is not None
        try:
            sock = source.start_waiting()
        except SourceProblem as problem:
            return self._lost_job(problem)
        self.idling = True
        self.events.round_trip(self.account.name, self.folder)
        return lambda: self._wait(sock)

    def _stop_waiting_job(self) -> Step:
        source = self.source
        assert source is not None
        self.idling = False
        try:
            source.stop_waiting()
        except SourceProblem as problem:
            return self._lost_job(problem)
        self.events.round_trip(self.account.name, self.folder)
        return self._pass

    def _lost_job(self, problem: SourceProblem) -> Step:
        """The connection broke or a command was refused: close it; when to connect again."""
        self._drop_source()
        if self.watch.stopping.is_set():
            return None
        self.events.lost(self.account.name, self.folder, problem.cause)
        step = self._failed(problem, self.watch.worker_state())
        if problem.kind == "network":  # lost, after working: reconnect soon, as after a first try
            self.attempt = 0
            return self._backoff_step("reconnecting")
        return step

    def _session_ends_job(self) -> Step:
        self.log(f"{self.where}: the OAuth2 token of this connection runs out; reconnecting with a new one")
        self.events.lost(self.account.name, self.folder, "token")
        self._drop_source()
        self.attempt = 0
        return lambda: self._retry_in(0.0, "a new OAuth2 session")

    def _close_job(self) -> Step:
        self._drop_source()
        return None  # the stop's or removal's: _step gives the slot back

    def _drop_source(self) -> None:
        """Log out (bounded) if the connection still works, and tell status we let go of it."""
        source, self.source = self.source, None
        if source is None:
            return
        if self.idling:  # DONE first: a LOGOUT inside IDLE is a protocol error (a lost one fails at once)
            self.idling = False
            with contextlib.suppress(SourceProblem):
                source.stop_waiting()
        source.close()
        with contextlib.suppress(StateProblem, RelayError):
            self.watch.worker_state().watching(self.account.name, self.folder, None)

    def _failed(self, problem: SourceProblem, state: FetchState) -> Step:
        if self.watch.stopping.is_set():  # cut off by the stop itself: nothing to report or record
            return None
        if problem.kind == "grant":  # a person must run `auth`: wait for that, say it once
            self.grant_refused = problem.line
            self._record(state, problem.line)
            return lambda: self._wait_for_grant(problem.line)
        self.refused_for_now = problem.kind == "unavailable"
        if problem.kind in NEEDS_A_PERSON:
            self.login_failures += 1
            if self.login_failures >= LOGIN_TRIES:
                line = f"{problem.line} (rejected {LOGIN_TRIES} times; stopping)"
                self._record(state, line)
                self.watch.give_up(f"{self.where}: {line}")
                return None
        self._problem(state, f"{problem.line}; trying again")
        return self._backoff_step(problem.line)

    def _backoff_step(self, reason: str) -> Step:
        self.attempt += 1
        backoff = REFUSED_FOR_NOW if self.refused_for_now else RECONNECT
        seconds = backoff.delay(self.attempt)
        return lambda: self._retry_in(seconds, reason)

    def _problem(self, state: FetchState, line: str) -> None:
        self.log(f"{self.where}: {line}")
        self._record(state, line)

    def _record(self, state: FetchState, line: str) -> None:
        """The folder's last error, for `status` (and readiness): never lost to a broken state."""
        with contextlib.suppress(StateProblem):
            state.error(self.account.name, self.folder, line)


def _monotonic_at(epoch: Optional[float]) -> float:
    return float("inf") if epoch is None else time.monotonic() + (epoch - time.time())


def shard_of(name: str, shards: int) -> int:
    """The shard (0 to shards - 1) an account belongs to: a stable hash of its name (SHA-256, the
    same on every host and Python, unlike hash())."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % shards


def same_account(old: Account, new: Account) -> bool:
    """Nothing that needs a reconnect changed (a change of folders alone keeps the others)."""
    keys = [key for key in old._values if key != "folders"]
    return (
        all(old._values[key] == new._values.get(key) for key in keys)
        and old.password_source == new.password_source
        and repr(old.oauth2) == repr(new.oauth2)
    )


def run_watch(
    context: FetchContext,
    log: Log,
    reread: Optional[Callable[[], FetchContext]] = None,
    listen: Optional[Address] = None,
) -> Exit:
    """Watch until stopped, with what an operator reads plugged into its loop (fetch/operate.py:
    health, and with `listen` /healthz, /readyz and /metrics; systemd notify with NOTIFY_SOCKET).
    An address that cannot be listened on is a ListenError (a setting to fix: exit 78)."""
    from mailbox_relay.fetch import operate

    watch = Watch(context, log, reread)
    operations = operate.attach(watch, listen, os.environ)
    try:
        return watch.run()
    finally:
        operations.close()
