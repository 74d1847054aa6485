"""`import`: deliver every message of mbox files, Maildirs and .eml trees, resumably.

The reader (this process) splits, validates, filters and consults the journal; worker
processes post with the same session factory and retry loop as `deliver` (see workers.py).
At most `2 x jobs` messages are held at once, so memory stays flat whatever the input size.
Finished deliveries are journaled in one transaction per batch, so a rerun after a crash
re-sends at most what was in flight.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import (
    Any,
    Callable,
    Dict,
    FrozenSet,
    Iterable,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
)

from mailbox_relay.journal import Journal, default_path
from mailbox_relay.maildir import MaildirWriter
from mailbox_relay.message import Prepared, body_start, field_values, header_lines, prepare
from mailbox_relay.outcome import InvalidMessage, Outcome, Reason
from mailbox_relay.settings import Settings, open_layers, settings_from
from mailbox_relay.signals import stop_signals
from mailbox_relay.sources import Source, detect
from mailbox_relay.workers import deliver_batch, start_workers

BATCH_SECONDS = 0.05  # a worker's task is about this much posting,
BATCH_MESSAGES = 16  # and never more than this many messages or BATCH_BYTES
BATCH_BYTES = 1024 * 1024
MAX_LISTED_FAILURES = 1000  # the summary names this many; the counts cover them all


@dataclass(frozen=True)
class Filters:
    """--since/--until on the Date header, --label/--exclude-label on X-Gmail-Labels."""

    since: Optional[datetime] = None
    until: Optional[datetime] = None
    labels: FrozenSet[str] = frozenset()
    exclude_labels: FrozenSet[str] = frozenset()

    @property
    def active(self) -> bool:
        return bool(self.since or self.until or self.labels or self.exclude_labels)

    def keep(self, header: Sequence[bytes]) -> bool:
        if self.labels or self.exclude_labels:
            labels = message_labels(header)
            if self.labels and not labels & self.labels:
                return False
            if labels & self.exclude_labels:
                return False
        if self.since or self.until:
            date = message_date(header)
            if date is None:
                return True  # undated: kept, since we cannot tell
            if (self.since and date < self.since) or (self.until and date >= self.until):
                return False
        return True


def message_labels(header: Sequence[bytes]) -> FrozenSet[str]:
    labels = set()
    for value in field_values(header, b"x-gmail-labels"):
        for label in value.decode("utf-8", "replace").split(","):
            labels.add(label.strip().strip('"').casefold())
    return frozenset(labels)


def message_date(header: Sequence[bytes]) -> Optional[datetime]:
    from email.utils import parsedate_to_datetime

    for value in field_values(header, b"date"):
        try:
            date = parsedate_to_datetime(value.decode("ascii", "replace"))
        except (TypeError, ValueError, IndexError):
            return None
        return date if date.tzinfo else date.replace(tzinfo=timezone.utc)
    return None


@dataclass
class Item:
    source: str
    key: str
    prepared: Prepared
    sha256: str


@dataclass
class Summary:
    dry_run: bool = False
    delivered: int = 0
    already: int = 0
    filtered: int = 0
    invalid: int = 0
    failed: int = 0
    messages: int = 0
    bytes_sent: int = 0
    interrupted: bool = False
    abandoned: int = 0
    started: float = field(default_factory=time.monotonic)
    reasons: Counter[str] = field(default_factory=Counter)
    failures: List[Dict[str, str]] = field(default_factory=list)
    sources: List[Dict[str, str]] = field(default_factory=list)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def undelivered(self) -> int:
        return self.failed + self.abandoned

    def exit_code(self) -> int:
        """0 nothing left to do; 75 something may still work (rerun resumes); 65 only invalid."""
        if self.undelivered or self.interrupted:
            return 75
        return 65 if self.invalid else 0

    def as_json(self) -> Dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "sources": self.sources,
            "messages": self.messages,
            "delivered": self.delivered,
            "already_delivered": self.already,
            "filtered_out": self.filtered,
            "invalid": self.invalid,
            "failed": self.undelivered,
            "interrupted": self.interrupted,
            "bytes_sent": self.bytes_sent,
            "seconds": round(self.elapsed, 3),
            "top_failure_reasons": [
                {"count": count, "reason": reason} for reason, count in self.reasons.most_common(5)
            ],
            "failures": self.failures,
            "exit_code": self.exit_code(),
        }


class Progress(Protocol):
    def update(self, summary: Summary, done_bytes: int, total_bytes: int) -> None: ...

    def close(self, summary: Summary) -> None: ...


class NoProgress:
    def update(self, summary: Summary, done_bytes: int, total_bytes: int) -> None:
        pass

    def close(self, summary: Summary) -> None:
        pass


@dataclass
class Plan:
    """How to import: everything but the connection settings."""

    jobs: int = 4
    rate: Optional[float] = None
    dry_run: bool = False
    filters: Filters = field(default_factory=Filters)
    recipients: Sequence[str] = ()
    max_size: Optional[int] = None
    quiet: bool = False  # workers log concurrency changes unless quiet


class Importer:
    def __init__(
        self,
        settings: Optional[Settings],
        plan: Plan,
        *,
        journal: Optional[Journal] = None,
        failed_dir: Optional[str] = None,
        progress: Optional[Progress] = None,
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.settings = settings
        self.plan = plan
        self.journal = journal
        self.failed = MaildirWriter(failed_dir) if failed_dir else None
        self.progress = progress or NoProgress()
        self.log = log
        self.summary = Summary(dry_run=plan.dry_run)
        self._pending: Dict[Future[Tuple[List[Outcome], float]], List[Item]] = {}
        self._seconds_per_message = 1.0  # measured as batches come back
        self._batch: List[Item] = []
        self._batch_bytes = 0
        self._total_bytes = 0
        self._done_bytes = 0
        self._signals = 0

    # --- reading --------------------------------------------------------------------------

    def run(self, sources: Sequence[Source]) -> Summary:
        self._total_bytes = sum(source.size() for source in sources)
        pool = None if self.plan.dry_run else start_workers(self.settings, self.plan.jobs, self.plan.quiet)
        try:
            with stop_signals(self._signalled):
                for source in sources:
                    self.summary.sources.append({"path": source.path, "kind": source.kind})
                    self._read(source, pool)
                    self._done_bytes += source.size()
                    if self._signals:
                        break
                self._drain()
        finally:
            if pool is not None:
                pool.shutdown(wait=not self._pending, cancel_futures=True)
            self.progress.close(self.summary)
        return self.summary

    def _signalled(self) -> None:
        """Ctrl-C, SIGTERM or SIGHUP: stop reading; a second one abandons in-flight posts.

        A flag, not an exception, so a delivery is never half-counted or left unjournaled.
        """
        self._signals += 1
        self.summary.interrupted = True

    def _read(self, source: Source, pool: Optional[Executor]) -> None:
        for key, raw in source.messages():
            if self._signals:
                return
            self.summary.messages += 1
            item = self._admit(source.path, key, raw)
            if item is not None and pool is not None:
                self._throttle()
                self._batch.append(item)
                self._batch_bytes += item.prepared.size
                if self._batch_full():
                    self._submit(pool)
            elif item is not None:
                self.summary.delivered += 1  # dry run: counted as deliverable
            self.progress.update(self.summary, self._done_bytes + source.position(), self._total_bytes)
        if pool is not None and self._batch and not self._signals:
            self._submit(pool)

    def _batch_full(self) -> bool:
        """Messages travel to the workers in batches of about BATCH_SECONDS of posting: one task
        per message spent more CPU on inter-process plumbing than on posting into a fast ingress,
        while small batches keep what is in flight (and re-sent after a crash) small for a slow
        one. A batch also goes as soon as a worker would otherwise sit idle."""
        size = max(1, min(BATCH_MESSAGES, int(BATCH_SECONDS / self._seconds_per_message)))
        return (
            len(self._batch) >= size
            or self._batch_bytes >= BATCH_BYTES
            or len(self._pending) < self.plan.jobs
            or self.plan.rate is not None
        )

    def _submit(self, pool: Executor) -> None:
        while len(self._pending) >= 2 * self.plan.jobs and not self._signals:
            self._collect(everything=False)
        payloads = [item.prepared.to_bytes() for item in self._batch]
        self._pending[pool.submit(deliver_batch, payloads)] = self._batch
        self._batch, self._batch_bytes = [], 0

    def _admit(self, source: str, key: str, raw: bytes) -> Optional[Item]:
        """Validate, filter and check the journal; None if this message is not to be sent."""
        try:
            prepared = prepare(raw, recipients=self.plan.recipients, max_size=self.plan.max_size)
        except InvalidMessage as error:
            self.summary.invalid += 1
            self._failure(source, key, raw[body_start(raw) :], error.outcome)
            return None
        if self.plan.filters.active and not self.plan.filters.keep(header_lines(prepared.header)):
            self.summary.filtered += 1
            return None
        if self.plan.dry_run:
            return Item(source, key, prepared, "")
        digest = hashlib.sha256(prepared.prefix)
        digest.update(prepared.parts()[1])
        item = Item(source, key, prepared, digest.hexdigest())
        if self.journal is not None and self.journal.delivered(source, key, item.sha256):
            self.summary.already += 1
            return None
        return item

    def _throttle(self) -> None:
        if self.plan.rate is None:
            return
        in_flight = self._in_flight() + len(self._batch)
        submitted = self.summary.delivered + self.summary.failed + in_flight
        due = self.summary.started + submitted / self.plan.rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    # --- collecting (this thread) -------------------------------------------------------------

    def _collect(self, *, everything: bool) -> None:
        """Record finished deliveries: the next one, or (everything) all that are pending."""
        while self._pending and self._signals < 2:
            done, _ = wait(list(self._pending), timeout=0.2, return_when=FIRST_COMPLETED)
            if done:
                self._record(done)
                if not everything:
                    return

    def _record(self, done: Iterable[Future[Tuple[List[Outcome], float]]]) -> None:
        rows = []
        for future in done:
            items = self._pending.pop(future)
            outcomes, seconds = _results(future, len(items))
            self._seconds_per_message = 0.7 * self._seconds_per_message + 0.3 * seconds / len(items)
            for item, outcome in zip(items, outcomes):
                if outcome.delivered:
                    self.summary.delivered += 1
                    self.summary.bytes_sent += item.prepared.size
                    rows.append((item.source, item.key, item.sha256))
                else:
                    self.summary.failed += 1
                    self._failure(item.source, item.key, item.prepared.raw[item.prepared.start :], outcome)
        if self.journal is not None and rows:
            self.journal.record(rows)  # one transaction per batch of finished deliveries

    def _failure(self, source: str, key: str, raw: bytes, outcome: Outcome) -> None:
        reason = outcome.line().split(" [")[0]
        self.summary.reasons[reason] += 1
        record = {"source": source, "key": key, "reason": outcome.line()}
        if self.failed is not None and raw:
            record["saved_as"] = self.failed.store(raw)[1]
        if len(self.summary.failures) < MAX_LISTED_FAILURES:
            self.summary.failures.append(record)

    def _drain(self) -> None:
        """Wait for in-flight posts; after a signal say so, and a second signal abandons them."""
        if self._signals and self._pending:
            self.log(
                f"stopping: finishing {self._in_flight()} in-flight deliveries (Ctrl-C again abandons them)"
            )
        self._collect(everything=True)
        self.summary.abandoned = self._in_flight()

    def _in_flight(self) -> int:
        return sum(len(items) for items in self._pending.values())


def _results(future: Future[Tuple[List[Outcome], float]], count: int) -> Tuple[List[Outcome], float]:
    try:
        return future.result()
    except Exception as error:  # a worker crash must count as failures, never stop the import
        failed = Outcome(Reason.INTERNAL, f"internal error ({type(error).__name__}: {error})")
        return [failed] * count, 0.0


def summary_lines(summary: Summary) -> Iterable[str]:
    """The human summary, printed at the end of a run."""
    verb = "valid (would be delivered)" if summary.dry_run else "delivered"
    rate = summary.messages / summary.elapsed if summary.elapsed else 0.0
    yield (
        f"{summary.messages} message{'' if summary.messages == 1 else 's'} in {summary.elapsed:.1f}s "
        f"({rate:.0f}/s): "
        f"{summary.delivered} {verb}, {summary.already} already delivered, "
        f"{summary.filtered} filtered out, {summary.invalid} invalid, {summary.undelivered} failed"
    )
    for reason, count in summary.reasons.most_common(5):
        yield f"  {count} x {reason}"
    if summary.interrupted:
        yield "interrupted: run the same command again to resume"
    elif summary.undelivered:
        yield "some deliveries failed: fix the cause above and run the same command again to resume"


def run_import(
    options: Mapping[str, Any],
    paths: Sequence[str],
    environ: Mapping[str, str],
    *,
    dry_run: bool,
    use_state: bool,
    restart: bool,
    filters: Filters,
    failed_dir: Optional[str],
    progress: Progress,
    log: Callable[[str], None],
    quiet: bool = False,
    verbose: bool = False,
) -> Summary:
    """Resolve settings, open the inputs and the journal, and run the import.

    Raises ConfigError for bad settings and NotASource for an input it cannot read.
    """
    layers = open_layers(options, environ)
    settings = None if dry_run else settings_from(layers)
    if settings is not None and verbose:
        for line in settings.describe():
            log(line)
    plan = Plan(
        jobs=layers.get("jobs")[0],
        rate=layers.get("rate")[0],
        dry_run=dry_run,
        filters=filters,
        recipients=layers.get("envelope_recipient")[0],
        max_size=layers.get("max_size")[0],
        quiet=quiet,
    )
    mboxrd = layers.get("mbox_format")[0] == "mboxrd"
    sources = [detect(os.path.realpath(path), mboxrd=mboxrd) for path in paths]
    for source in sources:
        log(f"{source.path}: reading as {source.kind}")
    journal = None
    if use_state and not dry_run:
        journal = Journal(layers.get("state")[0] or default_path(environ))
        for source in sources:
            if restart:
                log(f"{source.path}: forgot {journal.forget(source.path)} earlier deliveries (--restart)")
    try:
        importer = Importer(
            settings, plan, journal=journal, failed_dir=failed_dir, progress=progress, log=log
        )
        return importer.run(sources)
    finally:
        if journal is not None:
            journal.close()
