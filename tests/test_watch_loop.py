"""watch's event loop (fetch/loop.py): timers, readers, hand-overs from threads, no busy wait;
and the pieces of watch that need no server: shards, the events fan-out, account changes."""

from __future__ import annotations

import resource
import socket
import threading
import time
from typing import List

import pytest

from mailbox_relay.fetch.events import Fanout, WatchEvents
from mailbox_relay.fetch.loop import Loop
from mailbox_relay.fetch.watch import shard_of
from mailbox_relay.outcome import ConfigError
from mailbox_relay.settings import parse_shard


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_for(loop: Loop, seconds: float) -> None:
    loop.call_later(seconds, loop.stop)
    loop.run()


def test_timers_run_in_order_and_a_cancelled_one_never() -> None:
    loop, said = Loop(print), []
    loop.call_later(0.2, lambda: said.append("late"))
    loop.call_later(0.05, lambda: said.append("early"))
    loop.call_later(0.1, lambda: said.append("cancelled")).cancel()
    run_for(loop, 0.3)
    assert said == ["early", "late"]


def test_a_readable_socket_calls_its_reader_until_removed() -> None:
    loop, said = Loop(print), []
    ours, theirs = socket.socketpair()

    def read() -> None:
        said.append(ours.recv(100))
        if len(said) == 2:
            loop.remove_reader(ours)
            theirs.send(b"never read")

    loop.add_reader(ours, read)
    loop.call_later(0.05, lambda: theirs.send(b"one"))
    loop.call_later(0.1, lambda: theirs.send(b"two"))
    run_for(loop, 0.3)
    assert said == [b"one", b"two"]
    ours.close()
    theirs.close()


def test_another_thread_wakes_the_loop_at_once() -> None:
    loop, woke = Loop(print), []
    sent = time.monotonic()

    def hand_over() -> None:
        time.sleep(0.1)
        loop.call_soon_threadsafe(lambda: (woke.append(time.monotonic()), loop.stop()))

    threading.Thread(target=hand_over).start()
    loop.run()  # no timer at all: only the pipe can wake it
    assert woke and woke[0] - sent < 2.0


def test_a_waiting_loop_uses_no_cpu_and_turns_only_when_something_happens() -> None:
    loop = Loop(print)
    ours, theirs = socket.socketpair()
    loop.add_reader(ours, lambda: None)  # never readable
    before = cpu()
    run_for(loop, 1.0)
    assert cpu() - before < 0.2  # a busy wait would burn the whole second
    assert loop.turned >= time.monotonic() - 0.5
    ours.close()
    theirs.close()


def test_a_callback_that_raises_is_said_and_the_loop_goes_on() -> None:
    said: List[str] = []
    loop = Loop(said.append)
    loop.call_later(0.0, lambda: 1 / 0)  # type: ignore[func-returns-value]
    ran: List[bool] = []
    loop.call_later(0.05, lambda: ran.append(True))
    run_for(loop, 0.1)
    assert ran == [True] and "ZeroDivisionError" in said[0]


def test_the_fanout_calls_every_observer() -> None:
    class Count(WatchEvents):
        def __init__(self) -> None:
            self.said: List[str] = []

        def lost(self, account: str, folder: str, cause: str) -> None:
            self.said.append(f"{account}/{folder}:{cause}")

    first, second = Count(), Count()
    fanout = Fanout(first)
    fanout.add(second)
    fanout.lost("a", "INBOX", "reset")
    fanout.delivered("a", "INBOX", 0.1)  # a no-op for both
    assert first.said == second.said == ["a/INBOX:reset"]


def test_shards_split_accounts_stably_and_evenly() -> None:
    names = [f"account-{n}" for n in range(3000)]
    shards = [shard_of(name, 3) for name in names]
    assert shard_of("account-7", 3) == shards[7]  # the same on every call (and host: SHA-256)
    assert all(800 < shards.count(k) < 1200 for k in range(3))


@pytest.mark.parametrize("value", ["3/3", "1", "a/3", "-1/3", "0/0", "1/٣"])
def test_a_shard_must_be_k_of_n_from_zero(value: str) -> None:
    with pytest.raises(ConfigError, match=r"K/N|0 <= K < N"):
        parse_shard(value, "--shard")
    assert parse_shard("2/3", "--shard") == (2, 3)
