"""The Graph source against the local Graph (tests/graph_server.py): a backlog drained, and
watch's latency at the default poll interval.

Run by hand (nginx for the backlog's ingress, as bench/fetch.py; the latency run records
arrivals itself):

    python bench/graph.py --messages 5000 --runs 1 --latency-messages 10

- Backlog: `mailbox-relay fetch` (start = all, a fresh state and spool each run) of N messages
  of ~4 KB from one folder: delta pages of 100, each `$value` downloaded once into the spool
  (4 at a time: Graph's per-mailbox limit), posted, acknowledged (`after`). Messages per second.
- Latency: `watch` with the default poll_interval (15 s); a message arrives at a random moment
  of the cycle; from its arrival in the local Graph to its POST at a recording ingress. Bound
  by the interval by design: p95 target poll_interval + 2 s.

The local Graph is a Python ThreadingHTTPServer in this process: it, not Exchange, may be the
bottleneck of the backlog figure (Exchange answers a `$value` in tens of milliseconds; here
each request costs a thread and Python's HTTP parsing on a shared 2-core VM).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, median, nginx_204, relay_script
from tests.graph_server import LocalGraph
from tests.peers import Ingress204

BOX = "support@contoso.example"


def message(n: int) -> bytes:
    body = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 60).encode()
    return (
        (
            f"From: sender{n}@example.com\r\nTo: {BOX}\r\nSubject: bench {n}\r\n"
            f"Message-ID: <bench-{n}@graph.example>\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n\r\n"
        ).encode()
        + body
        + b"\r\n"
    )


def config(tmp: Path, graph: LocalGraph, url: str, **keys: Any) -> Dict[str, str]:
    table = graph.account(BOX, tmp, **keys)
    lines = [
        f'url = "{url}"',
        'password = "pw"',
        f'fetch_state = "{tmp / "state.sqlite3"}"',
        "",
        "[accounts.box]",
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    (tmp / "config.toml").write_text("\n".join(lines) + "\n")
    return {
        **os.environ,
        "MAILBOX_RELAY_CONFIG": str(tmp / "config.toml"),
        "XDG_STATE_HOME": str(tmp / "xdg"),
    }


def backlog(count: int, url: str, after: str) -> float:
    with LocalGraph() as graph, tempfile.TemporaryDirectory(prefix="mailbox-relay-bench-") as directory:
        graph.mailbox(BOX)
        for n in range(count):
            graph.deliver(BOX, message(n))
        env = config(Path(directory), graph, url, start="all", after=after)
        started = time.perf_counter()
        result = subprocess.run([relay_script(), "fetch"], env=env, capture_output=True)
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(result.stderr.decode()[-500:])
        assert graph.max_in_flight <= 4 and all(m.downloads == 1 for m in graph.messages.values())
        return count / elapsed


def latency(count: int, poll: float) -> List[float]:
    with LocalGraph() as graph, Ingress204() as ingress, tempfile.TemporaryDirectory() as directory:
        graph.mailbox(BOX)
        keys: Dict[str, Any] = {"start": "new"}
        if poll != 15:
            keys["poll_interval"] = poll
        env = config(Path(directory), graph, ingress.url, **keys)
        log = Path(directory) / "watch.log"
        process = subprocess.Popen([relay_script(), "watch"], env=env, stderr=log.open("wb"))
        try:
            until = time.monotonic() + 60
            while "waiting for new mail" not in log.read_text(errors="replace"):
                if time.monotonic() > until:
                    raise RuntimeError(log.read_text())
                time.sleep(0.05)
            seconds: List[float] = []
            for n in range(count):
                time.sleep(random.uniform(0, poll))
                sent = time.monotonic()
                graph.deliver(BOX, message(n))
                while len(ingress.bodies) <= n:
                    if time.monotonic() - sent > 3 * poll + 30:
                        raise RuntimeError(log.read_text())
                    time.sleep(0.005)
                seconds.append(time.monotonic() - sent)
            return seconds
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--after", default="seen")
    parser.add_argument("--latency-messages", type=int, default=10)
    parser.add_argument("--poll", type=float, default=15.0)
    options = parser.parse_args()
    print(machine())
    with nginx_204() as url:
        rates = [backlog(options.messages, url, options.after) for _ in range(options.runs)]
    print(
        f"backlog of {options.messages} (after = {options.after}): "
        f"{median(rates):.0f} msg/s median of {[round(rate) for rate in rates]}"
    )
    if options.latency_messages:
        seconds = sorted(latency(options.latency_messages, options.poll))
        p95 = seconds[min(len(seconds) - 1, int(0.95 * len(seconds)))]
        print(
            f"watch latency at poll_interval {options.poll:g}s over {len(seconds)}: "
            f"p50 {statistics.median(seconds):.2f}s p95 {p95:.2f}s max {seconds[-1]:.2f}s"
        )


if __name__ == "__main__":
    threading.excepthook = lambda args: None
    main()
