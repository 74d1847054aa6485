"""The worker processes of `import`: each posts one message at a time with its own keep-alive
session, through the same `post_with_retry` as `deliver`.

Processes, not threads: with threads the GIL bound an import to one core (about 1,000 messages
a second here), and requests' own per-post work is most of the cost. The reader stays in the
parent; a message travels to a worker as the exact bytes to send.

Workers are forked from a forkserver that has already imported everything a worker needs
(forkserver_preload.py): each worker then starts in milliseconds instead of paying for a whole
interpreter and requests' imports, which was most of an everyday import's fixed start-up. The
forkserver is itself a fresh interpreter (no fork of a process that has threads), it ignores
the signals the parent handles, and it exits with the parent; workers die with it. Where there
is no forkserver, workers are spawned.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, List, Tuple

from mailbox_relay.ingress.target import Target
from mailbox_relay.log import Log, nowhere
from mailbox_relay.message import Prepared
from mailbox_relay.outcome import Exit, Outcome, Reason
from mailbox_relay.processes import pid_alive


def _context() -> Any:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")  # no fork of a process that has threads
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["mailbox_relay.forkserver_preload"])
    return context


_CONTEXT = _context()


class AdaptiveConcurrency:
    """How many posts may be on the wire at once, across all worker processes: halved when the
    ingress struggles (5xx, 408, 429, timeouts), grown by one per window of successes, up to
    --jobs (AIMD, as TCP does).

    A Rails app on SQLite answers concurrent posts with 500 "database is locked"; backing off
    the concurrency, not only the retries, is what lets every message through.
    """

    STRUGGLING = (Reason.SERVER_ERROR, Reason.BUSY, Reason.TIMEOUT)

    def __init__(self, maximum: int, log: Log = nowhere) -> None:
        self.maximum = maximum
        self.log = log
        self._limit = _CONTEXT.Value("d", float(maximum), lock=False)
        self._active = _CONTEXT.Value("i", 0, lock=False)
        self._condition = _CONTEXT.Condition()

    @property
    def limit(self) -> float:
        return float(self._limit.value)

    @property
    def active(self) -> int:
        return int(self._active.value)

    def before(self) -> float:
        started = time.monotonic()
        with self._condition:
            while self._active.value >= int(self._limit.value):
                self._condition.wait()
            self._active.value += 1
        return time.monotonic() - started

    def after(self, outcome: Outcome) -> None:
        with self._condition:
            self._active.value -= 1
            before = int(self._limit.value)
            if outcome.reason in self.STRUGGLING:
                self._limit.value = max(1.0, self._limit.value / 2)
            elif outcome.delivered:
                self._limit.value = min(float(self.maximum), self._limit.value + 1 / self._limit.value)
            now = int(self._limit.value)
            if now != before:
                why = outcome.line() if now < before else "ingress keeps up"
                self.log(f"{why}: {now} concurrent deliveries")
            self._condition.notify_all()

    def __getstate__(self) -> Any:
        state = dict(self.__dict__)
        state["log"] = None  # a worker logs to its own stderr (see _init)
        return state


class _Worker:
    settings: Target
    pacer: AdaptiveConcurrency
    session: Any = None
    # Has the app answered this worker yet? Until it has, an app that cannot be reached is not
    # waited for (import stops after a few: it is not running, or the URL is wrong); once it
    # has, a refused connection is an app restarting, retried within --retry-for as deliver does.
    reached = False


def _die_with(importer: int) -> None:
    """A worker must never outlive the import (kill -9 of it, a double Ctrl-C): orphans would
    hold its stdout and stderr open for as long as a post can take.

    On Linux the kernel kills the worker when its parent dies. A spawned worker's parent is the
    import itself. A forked one's is the forkserver, which lives as long as any worker holds
    its pipe, so such a worker also watches the import and exits when it is gone (the
    forkserver then exits too). Elsewhere a thread watches."""
    parent = os.getppid()
    if parent == 1 or not pid_alive(importer):  # the import is gone already
        os._exit(Exit.TEMPFAIL)  # nobody reads it: the import it served is gone
    if _killed_with(parent) and parent == importer:
        return
    threading.Thread(target=_watch, args=(importer,), daemon=True).start()


def _killed_with(parent: int) -> bool:
    """PR_SET_PDEATHSIG: SIGKILL when `parent` dies. False where there is no such thing."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # it died before the kernel was told
        os._exit(Exit.TEMPFAIL)
    return True


def _watch(pid: int) -> None:
    """Exit once `pid` has ended: at once with a pidfd (Linux 5.3, Python 3.9), else within 1 s."""
    try:
        import select

        handle = os.pidfd_open(pid)
    except (AttributeError, OSError):
        while pid_alive(pid):
            time.sleep(1)
    else:
        select.select([handle], [], [])  # readable when the process has ended
    os._exit(Exit.TEMPFAIL)


def _init(
    settings: Target, pacer: AdaptiveConcurrency, verbose: bool, importer: int, log_format: str
) -> None:
    _die_with(importer)
    # A signal reaches the whole process group (Ctrl-C, systemd's SIGTERM): the parent alone
    # decides, finishing in-flight posts and printing the summary; workers carry on until told.
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    if verbose:  # in the import's log format: a JSON log must be JSON on every line
        from mailbox_relay.logformat import stderr_logs

        pacer.log = stderr_logs(log_format, os.environ)[0]
    else:
        pacer.log = nowhere
    _Worker.settings = settings
    _Worker.pacer = pacer


def deliver_batch(payloads: List[bytes]) -> Tuple[List[Outcome], float]:
    """In a worker: post each message's exact bytes in turn. The outcomes, and the seconds it
    took (the parent sizes later batches by it), go back to the parent."""
    from mailbox_relay.ingress.client import make_session, post_with_retry

    started = time.monotonic()
    if _Worker.session is None:  # one keep-alive session per worker process
        _Worker.session = make_session(_Worker.settings)
    outcomes: List[Outcome] = []
    for payload in payloads:
        if outcomes and outcomes[-1].reason.systemic:
            # A wrong password or URL: the rest of the batch would get the same answer, so it is
            # not posted (the parent stops the import on such answers).
            outcomes.append(outcomes[-1])
            continue
        prepared = Prepared(payload, 0, b"")
        outcome = post_with_retry(
            _Worker.session, _Worker.settings, prepared, pacer=_Worker.pacer, wait_for_app=_Worker.reached
        )
        _Worker.reached = _Worker.reached or outcome.reason is not Reason.UNREACHABLE
        outcomes.append(outcome)
    return outcomes, time.monotonic() - started


def start_workers(settings: Target, jobs: int, quiet: bool, log_format: str = "plain") -> ProcessPoolExecutor:
    """`jobs` worker processes sharing one AdaptiveConcurrency; they log to stderr unless quiet."""
    return ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=_CONTEXT,
        initializer=_init,
        initargs=(settings, AdaptiveConcurrency(jobs), not quiet, os.getpid(), log_format),
    )
