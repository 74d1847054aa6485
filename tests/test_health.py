"""Health: readiness that catches a silent death, and the one-line status (fetch/health.py)."""

from __future__ import annotations

import threading
from typing import List, Tuple

from mailbox_relay.fetch.events import Fanout, WatchEvents
from mailbox_relay.fetch.health import Health

FRESH = 200.0  # 2 x idle_refresh (90) + timeout (20)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def health(*folders: str) -> Tuple[Health, Clock]:
    clock = Clock()
    judged = Health(lambda account: FRESH, clock=clock)
    for name in folders:
        judged.folder_added("box", name)
    return judged, clock


def test_a_folder_that_never_connected_is_not_ready() -> None:
    judged, clock = health("INBOX")
    assert judged.ready() == (False, [{"account": "box", "folder": "INBOX", "why": "not connected yet"}])
    judged.connecting("box", "INBOX")
    clock.now += 5
    ready, stale = judged.ready()
    assert not ready and stale[0]["why"] == "not connected yet (connecting for 5s)"


def test_a_silent_connection_goes_stale_after_its_bound_and_ready_again_after_the_reconnect() -> None:
    judged, clock = health("INBOX", "Sent")
    for name in ("INBOX", "Sent"):
        judged.connected("box", name)
    assert judged.ready() == (True, [])
    clock.now += FRESH - 1
    judged.round_trip("box", "Sent")  # Sent's server still answers; INBOX's went silent (a blackhole)
    assert judged.ready()[0]
    clock.now += 2
    ready, stale = judged.ready()
    assert not ready
    assert [(row["folder"], row["why"]) for row in stale] == [
        ("INBOX", "no server round-trip for 201s (more than 2 x idle_refresh + timeout = 200s)")
    ]
    judged.lost("box", "INBOX", "timeout")
    judged.connecting("box", "INBOX")  # a reconnect that just began is a known, bounded state
    assert judged.ready()[0]
    judged.connected("box", "INBOX")
    assert judged.ready() == (True, [])


def test_a_known_wait_is_ready_while_it_lasts_and_a_forgotten_one_is_not() -> None:
    judged, clock = health("INBOX", "Sent")
    judged.connected("box", "INBOX")
    judged.paused("box", "Sent", "the OAuth2 grant was refused: run `mailbox-relay auth box`")
    judged.lost("box", "INBOX", "reset")
    judged.backoff("box", "INBOX", "connection refused", 30)
    clock.now += 10_000  # a pause waits for a person: still a known state
    _, stale = judged.ready()
    assert [row["folder"] for row in stale] == ["INBOX"]
    assert "its backoff (connection refused) ended" in stale[0]["why"]
    assert "no reconnect started" in stale[0]["why"]


def test_the_status_line_counts_folders_by_state() -> None:
    judged, clock = health(*[f"F{n}" for n in range(5)])
    judged.grant("box", "refused")
    for name in ("F0", "F1"):
        judged.connected("box", name)
    judged.connected("box", "F2")
    judged.lost("box", "F2", "reset")
    judged.backoff("box", "F2", "connection refused", 5)
    judged.paused("box", "F3", "grant refused")
    judged.connecting("box", "F4")
    assert judged.status_line() == "5 folders: 2 idle, 1 connecting, 1 reconnecting, 1 paused (grant)"
    clock.now += FRESH + 100
    assert judged.status_line().startswith("5 folders: 1 connecting, 3 stale, 1 paused")


def test_events_from_many_threads_keep_every_folder() -> None:
    judged, _ = health()
    events: WatchEvents = Fanout(judged)

    def work(n: int) -> None:
        for i in range(200):
            events.folder_added("box", f"{n}-{i}")
            events.connected("box", f"{n}-{i}")
            events.round_trip("box", f"{n}-{i}")

    threads: List[threading.Thread] = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert judged.status_line() == "1600 folders: 1600 idle"
    assert judged.ready() == (True, [])
