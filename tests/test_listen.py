"""watch --listen: /healthz, /readyz and /metrics answered from the event loop (fetch/listen.py,
fetch/metrics.py), over real sockets, on the stand-in loop until watch's own loop is merged."""

from __future__ import annotations

import json
import socket
import time
from typing import Dict, Iterator, Tuple

import pytest

from mailbox_relay.fetch import listen
from mailbox_relay.fetch.events import Fanout
from mailbox_relay.fetch.health import Health
from mailbox_relay.fetch.listen import MAX_REQUEST, Listener, ListenError
from mailbox_relay.fetch.metrics import CONTENT_TYPE, Metrics
from mailbox_relay.outcome import ConfigError
from mailbox_relay.settings import parse_listen

from .peers import free_port
from .standin_loop import StandInLoop


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Served = Tuple[Listener, Health, Metrics, Fanout, Clock, StandInLoop]


@pytest.fixture
def served() -> Iterator[Served]:
    clock = Clock()
    health = Health(lambda account: 200.0, clock=clock)
    metrics = Metrics(ready=health.folders_ready)
    events = Fanout(health, metrics)
    loop = StandInLoop()
    listener = Listener(
        ("127.0.0.1", free_port()), loop, health, lambda: (CONTENT_TYPE, metrics.exposition())
    )
    listener.start()
    loop.start()
    yield listener, health, metrics, events, clock, loop
    loop.call_soon_threadsafe(listener.close)
    loop.stop()


def parsed(body: bytes) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, by name and sorted labels (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def labels(base: Tuple[Tuple[str, str], ...], **more: str) -> Tuple[Tuple[str, str], ...]:
    return tuple(sorted((*base, *more.items())))


def get(port: int, path: str, raw: bytes = b"", timeout: float = 10) -> Tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(raw or f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def test_healthz_readyz_and_metrics(served: Served) -> None:
    listener, _health, _metrics, events, clock, _loop = served
    assert get(listener.port, "/healthz") == (200, b"ok\n")
    events.folder_added("box", "INBOX")
    status, body = get(listener.port, "/readyz")
    assert status == 503
    assert json.loads(body)["not_ready"] == [
        {"account": "box", "folder": "INBOX", "why": "not connected yet"}
    ]
    events.connected("box", "INBOX")
    status, body = get(listener.port, "/readyz")
    assert (status, json.loads(body)["status"]) == (200, "1 folder: 1 idle")
    clock.now += 201  # a blackhole: no round-trip for longer than 2 x idle_refresh + timeout
    status, body = get(listener.port, "/readyz")
    assert status == 503 and json.loads(body)["not_ready"][0]["folder"] == "INBOX"
    status, body = get(listener.port, "/metrics")
    assert status == 200
    assert b'mailbox_relay_folder_ready{account="box",folder="INBOX"} 0.0' in body
    assert get(listener.port, "/nowhere")[0] == 404
    assert get(listener.port, "", raw=b"POST /healthz HTTP/1.0\r\n\r\n")[0] == 405
    assert get(listener.port, "", raw=b"hello\r\n\r\n")[0] == 400


def test_the_metrics_count_what_was_delivered(served: Served) -> None:
    listener, _health, _metrics, events, _clock, _loop = served
    events.folder_added("box", "INBOX")
    events.connected("box", "INBOX")
    for _ in range(3):
        events.delivered("box", "INBOX", 0.2)
    events.failed("box", "INBOX", "4.3.0")
    events.failed("box", "INBOX", "<a message id>")  # never a label value of its own
    events.invalid("box", "INBOX")
    events.quarantined("box", "INBOX")
    events.lost("box", "INBOX", "timeout")
    events.backlog("box", "INBOX", 7)
    events.grant("box", "refused")
    status, body = get(listener.port, "/metrics")
    assert status == 200
    samples = parsed(body)
    folder = (("account", "box"), ("folder", "INBOX"))
    assert samples["mailbox_relay_delivered_total", folder] == 3
    assert samples["mailbox_relay_failed_total", labels(folder, code="4.3.0")] == 1
    assert samples["mailbox_relay_failed_total", labels(folder, code="other")] == 1
    assert samples["mailbox_relay_invalid_total", folder] == 1
    assert samples["mailbox_relay_quarantined_total", folder] == 1
    assert samples["mailbox_relay_reconnects_total", labels(folder, cause="timeout")] == 1
    assert samples["mailbox_relay_backlog", folder] == 7
    assert samples["mailbox_relay_folder_connected", folder] == 0
    assert samples["mailbox_relay_ingress_request_duration_seconds_count", (("account", "box"),)] == 3
    grant = (("account", "box"), ("mailbox_relay_oauth2_grant", "refused"))
    assert samples["mailbox_relay_oauth2_grant", grant] == 1
    delivery = samples["mailbox_relay_last_delivery_timestamp_seconds", folder]
    assert delivery == pytest.approx(time.time(), abs=60)
    events.folder_removed("box", "INBOX")
    assert b'folder="INBOX"' not in get(listener.port, "/metrics")[1]


def test_a_slow_or_oversized_client_never_holds_the_loop(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener, *_ = served
    monkeypatch.setattr(listen, "DEADLINE", 0.5)
    silent = socket.create_connection(("127.0.0.1", listener.port))  # sends nothing at all
    huge = socket.create_connection(("127.0.0.1", listener.port))
    huge.sendall(b"GET /" + b"x" * (MAX_REQUEST + 10))
    try:
        assert get(listener.port, "/healthz") == (200, b"ok\n")  # answered while both are open
        assert huge.recv(100).startswith(b"HTTP/1.0 400")
        silent.settimeout(30)
        assert silent.recv(100) == b""  # closed by the per-connection deadline
    finally:
        silent.close()
        huge.close()


def test_a_hung_loop_stops_answering_healthz() -> None:
    loop = StandInLoop(hang_after=0.5)
    health = Health(lambda account: 200.0)
    listener = Listener(("127.0.0.1", free_port()), loop, health)
    listener.start()
    loop.start()
    assert get(listener.port, "/healthz") == (200, b"ok\n")
    time.sleep(1.0)  # the loop has hung by now (the hook sleeps forever)
    with pytest.raises(socket.timeout):
        get(listener.port, "/healthz", timeout=1.0)


def test_an_address_in_use_is_said() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listener = Listener(("127.0.0.1", port), StandInLoop(), Health(lambda account: 1.0))
        with pytest.raises(ListenError, match=rf"cannot listen on 127.0.0.1:{port}: Address already in use"):
            listener.start()


@pytest.mark.parametrize(
    "value, address",
    [
        ("9101", ("127.0.0.1", 9101)),
        (9101, ("127.0.0.1", 9101)),
        ("localhost:9101", ("127.0.0.1", 9101)),
        ("0.0.0.0:9101", ("0.0.0.0", 9101)),
        ("[::1]:9101", ("::1", 9101)),
        ("[::]:80", ("::", 80)),
    ],
)
def test_listen_addresses(value: object, address: Tuple[str, int]) -> None:
    assert parse_listen(value, "listen") == address


@pytest.mark.parametrize(
    "value", ["", "0", "70000", "::1:9101", "[127.0.0.1]:80", "example.com:80", "x", True]
)
def test_listen_addresses_refused(value: object) -> None:
    with pytest.raises(ConfigError, match="listen must be PORT, HOST:PORT or"):
        parse_listen(value, "listen")


def test_ipv6_loopback_listens() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    loop = StandInLoop()
    port = free_port()
    listener = Listener(("::1", port), loop, Health(lambda account: 1.0))
    try:
        listener.start()
    except ListenError as error:
        pytest.skip(f"no IPv6 loopback here: {error}")
    loop.start()
    try:
        with socket.create_connection(("::1", port), timeout=10) as conn:
            conn.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert conn.recv(100).startswith(b"HTTP/1.0 200 OK")
    finally:
        loop.call_soon_threadsafe(listener.close)
        loop.stop()
