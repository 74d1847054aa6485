"""What several test modules share: the relay path, the CLI runner, settings and a fake clock.

Test modules import from here (and peers.py, corpus.py), never from each other.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from click.testing import CliRunner

from mailbox_relay.cli import run
from mailbox_relay.ingress.client import Clock
from mailbox_relay.ingress.target import Target

RELAY_PATH = "/rails/action_mailbox/relay/inbound_emails"


def invoke(args: List[str], stdin: bytes = b"", env: Optional[Dict[str, str]] = None) -> Tuple[int, str, str]:
    """Run the real boundary (`run`) with isolated streams; (exit code, stdout, stderr)."""
    try:
        runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # click < 8.2 (Python 3.9)
    except TypeError:
        runner = CliRunner()  # click >= 8.2 always keeps stderr apart
    with runner.isolation(input=stdin, env=env) as streams:
        code = run(args)
        return code, streams[0].getvalue().decode(), streams[1].getvalue().decode()


def make_settings(*, password: str = "pw", environ: Optional[Dict[str, str]] = None, **values: Any) -> Target:
    """A Target as a caller would resolve it, from plain values (defaults for the rest)."""
    return Target(values, password=password, environ=environ or {})


class FakeClock(Clock):
    """Sleeping advances time instantly, so retry budgets are tested without waiting."""

    def __init__(self) -> None:
        self.time = 1000.0
        self.slept: List[float] = []
        super().__init__(now=lambda: self.time, sleep=self._sleep)

    def _sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.time += seconds


def import_process(args: List[str], env: Dict[str, str], **popen: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "mailbox_relay", "import", *args],
        env={**env, "MAILBOX_RELAY_PASSWORD": "pw"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )


def journal_rows(state: str) -> int:
    with sqlite3.connect(state) as db:
        return int(db.execute("SELECT count(*) FROM delivered").fetchone()[0])


def wait_for(condition: Callable[[], object], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
