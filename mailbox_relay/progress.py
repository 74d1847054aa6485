"""`import`'s progress while it runs: rich on a terminal, a plain line every so often otherwise,
or nothing. The Summary it draws from, and the final lines, are in import_summary.py.

rich is imported only here, and only when stderr is a terminal: `deliver` never pays for it.
"""

from __future__ import annotations

import time
from typing import Any, Protocol, TextIO

from mailbox_relay.import_summary import Summary
from mailbox_relay.log import prefixed


class Progress(Protocol):
    def update(self, summary: Summary, done_bytes: int, total_bytes: int) -> None: ...

    def close(self, summary: Summary) -> None: ...


class NoProgress:
    def update(self, summary: Summary, done_bytes: int, total_bytes: int) -> None:
        pass

    def close(self, summary: Summary) -> None:
        pass


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
