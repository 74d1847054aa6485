"""Progress of `import`: rich on a terminal, a plain line every so often otherwise, or nothing.

rich is imported only here, and only when stderr is a terminal: `deliver` never pays for it.
"""

from __future__ import annotations

import time
from typing import Any, TextIO

from mailbox_relay.importer import Progress, Summary


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
            f"{_megabytes(total_bytes)}; {summary.messages / elapsed:.0f} msg/s; "
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

    def log(self, line: str) -> None:
        """A log line above the live bar (a plain write to stderr would tear it)."""
        self._bar.console.print(f"mailbox-relay: {line}", markup=False, highlight=False)

    def update(self, summary: Summary, done_bytes: int, total_bytes: int) -> None:
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
            rate=summary.messages / max(summary.elapsed, 1e-9),
            failed=summary.undelivered + summary.invalid,
        )

    def close(self, summary: Summary) -> None:
        if self._started:
            self._draw(summary, self._total, self._total)  # the final counts, not the last tick
            self._bar.stop()


def choose(stream: Any, *, quiet: bool, fancy: bool = True) -> Progress:
    from mailbox_relay.importer import NoProgress

    if quiet:
        return NoProgress()
    if fancy and stream.isatty():
        return RichProgress(stream)
    return PlainProgress(stream)
