"""`import`: deliver every message of mbox files, Maildirs and .eml trees, resumably.

The reader (this process) splits, validates, filters and consults the journal; worker
processes post with the same session factory and retry loop as `deliver` (see workers.py).
At most `2 x jobs` messages are held at once, so memory stays flat whatever the input size.
Finished deliveries are journaled in one transaction per batch, so a rerun after a crash
re-sends at most what was in flight.

Nothing about one message or one input stops the run: an unreadable file, a damaged archive or
an invalid message is counted, named in the summary, and the run goes on. The run stops early
only on a signal, or when the ingress answers in a way no other message will change (a wrong
password, a wrong URL, TLS): then the journal is kept and a rerun after the fix resumes.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from mailbox_relay.filters import Filters
from mailbox_relay.import_summary import Summary
from mailbox_relay.ingress.target import target_from
from mailbox_relay.log import Log, nowhere
from mailbox_relay.maildir import MaildirWriter, open_failed_dir
from mailbox_relay.message import Prepared, body_start, header_lines, prepare
from mailbox_relay.outcome import InvalidMessage, Outcome, Reason, UsageError
from mailbox_relay.progress import NoProgress, Progress
from mailbox_relay.settings import ImportSettings, LogSettings, MessageSettings, open_layers
from mailbox_relay.signals import stop_signals
from mailbox_relay.sources.files import DamagedInput, NotASource, Source, Unreadable, detect, printable
from mailbox_relay.state.journal import Journal, default_path
from mailbox_relay.state.store import StateProblem
from mailbox_relay.workers import deliver_batch, start_workers

BATCH_SECONDS = 0.05  # a worker's task is about this much posting,
BATCH_MESSAGES = 16  # and never more than this many messages or BATCH_BYTES
BATCH_BYTES = 1024 * 1024
MAX_LISTED_FAILURES = 1000  # the summary names this many; the counts cover them all
STOP_AFTER_SYSTEMIC = 3  # this many answers in a row that every message would get: stop

Results = Tuple[List[Outcome], float]


@dataclass
class Item:
    source: str
    key: str
    prepared: Prepared
    sha256: str
    position: int  # where the input had been read to when this message was: for progress


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
        failed: Optional[MaildirWriter] = None,
        progress: Optional[Progress] = None,
        log: Log = nowhere,
    ) -> None:
        self.settings = settings
        self.message = message
        self.pool = pool
        self.filters = filters or Filters()
        self.journal = journal
        self.failed = failed
        self.progress = progress or NoProgress()
        self.log = log
        self.summary = Summary(dry_run=pool is None, failed_dir=failed.path if failed else None)
        self._pending: Dict[Future[Results], List[Item]] = {}
        self._seconds_per_message = 1.0  # measured as batches come back
        self._batch: List[Item] = []
        self._batch_bytes = 0
        self._total_bytes = 0
        self._read_bytes = 0  # of the inputs finished before the current one
        self._signals = 0
        self._systemic_in_a_row = 0

    # --- reading --------------------------------------------------------------------------

    def run(self, sources: Sequence[Source]) -> Summary:
        self._total_bytes = sum(source.size() for source in sources)
        try:
            with stop_signals(self._signalled):
                for source in sources:
                    self.summary.sources.append({"path": printable(source.path), "kind": source.kind})
                    self._read_input(source)
                    self._read_bytes += source.size()
                    if self._stopping:
                        break
                self._drain()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=not self._pending, cancel_futures=True)
            self.progress.close(self.summary)
        return self.summary

    @property
    def _stopping(self) -> bool:
        return bool(self._signals or self.summary.stopped)

    def _signalled(self) -> None:
        """Ctrl-C, SIGTERM or SIGHUP: stop reading; a second one abandons in-flight posts.

        A flag, not an exception, so a delivery is never half-counted or left unjournaled.
        """
        self._signals += 1
        self.summary.interrupted = True

    def _read_input(self, source: Source) -> None:
        """One input; if it breaks off or cannot be read, say where, and go on with the next."""
        try:
            self._read(source)
        except DamagedInput as damage:
            self._input_problem(source.path, str(damage), damage.offset)
        except OSError as error:  # a directory that vanished or cannot be listed
            self._input_problem(source.path, f"cannot read it ({error.strerror or error})")
        if self.pool is not None and self._batch and not self._stopping:
            self._submit(self.pool)

    def _input_problem(self, path: str, problem: str, offset: Optional[int] = None) -> None:
        self.summary.damaged.append({"path": printable(path), "problem": problem, "offset": offset})
        self.log(f"{printable(path)}: {problem}; the messages before it were read")

    def _read(self, source: Source) -> None:
        for key, raw in source.messages():
            if self._stopping:
                return
            self.summary.messages += 1
            position = self._read_bytes + source.position()
            if isinstance(raw, Unreadable):
                self.summary.unreadable += 1
                self._failure(source.path, key, b"", Outcome(Reason.UNREADABLE, raw.reason))
                continue
            item = self._admit(source.path, key, raw, position)
            if item is not None and self.pool is not None:
                self._throttle()
                self._batch.append(item)
                self._batch_bytes += item.prepared.size
                if self._batch_full():
                    self._submit(self.pool)
            elif item is not None:
                self.summary.delivered += 1  # dry run: counted as deliverable
            self.progress.update(self.summary, self._done_position(position), self._total_bytes)

    def _done_position(self, read_position: int) -> int:
        """How far delivery (not reading) has got: up to the oldest message still in flight."""
        waiting = [item.position for items in self._pending.values() for item in items]
        waiting += [item.position for item in self._batch]
        return min(waiting) if waiting else read_position

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
        while len(self._pending) >= 2 * self.settings.jobs and not self._stopping:
            self._collect(everything=False)
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        try:
            self._pending[pool.submit(deliver_batch, [item.prepared.to_bytes() for item in batch])] = batch
        except (BrokenProcessPool, RuntimeError) as error:  # a worker was killed: stop, say why
            lost = Outcome(Reason.INTERNAL, f"a worker process died ({type(error).__name__}); run again")
            self.summary.stopped = lost.line()
            for item in batch:
                self.summary.failed += 1
                self._failure(item.source, item.key, _message(item.prepared), lost)

    def _admit(self, source: str, key: str, raw: bytes, position: int) -> Optional[Item]:
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
            return Item(source, key, prepared, "", position)
        digest = hashlib.sha256(prepared.prefix)
        digest.update(prepared.parts()[1])
        item = Item(source, key, prepared, digest.hexdigest(), position)
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
        while not self._stopping and time.monotonic() < due:  # a signal is seen within 0.2 s
            time.sleep(min(0.2, due - time.monotonic()))

    # --- collecting (this thread) -------------------------------------------------------------

    def _collect(self, *, everything: bool) -> None:
        """Record finished deliveries: the next one, or (everything) all that are pending."""
        while self._pending and self._signals < 2:
            done, _ = wait(list(self._pending), timeout=0.2, return_when=FIRST_COMPLETED)
            if done:
                self._record(done)
                if not everything:
                    return

    def _record(self, done: Iterable[Future[Results]]) -> None:
        rows = []
        for future in done:
            items = self._pending.pop(future)
            outcomes, seconds = _results(future, len(items))
            self._seconds_per_message = 0.7 * self._seconds_per_message + 0.3 * seconds / len(items)
            for item, outcome in zip(items, outcomes):
                self._watch_for_systemic(outcome)
                if outcome.delivered:
                    self.summary.delivered += 1
                    self.summary.bytes_sent += item.prepared.size
                    rows.append((item.source, item.key, item.sha256))
                else:
                    self.summary.failed += 1
                    self._failure(item.source, item.key, _message(item.prepared), outcome)
        if self.journal is not None and rows:
            self.journal.record(rows)  # one transaction per batch of finished deliveries

    def _watch_for_systemic(self, outcome: Outcome) -> None:
        """Stop after a few answers that every other message would get too (401, 404, TLS...):
        sending thousands of posts into a wrong password is an attack, not an import."""
        if outcome.delivered or not outcome.reason.systemic:
            self._systemic_in_a_row = 0
            return
        self._systemic_in_a_row += 1
        if self._systemic_in_a_row >= STOP_AFTER_SYSTEMIC and not self.summary.stopped:
            self.summary.stopped = outcome.line()
            self.log(f"stopping: every message would fail the same way: {outcome.line()}")

    def _failure(self, source: str, key: str, raw: bytes, outcome: Outcome) -> None:
        reason = outcome.line().split(" [")[0]
        self.summary.reasons[reason] += 1
        record = {"source": printable(source), "key": printable(key), "reason": outcome.line()}
        if self.failed is not None and raw:
            record["saved_as"] = self.failed.store(raw)[1]
            self.summary.saved += 1
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


def _message(prepared: Prepared) -> bytes:
    """The message as read (no added headers): what --failed-dir keeps."""
    return prepared.raw[prepared.start :]


def _results(future: Future[Results], count: int) -> Results:
    try:
        return future.result()
    except Exception as error:  # a worker crash must count as failures, never stop the import
        failed = Outcome(Reason.INTERNAL, f"internal error ({type(error).__name__}: {error})")
        return [failed] * count, 0.0


def open_sources(
    paths: Sequence[str], *, mboxrd: bool, log: Log
) -> Tuple[List[Source], List[Dict[str, Any]]]:
    """Every input under PATHs, and the PATHs that are none (missing, unreadable, unknown)."""
    sources: List[Source] = []
    problems: List[Dict[str, Any]] = []
    for path in paths:
        try:
            found = detect(os.path.realpath(path), mboxrd=mboxrd)
        except NotASource as error:
            problems.append({"path": printable(path), "problem": str(error), "offset": None})
            log(str(error))
            continue
        for source in found:
            log(f"{printable(source.path)}: reading as {source.kind}")
        sources += found
    return sources, problems


def open_journal(path: str) -> Journal:
    try:
        return Journal(path)
    except StateProblem as problem:
        raise UsageError(f"{printable(problem.outcome.detail)}, or pass --no-state") from None


def run_import(
    options: Mapping[str, Any],
    paths: Sequence[str],
    environ: Mapping[str, str],
    *,
    dry_run: bool,
    use_state: bool,
    restart: bool,
    filters: Filters,
    progress: Progress,
    log: Log,
    quiet: bool = False,
    verbose: bool = False,
) -> Summary:
    """Resolve settings, open the inputs and the journal, and run the import.

    Raises ConfigError for bad settings (UsageError for a bad option or --state).
    """
    layers = open_layers(options, environ)
    settings = ImportSettings.resolve(layers)
    message = MessageSettings.resolve(layers)
    delivery = None if dry_run else target_from(layers)
    log_format = LogSettings.resolve(layers).log_format
    if verbose:
        for line in [*settings.describe(), *(delivery or message).describe()]:
            log(line)
    failed = open_failed_dir(settings.failed_dir, settings.sources.get("failed_dir", "default"))
    sources, problems = open_sources(paths, mboxrd=settings.mbox_format == "mboxrd", log=log)
    journal = None
    if use_state and delivery is not None:
        journal = open_journal(settings.state or default_path(environ))
        for source in sources:
            if restart:
                forgot = journal.forget(source.path)
                log(f"{printable(source.path)}: forgot {forgot} earlier deliveries (--restart)")
    try:
        importer = Importer(
            settings,
            message,
            pool=None if delivery is None else start_workers(delivery, settings.jobs, quiet, log_format),
            filters=filters,
            journal=journal,
            failed=failed,
            progress=progress,
            log=log,
        )
        importer.summary.damaged += problems
        return importer.run(sources)
    finally:
        if journal is not None:
            journal.close()
