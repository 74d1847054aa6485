"""What `import` reports at the end: the running Summary (counts, failures, damaged inputs), its
exit code, and the summary lines. Pure: no terminal, no rich (progress.py draws while it runs)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

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
