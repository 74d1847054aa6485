"""What `import` reports: the running Summary, progress (rich on a terminal, a plain line every
so often otherwise, or nothing), and the final summary lines.

rich is imported only here, and only when stderr is a terminal: `deliver` never pays for it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Protocol, TextIO

from mailbox_relay.log import prefixed
from mailbox_relay.outcome import Exit


@dataclass
class Summary:
    dry_run: bool = False
    delivered: int = 0
    already: int = 0
    filtered: int = 0
    invalid: int = 0
    unreadable: int = 0  # messages that could not be read (moved, no permission, broken link)
    failed: int = 0
    messages: int = 0
    bytes_sent: int = 0
    interrupted: bool = False
    stopped: Optional[str] = None  # why the run stopped early: the answer every message would get
    abandoned: int = 0
    failed_dir: Optional[str] = None
    saved: int = 0  # messages written to failed_dir
    started: float = field(default_factory=time.monotonic)
    reasons: Counter[str] = field(default_factory=Counter)
    failures: List[Dict[str, str]] = field(default_factory=list)
    sources: List[Dict[str, str]] = field(default_factory=list)
    damaged: List[Dict[str, Any]] = field(default_factory=list)  # inputs cut short or unreadable

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def worked(self) -> int:
        """Messages this run had to do something with: not those the journal or a filter skipped,
        which cost nothing and would make the rate a lie (77/s under --rate 40)."""
        return self.messages - self.already - self.filtered

    @property
    def undelivered(self) -> int:
        return self.failed + self.abandoned

    def exit_code(self) -> Exit:
        """75 something may still work (a rerun resumes); 66 an input or message could not be
        read; 65 some messages are invalid; 0 nothing left to do."""
        if self.undelivered or self.interrupted or self.stopped:
            return Exit.TEMPFAIL
        if self.damaged or self.unreadable:
            return Exit.NOINPUT
        return Exit.DATAERR if self.invalid else Exit.OK

    def as_json(self) -> Dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "sources": self.sources,
            "damaged_inputs": self.damaged,
            "messages": self.messages,
            "delivered": self.delivered,
            "already_delivered": self.already,
            "filtered_out": self.filtered,
            "invalid": self.invalid,
            "unreadable": self.unreadable,
            "failed": self.undelivered,
            "interrupted": self.interrupted,
            "stopped": self.stopped,
            "bytes_sent": self.bytes_sent,
            "seconds": round(self.elapsed, 3),
            "top_failure_reasons": [
                {"count": count, "reason": reason} for reason, count in self.reasons.most_common(5)
            ],
            "failed_dir": self.failed_dir,
            "failures": self.failures,
            "exit_code": int(self.exit_code()),
        }


class Progress(Protocol):
    def update(self, summary: Summary, done_bytes: int, total_bytes: int) -> None: ...

    def close(self, summary: Summary) -> None: ...


class NoProgress:
    def update(self, summary: Summary, done_bytes: int, total_bytes: int) -> None:
        pass

    def close(self, summary: Summary) -> None:
        pass


RATE_AFTER = 2.0  # seconds: over a shorter run a rate says more about start-up than speed
LISTED_SAVED = 20  # --failed-dir files named in the text summary (--json names them all)


def summary_lines(summary: Summary) -> Iterable[str]:
    """The human summary, printed at the end of a run."""
    verb = "valid (would be delivered)" if summary.dry_run else "delivered"
    rate = f" ({summary.worked / summary.elapsed:.0f}/s)" if summary.elapsed >= RATE_AFTER else ""
    unreadable = f"{summary.unreadable} unreadable, " if summary.unreadable else ""
    messages = f"{summary.messages} message{'' if summary.messages == 1 else 's'}"
    yield (
        f"{messages} in {summary.elapsed:.1f}s{rate}: {summary.delivered} {verb}, "
        f"{summary.already} already delivered, {summary.filtered} filtered out, "
        f"{summary.invalid} invalid, {unreadable}{summary.undelivered} failed"
    )
    for reason, count in summary.reasons.most_common(5):
        yield f"  {count} x {reason}"
    for damage in summary.damaged:
        yield f"  input {damage['path']}: {damage['problem']}"
    yield from _saved_lines(summary)
    yield from _verdict(summary)


def _saved_lines(summary: Summary) -> Iterable[str]:
    if not summary.saved:
        return
    plural = "" if summary.saved == 1 else "s"
    yield f"{summary.saved} undelivered message{plural} written to {summary.failed_dir}/new:"
    saved = [failure for failure in summary.failures if "saved_as" in failure]
    for failure in saved[:LISTED_SAVED]:
        yield f"  {failure['saved_as']}  ({failure['source']} {failure['key']})"
    if summary.saved > LISTED_SAVED:
        yield f"  ... and {summary.saved - LISTED_SAVED} more (--json lists them)"


def _verdict(summary: Summary) -> Iterable[str]:
    if summary.stopped:
        yield f"stopped early, as every message would fail the same way: {summary.stopped}"
        yield "fix that and run the same command again to resume"
    elif summary.interrupted:
        yield "interrupted: run the same command again to resume"
    elif summary.undelivered:
        yield "some deliveries failed: fix the cause above and run the same command again to resume"
    elif summary.damaged or summary.unreadable:
        yield "some inputs or messages could not be read: see above; a rerun sends only what is missing"


def _megabytes(count: float) -> str:
    return f"{count / 1e6:.1f} MB"


def _eta(done: int, total: int, elapsed: float) -> str:
    if not done or done >= total:
        return "-"
    seconds = elapsed * (total - done) / done
    return f"{seconds / 60:.0f}m" if seconds >= 90 else f"{seconds:.0f}s"


class PlainProgress:
    """One line every `interval` seconds, for logs and pipes."""

    def __init__(self, stream: TextIO, interval: float = 10.0) -> None:
        self.stream = stream
        self.interval = interval
        self._next = time.monotonic() + interval

    def update(self, summary: Summary, done_bytes: int, total_bytes: int) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval
        elapsed = summary.elapsed
        self.stream.write(
            f"import: {summary.messages} messages, {summary.delivered} delivered, "
            f"{summary.undelivered + summary.invalid} failed; {_megabytes(done_bytes)} of "
            f"{_megabytes(total_bytes)}; {summary.worked / elapsed:.0f} msg/s; "
            f"ETA {_eta(done_bytes, total_bytes, elapsed)}\n"
        )
        self.stream.flush()

    def close(self, summary: Summary) -> None:
        pass


class RichProgress:
    """A live bar with messages, bytes, rate, ETA and failures, on a terminal."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("[bold]import[/bold]"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[messages]} msgs, {task.fields[rate]:.0f}/s"),
            TextColumn("[red]{task.fields[failed]} failed[/red]"),
            TimeRemainingColumn(),
            console=Console(file=stream),
            transient=False,
        )
        self._task = self._bar.add_task("import", total=None, messages=0, rate=0.0, failed=0)
        self._started = False  # at the first update, so lines logged before it stay above
        self._next = 0.0
        self._total = 0
        self._done = 0

    def log(self, line: str) -> None:
        """A log line above the live bar (a plain write to stderr would tear it)."""
        self._bar.console.print(prefixed(line), markup=False, highlight=False)

    def update(self, summary: Summary, done_bytes: int, total_bytes: int) -> None:
        self._done, self._total = done_bytes, total_bytes  # for the last frame
        now = time.monotonic()
        if now < self._next:  # rich redraws 10 times a second; more updates only cost time
            return
        self._next = now + 0.1
        if not self._started:
            self._bar.start()
            self._started = True
        self._total = total_bytes
        self._draw(summary, done_bytes, total_bytes)

    def _draw(self, summary: Summary, done_bytes: int, total_bytes: int) -> None:
        self._bar.update(
            self._task,
            total=total_bytes,
            completed=done_bytes,
            messages=summary.messages,
            rate=summary.worked / max(summary.elapsed, 1e-9),
            failed=summary.undelivered + summary.invalid,
        )

    def close(self, summary: Summary) -> None:
        if self._started:
            # The final counts, not the last tick's; the bytes read to, unless it read them all
            # (after Ctrl-C or an early stop, half done must not show as 1.2/1.2 MB).
            finished = not (summary.interrupted or summary.stopped)
            self._draw(summary, self._total if finished else self._done, self._total)
            self._bar.stop()


def choose(stream: Any, *, quiet: bool, fancy: bool = True) -> Progress:
    if quiet:
        return NoProgress()
    if fancy and stream.isatty():
        return RichProgress(stream)
    return PlainProgress(stream)
