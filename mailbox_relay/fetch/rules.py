"""One pass over one folder of any source: find what is new or due again, deliver it,
acknowledge it.

The rules that keep mail safe live here, apart from the sources (sources/: IMAP, and any other
behind sources/mailbox.py) and HTTP (ingress/client.py):
- new mail goes before retries;
- the cursor never passes a message that was not delivered, recorded or acknowledged;
- a message is changed on the server (`after`) only once the ingress answered 2xx, and the
  state records it only after that, so a crash in between re-posts the same bytes (Rails
  stores them once) rather than losing anything;
- an invalid message is recorded, copied to failed_dir, and left on the server;
- a message that fails on its own is tried again later, with growing delays, and quarantined
  after `max_tries` once other messages got through: it never blocks the queue;
- an answer every message would get (401, 404, TLS, connection refused) pauses the folder
  without counting a try against any message.
"""

from __future__ import annotations

import datetime
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Set

from mailbox_relay.accounts import Account, After
from mailbox_relay.fetch.events import WatchEvents
from mailbox_relay.log import Log, about, nowhere
from mailbox_relay.maildir import MaildirWriter
from mailbox_relay.message import Prepared, prepare
from mailbox_relay.outcome import InvalidMessage, Kind, Outcome, Reason
from mailbox_relay.sources.mailbox import Key, Listing, Opened
from mailbox_relay.state.folders import FetchState, FolderState, StateProblem

if TYPE_CHECKING:
    from mailbox_relay.sources.mailbox import Source


class Post(Protocol):
    """Posts one message; `log` gets its retry lines (named by account, folder and UID)."""

    def __call__(self, prepared: Prepared, log: Optional[Log] = None) -> Outcome: ...


ENHANCED_CODE = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")  # in a retry line: the answer's code

# Answers that say nothing about the message: the ingress is down or busy for everyone. They
# pause the folder and count no try (systemic answers, 401/404/TLS..., do the same).
INGRESS_WIDE = frozenset({Reason.UNREACHABLE, Reason.BUSY, Reason.INTERRUPTED})
PAUSE_AFTER_FAILURES = 3  # new messages failing in a row, nothing delivered: stop this pass
SIZE_BATCH = 500  # keys per size request (IMAP: one RFC822.SIZE fetch)
BODY_BATCH = 100  # messages per body request (IMAP: one BODY.PEEK[] fetch),
# and at most this many bytes (a larger message goes alone): one request must finish within the
# account's `timeout`, so a batch is no larger than one piece of a large IMAP message (PIECE).
BODY_BATCH_BYTES = 4 * 1024 * 1024


@dataclass
class FolderResult:
    account: str
    folder: str
    found: int = 0
    delivered: int = 0
    invalid: int = 0
    failed: int = 0
    quarantined: int = 0
    gone: int = 0  # expunged by someone else before we got to it
    removed: int = 0  # delivered in an earlier pass, deleted from the server in this one (linger)
    waiting: int = 0  # failed earlier, not yet due for another try
    paused: Optional[str] = None  # the answer that stopped the pass
    left_alone: int = 0  # there before the first sync and not wanted (start = new or a date)
    start: str = "all"  # the account's start, which decided what was left alone
    state_failed: bool = False  # the state file failed mid-pass: stop the run, say why
    failures: List[Dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> Dict[str, Any]:
        return dict(vars(self))


class FolderSync:
    def __init__(
        self,
        account: Account,
        state: FetchState,
        post: Post,
        *,
        max_size: Optional[int] = None,
        recipients: Sequence[str] = (),
        max_tries: int = 5,
        failed: Optional[MaildirWriter] = None,
        log: Log = nowhere,
        events: Log = nowhere,
        stopping: Callable[[], bool] = lambda: False,
        lock_wait: float = 0.0,
    ) -> None:
        self.account = account
        self.state = state
        self.post = post
        self.max_size = max_size
        self.recipients = account.envelope_recipient or tuple(recipients)
        self.max_tries = max_tries
        self.failed = failed
        self.log = log  # problems
        self.events = events  # every delivery too (watch)
        self.stopping = stopping
        self.lock_wait = lock_wait  # for another process's pass over the same folder to end
        self.heartbeat: Callable[[], None] = lambda: None  # after each batch: the server answered
        self.listener = WatchEvents()  # watch's listeners: deliveries, failures, the backlog

    def run(self, source: Source, name: str) -> FolderResult:
        """One pass, holding the folder's lock (FolderBusy if another process holds it). A state
        file that fails mid-pass ends the pass with its line, keeping the counts so far."""
        result = FolderResult(self.account.name, name, start=self.account.start)
        with self.state.lock(self.account.name, name) as lock:
            lock.acquire(self.lock_wait, self.stopping)
            try:
                self._pass(source, name, result)
            except StateProblem as problem:
                result.paused = problem.outcome.detail
                result.state_failed = True
                where = f"{self.account.name}/{name}"
                self.log(
                    about(
                        f"{where}: {problem.outcome.detail}",
                        "state_failed",
                        account=self.account.name,
                        folder=name,
                        level="error",
                    )
                )
        return result

    def _pass(self, source: Source, name: str, result: FolderResult) -> None:
        account, state = self.account.name, self.state
        opened = source.open(name)
        first_sight = state.folder(account, name) is None
        known = self._known(opened, name)
        since = datetime.date.fromisoformat(known.since) if known.since else None
        due = state.due(account, name, opened.epoch)
        listing = source.listing(known.cursor, since, known.since_through if since else None)
        if listing.present is not None:
            state.prune(account, name, opened.epoch, listing.present)
        self._delete_lingering(source, name, opened.epoch, listing, result)
        recorded = state.recorded(account, name, opened.epoch)
        new = [key for key in listing.keys if key not in recorded]
        if first_sight and self.account.start == "new" and listing.remember:
            # No cursor can say "everything there now is old" (POP3): each key is recorded instead.
            state.left_alone(account, name, opened.epoch, new)
            new = []
        if first_sight and self.account.start != "all":
            result.left_alone = max(0, opened.exists - len(new))
            if result.left_alone:
                line = f"{account}/{name}: {left_alone_line(result.left_alone, self.account.start)}"
                self.events(about(line, "left_alone", account=account, folder=name))
        # New mail first: messages that failed before must never hold it up.
        todo = new + due
        result.found = len(todo)
        self.listener.backlog(account, name, len(todo))
        run = _Pass(self, source, opened.epoch, result, listing, set(due))
        run.deliver(todo)
        self.listener.backlog(account, name, run.backlog)
        stopped_early = result.paused is not None or self.stopping()
        if not stopped_early and listing.final is not None:
            state.advance(account, name, listing.final)  # the whole listing is handled
        state.synced(account, name, complete=not stopped_early)
        result.waiting = state.waiting(account, name)

    def _delete_lingering(
        self, source: Source, name: str, epoch: str, listing: Listing, result: FolderResult
    ) -> None:
        """Delivered messages still on the server past `listing.linger` are deleted now, and
        nothing is posted again: a POP3 DELE lost with its connection, or delete_after's age."""
        if listing.linger is None or listing.present is None or not listing.remember:
            return
        cutoff = time.time() - listing.linger
        stale = self.state.delivered_before(self.account.name, name, epoch, cutoff) & listing.present
        if not stale:
            return
        keys = [key for key in listing.keys if key in stale]
        source.acknowledge(keys, After("delete"))
        result.removed = len(keys)
        why = "delivered earlier" if listing.linger == 0 else "delivered longer ago than delete_after"
        self.events(f"{self.account.name}/{name}: deleting {len(keys)} messages {why}")

    def _known(self, opened: Opened, name: str) -> FolderState:
        """The folder's state; set up on first sight (per `start`) or in a new epoch."""
        account = self.account
        known = self.state.folder(account.name, name)
        if known is not None and known.epoch == opened.epoch:
            return known
        through = None
        if known is None:
            cursor = opened.newest if account.start == "new" else None
            since = account.start_date.isoformat() if account.start_date else None
            # The date sorts only what is there now: anything arriving later is new mail,
            # whatever date it carries (a back-dated message must not be hidden by it).
            through = opened.newest if since else None
        else:
            # Every key is new to us, whatever its date: a message back-dated (or copied in with
            # its old date) belongs to the new epoch too, so no date may hide it. What was
            # delivered before is posted again with the same bytes, and Rails stores it once.
            cursor, since = None, None
            line = (
                f"{account.name}/{name}: UIDVALIDITY changed ({known.epoch} -> {opened.epoch}); "
                f"delivering every message in it ({opened.exists}) again, whatever its date "
                "(Rails keeps one copy of identical messages)"
            )
            self.log(about(line, "epoch_changed", account=account.name, folder=name, level="warning"))
        self.state.begin(account.name, name, opened.epoch, cursor, since, through)
        found = self.state.folder(account.name, name)
        assert found is not None
        return found


class _Pass:
    """The deliveries of one pass over one folder."""

    def __init__(
        self,
        sync: FolderSync,
        source: Source,
        epoch: str,
        result: FolderResult,
        listing: Listing,
        retrying: Set[Key],
    ) -> None:
        self.sync = sync
        self.retrying = retrying  # failed before: their failures say nothing new about the ingress
        self.source = source
        self.epoch = epoch
        self.listing = listing
        self.label = getattr(source, "key_label", "message")  # "UID" for IMAP, in log lines
        self.result = result
        self.where = f"{sync.account.name}/{result.folder}"
        self.failures_in_a_row = 0
        self.accepted: List[Key] = []  # delivered, not yet acknowledged nor recorded

    @property
    def backlog(self) -> int:
        """Found in this pass, not yet handled."""
        result = self.result
        handled = result.delivered + result.invalid + result.failed + result.quarantined + result.gone
        return max(0, result.found - handled)

    @property
    def done(self) -> bool:
        return self.result.paused is not None or self.sync.stopping()

    def deliver(self, keys: Sequence[Key]) -> None:
        for chunk in _chunks(keys, SIZE_BATCH):
            sizes = self.source.sizes(chunk)
            for batch in self._body_batches(chunk, sizes):
                if self.done:
                    return
                bodies = self.source.fetch(batch, sizes)
                for key in batch:
                    if self.done:
                        break
                    self._one(key, bodies.pop(key, None))
                self._acknowledge()
                self.sync.heartbeat()
                self.sync.listener.backlog(self.sync.account.name, self.result.folder, self.backlog)

    def _cursor(self, keys: Sequence[Key]) -> Optional[str]:
        """The cursor once `keys` (the last handled, in order) are recorded: the furthest of their
        checkpoints. A retried message has none: it lies behind the cursor already."""
        for key in reversed(keys):
            if key not in self.retrying and key in self.listing.checkpoints:
                return self.listing.checkpoints[key]
        return None

    def _acknowledge(self) -> None:
        """`after` for the messages the ingress accepted since the last call, in one command, then
        the state, in one transaction. Called after each fetched batch, and before anything else
        is recorded, so the state's cursor never passes a message that is not acknowledged.

        On the server first: if that fails, the state still says "not delivered" and the next
        pass posts the same bytes again, which Rails stores once, then acknowledges them."""
        if not self.accepted:
            return
        accepted, self.accepted = self.accepted, []
        sync = self.sync
        self.source.acknowledge(accepted, sync.account.after)
        sync.state.delivered(
            sync.account.name,
            self.result.folder,
            self.epoch,
            accepted,
            cursor=self._cursor(accepted),
            remember=self.listing.remember,
        )

    def _body_batches(self, keys: Sequence[Key], sizes: Dict[Key, int]) -> Iterator[List[Key]]:
        """Keys to fetch together, in order. A key that needs no fetch (gone, over max_size) is
        recorded in its turn: only after every key before it was handled, and never after the
        pass stopped, so the cursor cannot pass a message that was not."""
        batch: List[Key] = []
        batch_bytes = 0
        for key in keys:
            size = sizes.get(key)
            too_big = size is not None and self.sync.max_size is not None and size > self.sync.max_size
            if size is None or too_big:
                if batch:
                    yield batch
                    batch, batch_bytes = [], 0
                if self.done:
                    return
                if size is None:
                    self._gone(key)
                else:
                    detail = f"message is {size} bytes, over max_size {self.sync.max_size}"
                    self._invalid(key, Outcome(Reason.TOO_BIG, detail), b"")
            else:
                if batch and (len(batch) >= BODY_BATCH or batch_bytes + size > BODY_BATCH_BYTES):
                    yield batch
                    batch, batch_bytes = [], 0
                batch.append(key)
                batch_bytes += size
        if batch:
            yield batch

    def _one(self, key: Key, raw: Optional[bytes]) -> None:
        if raw is None:
            self._gone(key)
            return
        try:
            prepared = prepare(raw, recipients=self.sync.recipients, max_size=self.sync.max_size)
        except InvalidMessage as error:
            self._invalid(key, error.outcome, raw)
            return
        started = time.monotonic()
        outcome = self.sync.post(prepared, self._retry_log(key))
        if outcome.delivered:
            self._delivered(key, prepared.size, time.monotonic() - started)
        elif outcome.kind is Kind.PERMANENT:
            self._invalid(key, outcome, raw)
        elif outcome.reason.systemic or outcome.reason in INGRESS_WIDE:
            self._pause(outcome)
        else:
            self._failed(key, outcome, raw)

    def _retry_log(self, key: Key) -> Log:
        """The retry loop's lines ("attempt 2: 4.4.1 ...; retrying in 2.0s"), named by account,
        folder and key: one line must say which message of which folder is being retried."""

        def log(line: str) -> None:
            code = ENHANCED_CODE.search(line)
            text = f"{self.where}: {self.label} {key}: {line}"
            self.sync.log(self._about(text, "retry", key, code.group(1) if code else None, "warning"))

        return log

    def _about(self, text: str, event: str, key: Key, code: Optional[str] = None, level: str = "info") -> str:
        account, folder = self.sync.account.name, self.result.folder
        return about(text, event, account=account, folder=folder, uid=key, code=code, level=level)

    def _delivered(self, key: Key, size: int, seconds: float) -> None:
        self.accepted.append(key)
        self.result.delivered += 1
        self.failures_in_a_row = 0
        self.sync.listener.delivered(self.sync.account.name, self.result.folder, seconds)
        line = f"{self.where}: {self.label} {key} delivered ({size} bytes in {seconds:.2f}s)"
        self.sync.events(self._about(line, "delivered", key))

    def _gone(self, key: Key) -> None:
        self._acknowledge()
        sync = self.sync
        sync.state.gone(sync.account.name, self.result.folder, self.epoch, key, self._cursor([key]))
        self.result.gone += 1

    def _invalid(self, key: Key, outcome: Outcome, raw: bytes) -> None:
        self._acknowledge()
        sync = self.sync
        sync.state.invalid(
            sync.account.name, self.result.folder, self.epoch, key, outcome.line(), self._cursor([key])
        )
        self.result.invalid += 1
        self.sync.listener.invalid(sync.account.name, self.result.folder)
        self._note(key, outcome, raw, "invalid, left on the server", "invalid")

    def _failed(self, key: Key, outcome: Outcome, raw: bytes) -> None:
        self._acknowledge()
        sync = self.sync
        status = sync.state.failed(
            sync.account.name,
            self.result.folder,
            self.epoch,
            key,
            outcome.line(),
            sync.max_tries,
            self._cursor([key]),
        )
        sync.listener.failed(sync.account.name, self.result.folder, outcome.reason.code)
        if status == "quarantined":
            self.result.quarantined += 1
            sync.listener.quarantined(sync.account.name, self.result.folder)
            what = f"quarantined after {sync.max_tries} tries, left on the server"
            self._note(key, outcome, raw, what, "quarantined")
            return
        self.result.failed += 1
        self._note(key, outcome, b"", "will be tried again", "failed")
        if key not in self.retrying:
            self.failures_in_a_row += 1
        if self.failures_in_a_row >= PAUSE_AFTER_FAILURES:
            self._pause(outcome)

    def _pause(self, outcome: Outcome) -> None:
        self._acknowledge()
        self.result.paused = outcome.line()
        if outcome.reason is Reason.INTERRUPTED:  # the work is stopping: no error of the folder's
            return
        self.sync.listener.failed(self.sync.account.name, self.result.folder, outcome.reason.code)
        self.sync.state.error(self.sync.account.name, self.result.folder, outcome.line())
        line = f"{self.where}: paused: {outcome.line()}"
        account, folder, code = self.sync.account.name, self.result.folder, outcome.reason.code
        self.sync.log(about(line, "paused", account=account, folder=folder, code=code, level="warning"))

    def _note(self, key: Key, outcome: Outcome, raw: bytes, what: str, event: str) -> None:
        uid: Any = int(key) if key.isdigit() else key  # the JSON summary's "uid", a number for IMAP
        record: Dict[str, Any] = {"uid": uid, "reason": outcome.line(), "what": what}
        if self.sync.failed is not None and raw:
            record["saved_as"] = self.sync.failed.store(raw)[1]
        self.result.failures.append(record)
        line = f"{self.where}: {self.label} {key} {what}: {outcome.line()}"
        self.sync.log(self._about(line, event, key, outcome.reason.code, "warning"))


def left_alone_line(count: int, start: str) -> str:
    """What the first pass did not deliver, and how to have it delivered (fetch, check)."""
    which = "existing" if start == "new" else f"older than {start}"
    later = "a date" if start == "new" else "an earlier date"
    return (
        f'{count} {which} messages left alone (start = "{start}"); '
        f'set start = "all" or {later} to deliver them'
    )


def _chunks(items: Sequence[Key], size: int) -> Iterator[Sequence[Key]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
