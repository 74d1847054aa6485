"""`import` throughput and memory, measured against a curl-per-message loop in the same run.

    python bench/import.py [--sizes 500 5000 20000] [--dry-run-mb 600] [--runs 3]

1. Messages per second into nginx answering 204: `mailbox-relay import` (default --jobs) at
   each of --sizes messages vs a shell loop running the curl relay once per message, and the
   fixed start-up and steady rate fitted from them (time = start-up + messages / rate).
   Target: >= 10x at every size from 5,000 on (an everyday import, not only a huge one).
2. `import --dry-run` on a generated mbox of realistic message sizes: MB/s and peak RSS.
   Targets: >= 150 MB/s, <= 150 MB.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CURL_RELAY, PASSWORD, machine, median, nginx_204, peak_rss_mb, relay_script


def small_message(n: int) -> bytes:
    return (
        f"From: Sender {n} <s{n}@example.com>\nTo: support@example.com\nSubject: message {n}\n"
        f"Message-ID: <bench-{n}@example.com>\nDate: Thu, 11 Jun 2020 00:38:38 +0000\n\n"
    ).encode() + b"body line\n" * 200


def write_small_mbox(path: Path, count: int) -> None:
    with path.open("wb") as out:
        for n in range(count):
            out.write(b"From bench@example.com Thu Jun 11 00:38:38 2020\n" + small_message(n) + b"\n")


def write_takeout_like_mbox(path: Path, megabytes: int) -> int:
    """Gmail-Takeout-like sizes: mostly 3-30 KB, one in ten with a 100 KB-2 MB attachment."""
    rng = random.Random(7)
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3\n"
    written = count = 0
    with path.open("wb") as out:
        while written < megabytes * 1_000_000:
            size = rng.randint(100_000, 2_000_000) if rng.random() < 0.1 else rng.randint(3_000, 30_000)
            head = (
                b"From 1669160939957813740@xxx Thu Jun 11 00:38:38 +0000 2020\n"
                b"X-GM-THRID: 1669160939957813740\nX-Gmail-Labels: Inbox,Opened\n"
                b"From: a@example.com\nTo: b@example.com\nSubject: %d\nMessage-ID: <t%d@x>\n\n"
                % (count, count)
            )
            body = line * (size // len(line))
            out.write(head + body + b"\n")
            written += len(head) + len(body) + 1
            count += 1
    return count


def curl_loop_rate(url: str, directory: Path, count: int) -> float:
    for n in range(count):
        (directory / f"{n}.eml").write_bytes(small_message(n))
    env = {**os.environ, "URL": url, "INGRESS_PASSWORD": PASSWORD}
    script = f'for f in {directory}/*.eml; do {CURL_RELAY} < "$f" || exit 1; done'
    started = time.perf_counter()
    subprocess.run(["sh", "-c", script], env=env, check=True, stdout=subprocess.DEVNULL)
    return count / (time.perf_counter() - started)


def import_rate(url: str, mbox: Path, count: int, jobs: int) -> float:
    env = {**os.environ, "MAILBOX_RELAY_URL": url, "MAILBOX_RELAY_PASSWORD": PASSWORD}
    started = time.perf_counter()
    subprocess.run(
        [relay_script(), "import", "--no-state", "-q", "--jobs", str(jobs), str(mbox)], env=env, check=True
    )
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 5000, 20000])
    parser.add_argument("--curl-messages", type=int, default=500)
    parser.add_argument("--dry-run-mb", type=int, default=600)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=4)
    args = parser.parse_args()
    print(f"# import; {machine()}")
    with tempfile.TemporaryDirectory(prefix="mailbox-relay-bench-") as tmp:
        work = Path(tmp)
        mboxes = {size: work / f"small-{size}.mbox" for size in args.sizes}
        for size, mbox in mboxes.items():
            write_small_mbox(mbox, size)
        (work / "eml").mkdir()
        with nginx_204() as url:
            curl_rates: List[float] = []
            import_rates: Dict[int, List[float]] = {size: [] for size in args.sizes}
            for _ in range(args.runs):  # alternate, so all see the same machine
                curl_rates.append(curl_loop_rate(url, work / "eml", args.curl_messages))
                for size, mbox in mboxes.items():
                    import_rates[size].append(import_rate(url, mbox, size, args.jobs))
        curl = median(curl_rates)
        print(f"curl loop ({args.curl_messages} msgs)        median {curl:8.0f} msg/s")
        seconds = {}
        for size in args.sizes:
            ours = median(import_rates[size])
            seconds[size] = size / ours
            print(
                f"import --jobs {args.jobs} ({size:6d} msgs) median {ours:8.0f} msg/s = "
                f"{ours / curl:5.1f}x the curl loop (target >= 10x from 5,000 on)"
            )
        small, large = min(args.sizes), max(args.sizes)
        if small != large:
            rate = (large - small) / (seconds[large] - seconds[small])
            print(f"fitted: start-up {seconds[small] - small / rate:.2f} s, steady rate {rate:.0f} msg/s")

        big = work / "takeout.mbox"
        count = write_takeout_like_mbox(big, args.dry_run_mb)
        size_mb = big.stat().st_size / 1e6
        results = [
            peak_rss_mb([relay_script(), "import", "--dry-run", "-q", str(big)]) for _ in range(args.runs)
        ]
        seconds = median([wall for wall, _ in results])
        rss = max(peak for _, peak in results)
        print(
            f"dry run: {size_mb:.0f} MB, {count} messages: median {seconds:.2f}s = "
            f"{size_mb / seconds:.0f} MB/s (target >= 150), peak RSS {rss:.0f} MB (target <= 150)"
        )


if __name__ == "__main__":
    main()
