"""Is every watched folder alive? What watch's events say, judged for /readyz, STATUS= and metrics.

The silent-death detector: a folder counts as ready only while something proves it alive - a
server round-trip (an IDLE re-issue or its answer, a NOOP, a pass) within `2 x idle_refresh +
timeout` of its account, a known wait with its reason (a backoff not yet over, a pause that
waits for a person), or a reconnect that started within that bound. A connection that went
silent (no FIN, no RST: a blackhole) sends no more round-trips, so its folder goes stale before
the IDLE re-issue's own timeout replaces the connection.

A folder never seen alive since the watch started is not ready ("not connected yet"), so
/readyz turns 200 once the first round has connected (or knowingly failed) every folder.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Tuple

from mailbox_relay.fetch.events import WatchEvents

if TYPE_CHECKING:
    from mailbox_relay.accounts import Account

Clock = Callable[[], float]
Folder = Tuple[str, str]  # (account, folder)
Stale = Dict[str, str]  # {"account", "folder", "why"}

# The states a folder is in, by the last event that concerned it.
NEW = "new"  # added, nothing tried yet
CONNECTING = "connecting"
IDLE = "idle"  # connected: in IDLE, polling, or passing over new mail
RECONNECTING = "reconnecting"  # lost, or waiting out a backoff
PAUSED = "paused"  # waiting for a person (a refused OAuth2 grant) or the ingress


def fresh_for(account: Account) -> float:
    """How long a folder of this account counts as alive after a round-trip (watch.py's rule):
    two refresh cycles (IDLE re-issue, or one poll if polling is slower) and one timeout."""
    cycle = account.idle_refresh if account.poll_interval <= account.idle_refresh else account.poll_interval
    return 2 * cycle + account.timeout


@dataclass
class FolderHealth:
    state: str = NEW
    alive_at: Optional[float] = None  # monotonic: the last round-trip
    connecting_at: Optional[float] = None  # monotonic: the current (re)connect began
    wait_until: Optional[float] = None  # monotonic: the known backoff ends
    reason: Optional[str] = None  # the backoff's or pause's one-line reason
    delivered_at: Optional[float] = None  # wall clock: the last delivery


class Health(WatchEvents):
    """Per-folder state from watch's events; thread-safe (one lock, no I/O)."""

    def __init__(self, fresh: Callable[[str], float], clock: Clock = time.monotonic) -> None:
        self.fresh = fresh  # account name -> seconds a round-trip keeps its folders fresh
        self.clock = clock
        self._lock = threading.Lock()
        self._folders: Dict[Folder, FolderHealth] = {}
        self._grants: Dict[str, str] = {}
        self.started = False  # the first round is done (systemd READY=1)

    # --- events -------------------------------------------------------------------------------

    def folder_added(self, account: str, folder: str) -> None:
        with self._lock:
            self._folders.setdefault((account, folder), FolderHealth())

    def folder_removed(self, account: str, folder: str) -> None:
        with self._lock:
            self._folders.pop((account, folder), None)

    def connecting(self, account: str, folder: str) -> None:
        with self._change(account, folder) as health:
            health.state = CONNECTING if health.alive_at is None else RECONNECTING
            health.connecting_at = self.clock()
            health.wait_until = None

    def connected(self, account: str, folder: str) -> None:
        self.round_trip(account, folder)

    def round_trip(self, account: str, folder: str) -> None:
        with self._change(account, folder) as health:
            health.state = IDLE
            health.alive_at = self.clock()
            health.connecting_at = health.wait_until = None
            health.reason = None

    def lost(self, account: str, folder: str, cause: str) -> None:
        with self._change(account, folder) as health:
            health.state = RECONNECTING
            health.reason = f"connection lost ({cause})"

    def backoff(self, account: str, folder: str, reason: str, seconds: float) -> None:
        with self._change(account, folder) as health:
            health.state = RECONNECTING
            health.reason = reason
            health.wait_until = self.clock() + seconds
            health.connecting_at = None

    def paused(self, account: str, folder: str, reason: str) -> None:
        with self._change(account, folder) as health:
            health.state = PAUSED
            health.reason = reason
            health.wait_until = health.connecting_at = None

    def delivered(self, account: str, folder: str, seconds: float) -> None:
        with self._change(account, folder) as health:
            health.delivered_at = time.time()

    def grant(self, account: str, state: str) -> None:
        with self._lock:
            self._grants[account] = state

    def first_round_done(self) -> None:
        self.started = True

    # --- judgments ----------------------------------------------------------------------------

    def ready(self, now: Optional[float] = None) -> Tuple[bool, List[Stale]]:
        """(every folder ready, the ones that are not, each with why)."""
        now = self.clock() if now is None else now
        stale = [
            {"account": account, "folder": folder, "why": why}
            for (account, folder), health in self._snapshot()
            for why in [self._why_not(account, health, now)]
            if why is not None
        ]
        return not stale, stale

    def folders_ready(self, now: Optional[float] = None) -> List[Tuple[str, str, bool]]:
        """Each folder and whether it is ready (the metrics' gauge)."""
        now = self.clock() if now is None else now
        return [
            (account, folder, self._why_not(account, health, now) is None)
            for (account, folder), health in self._snapshot()
        ]

    def status_line(self, now: Optional[float] = None) -> str:
        """ "1000 folders: 997 idle, 2 reconnecting, 1 paused (grant)" - systemd's STATUS=."""
        now = self.clock() if now is None else now
        counts: Dict[str, int] = {}
        paused_why: List[str] = []
        folders = self._snapshot()
        for (account, _folder), health in folders:
            state = health.state
            if self._why_not(account, health, now) is not None and state in (IDLE, RECONNECTING):
                state = "stale"
            counts[state] = counts.get(state, 0) + 1
            if state == PAUSED:
                label = "grant" if self._grants.get(account) == "refused" else "ingress"
                if label not in paused_why:
                    paused_why.append(label)
        order = (IDLE, CONNECTING, RECONNECTING, "stale", PAUSED, NEW)
        parts = [f"{counts[state]} {state}" for state in order if counts.get(state)]
        if paused_why and parts:
            index = [state for state in order if counts.get(state)].index(PAUSED)
            parts[index] += f" ({', '.join(paused_why)})"
        noun = "folder" if len(folders) == 1 else "folders"
        return f"{len(folders)} {noun}: {', '.join(parts) or 'none'}"

    def last_delivery(self, account: str, folder: str) -> Optional[float]:
        with self._lock:
            health = self._folders.get((account, folder))
            return None if health is None else health.delivered_at

    def _why_not(self, account: str, health: FolderHealth, now: float) -> Optional[str]:
        """None when the folder is ready, else the one line that says why it is not."""
        bound = self.fresh(account)
        if health.state == PAUSED:
            return None  # a known wait, for a person or the ingress: its reason is in the logs
        if health.wait_until is not None:
            if now < health.wait_until:
                return None
            late = now - health.wait_until
            if late <= bound:
                return None
            return f"its backoff ({health.reason}) ended {late:.0f}s ago, and no reconnect started"
        if health.alive_at is None:
            if health.state == CONNECTING and health.connecting_at is not None:
                return f"not connected yet (connecting for {now - health.connecting_at:.0f}s)"
            return "not connected yet"
        signs = [health.alive_at] + ([health.connecting_at] if health.connecting_at is not None else [])
        silent = now - max(signs)
        if silent <= bound:
            return None
        what = "no server round-trip" if health.state == IDLE else f"reconnecting ({health.reason})"
        return f"{what} for {silent:.0f}s (more than 2 x idle_refresh + timeout = {bound:g}s)"

    def _snapshot(self) -> List[Tuple[Folder, FolderHealth]]:
        with self._lock:
            return [(key, FolderHealth(**vars(health))) for key, health in sorted(self._folders.items())]

    @contextlib.contextmanager
    def _change(self, account: str, folder: str) -> Iterator[FolderHealth]:
        """The folder's state, under the lock (created if an event comes before folder_added)."""
        with self._lock:
            yield self._folders.setdefault((account, folder), FolderHealth())
