"""fetch and watch against the real Dovecot: backfill rate, arrival latency, memory.

Run by hand as root (Dovecot stores mail as an unprivileged user the script creates):

    python bench/fetch.py --messages 2000 --getmail-messages 200 --runs 3

- Backfill: `mailbox-relay fetch` (start = all, a fresh state each run) of N messages into
  the nginx 204 stub, against getmail6 + `mailbox-relay deliver` (one process per message; run
  on a smaller set, since it is ~100x slower, and compared as messages per second) and against
  an ideal loop: imaplib UID FETCH in batches of 100 plus one keep-alive requests session.
- Latency: `watch`, from the end of each APPEND to the POST arriving at a recording ingress,
  over --latency-messages messages: p50 and p95.
- Memory: `watch` on 10 accounts (RSS once all are idle), and `fetch` of one 50 MB message
  (peak RSS, against the message size).
"""

from __future__ import annotations

import argparse
import imaplib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import List, Tuple

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PASSWORD, alternate, machine, median, nginx_204, relay_script
from tests.e2e.world import Dovecot


def small_message(n: int) -> bytes:
    return (
        f"From: Sender <sender@example.com>\r\nTo: support@example.com\r\nSubject: bench {n}\r\n"
        f"Message-ID: <bench-{n}@example.com>\r\n\r\n" + "Hello, this is a benchmark message.\r\n" * 40
    ).encode()


def fill(dovecot: Dovecot, user: str, count: int) -> None:
    client = dovecot.imap(user)
    for n in range(count):
        client.append("INBOX", None, None, small_message(n))
    client.logout()


def config(directory: Path, url: str, dovecot: Dovecot, users: List[str], **extra: str) -> Path:
    lines = [f'url = "{url}"', f'password = "{PASSWORD}"', f'fetch_state = "{directory}/state.sqlite3"']
    for user in users:
        lines += [
            f"[accounts.{user}]",
            'host = "127.0.0.1"',
            f"port = {dovecot.port}",
            'tls = "none"',
            f'username = "{user}"',
            f'password = "secret-{user}"',
            *(f'{key} = "{value}"' for key, value in extra.items()),
        ]
    path = directory / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def fetch_seconds(directory: Path, url: str, dovecot: Dovecot, user: str) -> float:
    (directory / "state.sqlite3").unlink(missing_ok=True)
    path = config(directory, url, dovecot, [user], start="all")
    started = time.perf_counter()
    subprocess.run([relay_script(), "fetch", "-q", "--config", str(path)], check=True)
    return time.perf_counter() - started


def ideal_seconds(url: str, dovecot: Dovecot, user: str) -> float:
    started = time.perf_counter()
    client = imaplib.IMAP4("127.0.0.1", dovecot.port)
    client.login(user, f"secret-{user}")
    client.select("INBOX", readonly=True)
    uids = client.uid("SEARCH", "ALL")[1][0].split()
    with requests.Session() as session:
        session.auth = ("actionmailbox", PASSWORD)
        for start in range(0, len(uids), 100):
            batch = b",".join(uids[start : start + 100]).decode()
            data = client.uid("FETCH", batch, "(BODY.PEEK[])")[1]
            for item in data:
                if isinstance(item, tuple):
                    answer = session.post(url, data=item[1], headers={"Content-Type": "message/rfc822"})
                    assert answer.status_code == 204
    client.logout()
    return time.perf_counter() - started


def getmail_seconds(directory: Path, url: str, dovecot: Dovecot, user: str) -> float:
    run = directory / "getmail"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    (run / "getmailrc").write_text(
        "[retriever]\ntype = SimpleIMAPRetriever\n"
        f"server = 127.0.0.1\nport = {dovecot.port}\nusername = {user}\npassword = secret-{user}\n"
        'mailboxes = ("INBOX",)\n\n[destination]\ntype = MDA_external\n'
        f'path = {relay_script()}\narguments = ("deliver",)\nallow_root_commands = true\n\n'
        "[options]\nread_all = true\ndelete = false\ndelivered_to = false\nreceived = false\nverbose = 0\n"
    )
    env = {**os.environ, "MAILBOX_RELAY_URL": url, "MAILBOX_RELAY_PASSWORD": PASSWORD}
    started = time.perf_counter()
    subprocess.run(["getmail", "--getmaildir", str(run), "--rcfile", "getmailrc"], env=env, check=True)
    return time.perf_counter() - started


class Recorder:
    """An ingress that notes when each Message-ID arrived."""

    def __init__(self) -> None:
        arrivals = self.arrivals = {}  # type: Dict[bytes, float]

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                start = body.find(b"Message-ID: <") + 13
                arrivals[body[start : body.find(b">", start)]] = time.monotonic()
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = (
            f"http://127.0.0.1:{self.server.server_address[1]}/rails/action_mailbox/relay/inbound_emails"
        )
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def wait_for_log(path: Path, text: str, count: int = 1, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while path.read_text(errors="replace").count(text) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"watch did not say {text!r}: {path.read_text()[-1000:]}")
        time.sleep(0.05)


def start_watch(config_path: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [relay_script(), "watch", "--config", str(config_path)],
        stderr=log.open("wb"),
        stdout=subprocess.DEVNULL,
    )


def latencies(directory: Path, dovecot: Dovecot, user: str, count: int) -> List[float]:
    recorder = Recorder()
    log = directory / "watch-latency.log"
    watch = start_watch(config(directory, recorder.url, dovecot, [user], start="new"), log)
    try:
        wait_for_log(log, "waiting for new mail")
        client = dovecot.imap(user)
        seconds = []
        for n in range(count):
            raw = small_message(100000 + n)
            client.append("INBOX", None, None, raw)
            appended = time.monotonic()
            key = f"bench-{100000 + n}@example.com".encode()
            deadline = appended + 10
            while key not in recorder.arrivals and time.monotonic() < deadline:
                time.sleep(0.002)
            seconds.append(recorder.arrivals.get(key, float("inf")) - appended)
            time.sleep(0.05)
        client.logout()
        return seconds
    finally:
        watch.send_signal(signal.SIGTERM)
        watch.wait(30)
        recorder.server.shutdown()


def watch_rss_mb(directory: Path, url: str, dovecot: Dovecot, users: List[str]) -> float:
    log = directory / "watch-memory.log"
    watch = start_watch(config(directory, url, dovecot, users, start="new"), log)
    try:
        wait_for_log(log, "waiting for new mail", count=len(users))
        time.sleep(1)
        status = Path(f"/proc/{watch.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024
    finally:
        watch.send_signal(signal.SIGTERM)
        watch.wait(30)


def peak_hwm_mb(command: List[str]) -> float:
    """The child's own peak RSS (VmHWM), polled until it exits. Not rusage: a child's ru_maxrss
    starts from its parent's RSS at fork, and this parent has just held a 50 MB message."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    peak = 0
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak = max(
                peak, int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
            )
        except (OSError, StopIteration):
            pass
        time.sleep(0.01)
    if process.returncode != 0:
        raise RuntimeError(f"{command} exited {process.returncode}")
    return peak / 1024


def big_fetch(directory: Path, url: str, dovecot: Dovecot, user: str, megabytes: int) -> Tuple[float, float]:
    line = b"x" * 76 + b"\r\n"
    raw = b"From: a@example.com\r\nSubject: big\r\n\r\n" + line * (megabytes * 1024 * 1024 // len(line))
    client = dovecot.imap(user)
    client.append("INBOX", None, None, raw)
    client.logout()
    (directory / "state.sqlite3").unlink(missing_ok=True)
    path = config(directory, url, dovecot, [user], start="all")
    peak = peak_hwm_mb([relay_script(), "fetch", "-q", "--config", str(path)])
    return peak, len(raw) / 1024 / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--getmail-messages", type=int, default=200)
    parser.add_argument("--latency-messages", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="mailbox-relay-bench-fetch-"))
    directory.chmod(0o755)  # Dovecot reads its users' mail as an unprivileged user
    dovecot = Dovecot(directory / "dovecot")
    dovecot.start()
    try:
        with nginx_204() as url:
            many, few = dovecot.new_user(), dovecot.new_user()
            fill(dovecot, many, args.messages)
            fill(dovecot, few, args.getmail_messages)
            times = alternate(
                args.runs,
                {
                    "fetch": lambda: fetch_seconds(directory, url, dovecot, many),
                    "ideal": lambda: ideal_seconds(url, dovecot, many),
                    "getmail": lambda: getmail_seconds(directory, url, dovecot, few),
                },
            )
            rate = {
                "fetch": args.messages / median(times["fetch"]),
                "ideal": args.messages / median(times["ideal"]),
                "getmail": args.getmail_messages / median(times["getmail"]),
            }
            seconds = latencies(directory, dovecot, dovecot.new_user(), args.latency_messages)
            rss = watch_rss_mb(directory, url, dovecot, [dovecot.new_user() for _ in range(10)])
            peak, size = big_fetch(directory, url, dovecot, dovecot.new_user(), 50)
    finally:
        dovecot.stop()
        shutil.rmtree(directory, ignore_errors=True)
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * len(ordered)) - 1)]
    print(machine())
    print(f"backfill, medians of {args.runs} alternating runs, messages/s:")
    print(f"  fetch    {rate['fetch']:8.0f}  ({args.messages} messages)")
    print(f"  ideal    {rate['ideal']:8.0f}  (imaplib batches of 100 + one keep-alive session)")
    print(f"  getmail  {rate['getmail']:8.1f}  (getmail6 + deliver, {args.getmail_messages} messages)")
    print(f"  fetch / getmail = {rate['fetch'] / rate['getmail']:.0f}x (target >= 100x)")
    print(f"  fetch / ideal   = {rate['fetch'] / rate['ideal']:.2f} (target >= 1.0)")
    print(
        f"watch latency APPEND -> POST over {len(seconds)} messages: p50 {statistics.median(seconds):.3f} s, "
        f"p95 {p95:.3f} s (targets 0.5 s, 1.5 s)"
    )
    print(f"watch on 10 accounts: RSS {rss:.0f} MB (target <= 80 MB)")
    print(f"fetch of a {size:.0f} MB message: peak RSS {peak:.0f} MB = {peak / size:.2f}x (target <= 3x)")


if __name__ == "__main__":
    main()
