"""watch's Prometheus metrics, from its events (served at /metrics by listen.py).

prometheus_client is imported here only, and only watch imports this module: deliver never
pays for it. The registry is private, so nothing else in the process (nor a test) shares it.

Labels are account and folder (and, where named, a bounded set: an enhanced status code, a
reconnect cause, a grant state), never a message id: the number of series grows with the
configured folders, not with the mail. The ingress request histogram is per account only, as
a per-folder one would multiply its buckets by every folder.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from mailbox_relay.fetch.events import WatchEvents

CONTENT_TYPE = CONTENT_TYPE_LATEST
FOLDER = ("account", "folder")
CAUSES = ("reset", "closed", "timeout", "error", "token", "reload")  # the contract's `lost` causes
GRANT_STATES = ("ok", "refused", "renewing")
ENHANCED_CODE = re.compile(r"\A[245]\.\d{1,3}\.\d{1,3}\Z")  # RFC 3463: a bounded label value
# Ingress requests take from milliseconds (a local app) to `timeout` (30 s by default).
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Readiness = Callable[[], Iterable[Tuple[str, str, bool]]]


class Metrics(WatchEvents):
    """One observer, one private registry. Thread-safe (prometheus_client's metrics are)."""

    def __init__(self, ready: Optional[Readiness] = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connected_ = Gauge(
            "mailbox_relay_folder_connected", "1 while the folder's connection is up.", FOLDER, registry=r
        )
        self.round_trip_ = Gauge(
            "mailbox_relay_last_round_trip_timestamp_seconds",
            "When the folder's server last answered (IDLE re-issue, NOOP, a pass).",
            FOLDER,
            registry=r,
        )
        self.delivery_ = Gauge(
            "mailbox_relay_last_delivery_timestamp_seconds",
            "When a message of the folder was last delivered (2xx from the ingress).",
            FOLDER,
            registry=r,
        )
        self.delivered_ = Counter(
            "mailbox_relay_delivered", "Messages delivered (2xx, then acknowledged).", FOLDER, registry=r
        )
        self.failed_ = Counter(
            "mailbox_relay_failed",
            "Failed tries, by the enhanced status code of the answer (tried again later).",
            (*FOLDER, "code"),
            registry=r,
        )
        self.invalid_ = Counter(
            "mailbox_relay_invalid",
            "Messages that can never be accepted (left on the server).",
            FOLDER,
            registry=r,
        )
        self.quarantined_ = Counter(
            "mailbox_relay_quarantined", "Messages quarantined after max_tries.", FOLDER, registry=r
        )
        self.reconnects_ = Counter(
            "mailbox_relay_reconnects", "Connections lost, by cause.", (*FOLDER, "cause"), registry=r
        )
        self.duration_ = Histogram(
            "mailbox_relay_ingress_request_duration_seconds",
            "How long a delivered message's post took, retries included.",
            ("account",),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.backlog_ = Gauge(
            "mailbox_relay_backlog",
            "Messages seen on the server but not yet acknowledged.",
            FOLDER,
            registry=r,
        )
        self.grant_ = Enum(
            "mailbox_relay_oauth2_grant",
            "The account's OAuth2 grant (auth = xoauth2).",
            ("account",),
            states=list(GRANT_STATES),
            registry=r,
        )
        self._lock = threading.Lock()
        self._codes: Dict[Tuple[str, str], Set[str]] = {}
        if ready is not None:
            self.registry.register(_ReadyCollector(ready))

    def exposition(self) -> bytes:
        """The text format, for GET /metrics."""
        return generate_latest(self.registry)

    # --- events -------------------------------------------------------------------------------

    def folder_added(self, account: str, folder: str) -> None:
        self.connected_.labels(account, folder).set(0)
        self.backlog_.labels(account, folder).set(0)
        for metric in (self.delivered_, self.invalid_, self.quarantined_):
            metric.labels(account, folder)  # present at 0 from the start: rate() needs a first sample

    def folder_removed(self, account: str, folder: str) -> None:
        """A folder no longer watched (a reload) leaves no series behind: the count stays bounded."""
        with self._lock:
            codes = self._codes.pop((account, folder), set())
        for metric in self._per_folder():
            _remove(metric, account, folder)
        for code in codes:
            _remove(self.failed_, account, folder, code)
        for cause in CAUSES:
            _remove(self.reconnects_, account, folder, cause)

    def connected(self, account: str, folder: str) -> None:
        self.connected_.labels(account, folder).set(1)
        self.round_trip(account, folder)

    def round_trip(self, account: str, folder: str) -> None:
        self.round_trip_.labels(account, folder).set(time.time())

    def lost(self, account: str, folder: str, cause: str) -> None:
        self.connected_.labels(account, folder).set(0)
        self.reconnects_.labels(account, folder, cause if cause in CAUSES else "error").inc()

    def paused(self, account: str, folder: str, reason: str) -> None:
        self.connected_.labels(account, folder).set(0)

    def delivered(self, account: str, folder: str, seconds: float) -> None:
        self.delivered_.labels(account, folder).inc()
        self.delivery_.labels(account, folder).set(time.time())
        self.duration_.labels(account).observe(seconds)

    def failed(self, account: str, folder: str, code: str) -> None:
        code = code if ENHANCED_CODE.match(code) else "other"
        with self._lock:
            self._codes.setdefault((account, folder), set()).add(code)
        self.failed_.labels(account, folder, code).inc()

    def invalid(self, account: str, folder: str) -> None:
        self.invalid_.labels(account, folder).inc()

    def quarantined(self, account: str, folder: str) -> None:
        self.quarantined_.labels(account, folder).inc()

    def backlog(self, account: str, folder: str, count: int) -> None:
        self.backlog_.labels(account, folder).set(count)

    def grant(self, account: str, state: str) -> None:
        if state in GRANT_STATES:
            self.grant_.labels(account).state(state)

    def _per_folder(self) -> List[object]:
        return [
            self.connected_,
            self.round_trip_,
            self.delivery_,
            self.delivered_,
            self.invalid_,
            self.quarantined_,
            self.backlog_,
        ]


def _remove(metric: object, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never had that series
        metric.remove(*labels)  # type: ignore[attr-defined]


class _ReadyCollector(Collector):
    """mailbox_relay_folder_ready, asked of Health at each scrape (as /readyz judges)."""

    def __init__(self, ready: Readiness) -> None:
        self.ready = ready

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for account, folder, ready in self.ready():
            family.add_metric([account, folder], 1.0 if ready else 0.0)
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "mailbox_relay_folder_ready",
            "1 while the folder is ready as /readyz judges: a fresh round-trip, or a known wait.",
            labels=list(FOLDER),
        )
