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
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from mailbox_relay.filters import Filters
from mailbox_relay.journal import Journal, default_path
from mailbox_relay.log import Log, nowhere
from mailbox_relay.maildir import MaildirWriter
from mailbox_relay.message import Prepared, body_start, header_lines, prepare
from mailbox_relay.outcome import InvalidMessage, Outcome, Reason
from mailbox_relay.progress import NoProgress, Progress, Summary
from mailbox_relay.settings import ImportSettings, MessageSettings, open_layers, settings_from
from mailbox_relay.signals import stop_signals
from mailbox_relay.sources import Source, detect
from mailbox_relay.workers import deliver_batch, start_workers

BATCH_SECONDS = 0.05  # a worker's task is about this much posting,
BATCH_MESSAGES = 16  # and never more than this many messages or BATCH_BYTES
BATCH_BYTES = 1024 * 1024
MAX_LISTED_FAILURES = 1000  # the summary names this many; the counts cover them all


@dataclass
class Item:
    source: str
    key: str
    prepared: Prepared
    sha256: str


class Importer:
    """Reads the sources, admits each message, and hands batches to `pool` (worker processes
    that post them); with no pool it is a dry run, which counts what would be sent."""

    def __init__(
        self,
        settings: ImportSettings,
        message: MessageSettings,
        *,
        pool: Optional[Executor],
        filters: Optional[Filters] = None,
        journal: Optional[Journal] = None,
        failed_dir: Optional[str] = None,
        progress: Optional[Progress] = None,
        log: Log = nowhere,
    ) -> None:
        self.settings = settings
        self.message = message
        self.pool = pool
        self.filters = filters or Filters()
        self.journal = journal
        self.failed = MaildirWriter(failed_dir) if failed_dir else None
        self.progress = progress or NoProgress()
        self.log = log
        self.summary = Summary(dry_run=pool is None)
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
        pool = self.pool
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
            or len(self._pending) < self.settings.jobs
            or self.settings.rate is not None
        )

    def _submit(self, pool: Executor) -> None:
        while len(self._pending) >= 2 * self.settings.jobs and not self._signals:
            self._collect(everything=False)
        payloads = [item.prepared.to_bytes() for item in self._batch]
        self._pending[pool.submit(deliver_batch, payloads)] = self._batch
        self._batch, self._batch_bytes = [], 0

    def _admit(self, source: str, key: str, raw: bytes) -> Optional[Item]:
        """Validate, filter and check the journal; None if this message is not to be sent."""
        try:
            prepared = prepare(
                raw, recipients=self.message.envelope_recipient, max_size=self.message.max_size
            )
        except InvalidMessage as error:
            self.summary.invalid += 1
            self._failure(source, key, raw[body_start(raw) :], error.outcome)
            return None
        if self.filters.active and not self.filters.keep(header_lines(prepared.header)):
            self.summary.filtered += 1
            return None
        if self.pool is None:  # a dry run: no journal to ask
            return Item(source, key, prepared, "")
        digest = hashlib.sha256(prepared.prefix)
        digest.update(prepared.parts()[1])
        item = Item(source, key, prepared, digest.hexdigest())
        if self.journal is not None and self.journal.delivered(source, key, item.sha256):
            self.summary.already += 1
            return None
        return item

    def _throttle(self) -> None:
        if self.settings.rate is None:
            return
        in_flight = self._in_flight() + len(self._batch)
        submitted = self.summary.delivered + self.summary.failed + in_flight
        due = self.summary.started + submitted / self.settings.rate
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
    log: Log,
    quiet: bool = False,
    verbose: bool = False,
) -> Summary:
    """Resolve settings, open the inputs and the journal, and run the import.

    Raises ConfigError for bad settings and NotASource for an input it cannot read.
    """
    layers = open_layers(options, environ)
    settings = ImportSettings.resolve(layers)
    message = MessageSettings.resolve(layers)
    delivery = None if dry_run else settings_from(layers)
    if verbose:
        for line in [*settings.describe(), *(delivery or message).describe()]:
            log(line)
    mboxrd = settings.mbox_format == "mboxrd"
    sources = [detect(os.path.realpath(path), mboxrd=mboxrd) for path in paths]
    for source in sources:
        log(f"{source.path}: reading as {source.kind}")
    journal = None
    if use_state and delivery is not None:
        journal = Journal(settings.state or default_path(environ))
        for source in sources:
            if restart:
                log(f"{source.path}: forgot {journal.forget(source.path)} earlier deliveries (--restart)")
    try:
        pool = None if delivery is None else start_workers(delivery, settings.jobs, quiet)
        importer = Importer(
            settings,
            message,
            pool=pool,
            filters=filters,
            journal=journal,
            failed_dir=failed_dir,
            progress=progress,
            log=log,
        )
        return importer.run(sources)
    finally:
        if journal is not None:
            journal.close()
