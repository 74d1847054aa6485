"""`deliver` per message, against the dependency floor and the curl relay, in one run.

    python bench/deliver.py [--runs 15]

Into nginx answering 204 (the fastest possible ingress), alternating: the floor (a 3-line
script that imports click and requests and POSTs stdin once), `mailbox-relay deliver`, and the
curl relay. Prints medians and ratios. Target: deliver <= 1.15x the floor.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    CURL_RELAY,
    FLOOR,
    PASSWORD,
    ROOT,
    alternate,
    machine,
    median,
    nginx_204,
    peak_rss_mb,
    relay_script,
    timed,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--big-mb", type=int, default=50, help="size of the large-message RSS test")
    args = parser.parse_args()
    message = (ROOT / "contrib" / "sample.eml").read_bytes()
    with nginx_204() as url:
        # PYTHONDONTWRITEBYTECODE (set in some shells and containers) would make every run
        # compile mailbox-relay's modules from source (~35 ms here), while click's and requests'
        # .pyc files came with their install: a mail host's pip install writes ours too.
        env = {
            **{name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"},
            "MAILBOX_RELAY_URL": url,
            "MAILBOX_RELAY_PASSWORD": PASSWORD,
            "URL": url,
            "INGRESS_PASSWORD": PASSWORD,
        }
        relay = relay_script()
        contenders = {
            "floor (click+requests POST)": lambda: timed(
                [sys.executable, "-c", FLOOR, url], stdin=message, env=env
            ),
            "mailbox-relay deliver": lambda: timed([relay, "deliver"], stdin=message, env=env),
            "curl relay": lambda: timed([CURL_RELAY], stdin=message, env=env, shell=True),
        }
        for run in contenders.values():  # warm the page cache and .pyc files
            run()
        times = alternate(args.runs, contenders)
    medians = {name: median(values) for name, values in times.items()}
    floor, ours, curl = medians.values()
    print(f"# deliver, {args.runs} alternating runs each; {machine()}")
    for name, value in medians.items():
        print(f"{name:32s} median {value * 1000:7.1f} ms")
    print(f"mailbox-relay / floor: {ours / floor:.2f}x (target <= 1.15x)")
    print(f"mailbox-relay / curl relay: {ours / curl:.1f}x slower (floor / curl: {floor / curl:.1f}x)")
    big_message_rss(args.big_mb)


def big_message_rss(megabytes: int) -> None:
    """Peak RSS of delivering one large message (with an mbox From_ line and an added header)."""
    body = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3\n"
    with tempfile.NamedTemporaryFile(suffix=".eml") as message, nginx_204() as url:
        message.write(b"From a@example.com Thu Jun 11 00:38:38 2020\nFrom: a@example.com\nSubject: big\n\n")
        message.write(body * (megabytes * 1_000_000 // len(body)))
        message.flush()
        size = os.path.getsize(message.name) / 1e6
        env = {**os.environ, "MAILBOX_RELAY_URL": url, "MAILBOX_RELAY_PASSWORD": PASSWORD}
        command = [relay_script(), "deliver", "--envelope-recipient", "to@example.com"]
        wall, rss = peak_rss_mb(command, stdin_path=message.name, env=env)
    print(
        f"deliver of a {size:.0f} MB message: {wall:.2f}s, peak RSS {rss:.0f} MB = {rss / size:.2f}x "
        "the message (target <= 2.5x)"
    )


if __name__ == "__main__":
    main()
