"""Graph accounts into the real Rails app, through the local Graph (tests/graph_server.py):
fetch exactly once although Exchange regenerates the MIME on every download — across a kill -9
mid-run and an expired delta link — and watch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from ..graph_server import LocalGraph
from ..helpers import invoke, wait_for
from .world import RailsApp

pytestmark = pytest.mark.e2e
BOX = "support@contoso.example"


def mail(n: int, tag: str) -> bytes:
    return (
        f"From: sender{n}@example.com\r\nTo: {BOX}\r\nSubject: {tag} {n}\r\n"
        f"Message-ID: <{tag}-{n}@graph.example>\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n\r\n"
        f"Body {n}.\r\n"
    ).encode()


@pytest.fixture
def graph() -> Iterator[LocalGraph]:
    with LocalGraph() as server:
        server.mailbox(BOX, "Done")
        yield server


def write_config(tmp: Path, graph: LocalGraph, rails: RailsApp, **keys: object) -> dict:
    table = graph.account(BOX, tmp, **{"start": "all", **keys})
    lines = [
        f'url = "{rails.url}"',
        f'password = "{rails.password}"',
        f'fetch_state = "{tmp / "state.sqlite3"}"',
        "retry_for = 30",  # the SQLite test app answers 500 to some concurrent posts
        "",
        "[accounts.box]",
        *(f"{key} = {json.dumps(value)}" for key, value in table.items()),
    ]
    (tmp / "config.toml").write_text("\n".join(lines) + "\n")
    return {"MAILBOX_RELAY_CONFIG": str(tmp / "config.toml"), "XDG_STATE_HOME": str(tmp / "xdg")}


def test_fetch_stores_each_message_once_across_a_kill_and_an_expired_delta_link(
    tmp_path: Path, graph: LocalGraph, rails: RailsApp
) -> None:
    env = write_config(tmp_path, graph, rails, after="move:Done")
    for n in range(30):
        graph.deliver(BOX, mail(n, "graph-once"))
    graph.delay = 0.02
    process = subprocess.Popen(
        [sys.executable, "-m", "mailbox_relay", "fetch"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: rails.stored() >= 5, 60)
    process.send_signal(signal.SIGKILL)  # mid-run: posted, maybe not acknowledged nor recorded
    process.wait(10)
    graph.delay = 0.0
    graph.expire_sync_states()  # and the delta link is gone too
    code, out, err = invoke(["fetch"], env=env)
    assert code == 0, out + err
    expected = sorted(f"graph-once-{n}@graph.example" for n in range(30))
    assert sorted(rails.stored_message_ids()) == expected
    assert graph.in_folder(BOX, "inbox") == []
    assert len(graph.in_folder(BOX, "Done")) == 30
    assert not list((tmp_path / "spool").glob("*.eml"))


def test_watch_delivers_arrivals_at_the_poll_interval(
    tmp_path: Path, graph: LocalGraph, rails: RailsApp
) -> None:
    env = write_config(tmp_path, graph, rails, start="new", poll_interval=1)
    log = tmp_path / "watch.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "mailbox_relay", "watch"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    try:
        wait_for(lambda: "waiting for new mail" in log.read_text(errors="replace"), 30)
        sent: List[float] = []
        for n in range(3):
            sent.append(time.monotonic())
            graph.deliver(BOX, mail(n, "graph-watch"))
            wait_for(lambda n=n: rails.stored() > n, 30)  # type: ignore[misc]
        _, out, _ = invoke(["status", "--json"], env=env)
        assert "box" in out
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text(errors="replace")
    assert sorted(rails.stored_message_ids()) == sorted(f"graph-watch-{n}@graph.example" for n in range(3))
