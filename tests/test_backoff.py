"""The one backoff formula, and the one way to ask whether a process still runs."""

from __future__ import annotations

import os
import subprocess
import sys

from mailbox_relay.backoff import Backoff, doubling
from mailbox_relay.processes import pid_alive


def test_doubling_from_first_up_to_cap() -> None:
    assert [doubling(n, 60, 3600) for n in (1, 2, 3, 6, 7, 50)] == [60, 120, 240, 1920, 3600, 3600]


def test_backoff_jitters_between_half_and_all_of_the_formula() -> None:
    assert Backoff(1.0, 15.0, random=lambda: 0.0).delay(3) == 2.0
    assert Backoff(1.0, 15.0, random=lambda: 1.0).delay(3) == 4.0
    assert Backoff(1.0, 15.0, random=lambda: 1.0).delay(9) == 15.0


def test_pid_alive() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(None) and not pid_alive(0)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid)
