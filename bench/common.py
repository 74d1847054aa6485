"""Shared pieces of the benchmarks: a local 204 ingress (nginx), timing, medians and ratios.

Benchmarks are run by hand, never by the test suite. These machines are noisy: every script
measures the things it compares in the same run, alternating them, and reports medians.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
RELAY_PATH = "/rails/action_mailbox/relay/inbound_emails"
PASSWORD = "bench-password"

# The dependency floor for `deliver`: import click and requests, POST stdin once.
FLOOR = (
    "import sys, click, requests\n"
    "r = requests.post(sys.argv[1], data=sys.stdin.buffer.read(), auth=('actionmailbox', 'pw'), "
    "headers={'Content-Type': 'message/rfc822'})\n"
    "sys.exit(0 if r.ok else 75)\n"
)

# The relay most guides copy (no --fail: it exits 0 on 401/404/500).
CURL_RELAY = (
    'curl -sS -u "actionmailbox:$INGRESS_PASSWORD" -H "Content-Type: message/rfc822" --data-binary @- "$URL"'
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def relay_script() -> str:
    beside = Path(sys.executable).with_name("mailbox-relay")
    return str(beside) if beside.exists() else shutil.which("mailbox-relay") or "mailbox-relay"


@contextmanager
def nginx_204(workers: int = 2) -> Iterator[str]:
    """nginx answering 204 to everything, the fastest ingress there is; yields the relay URL."""
    if shutil.which("nginx") is None:
        sys.exit("needs nginx (apt-get install nginx-light)")
    directory = Path(tempfile.mkdtemp(prefix="mailbox-relay-bench-"))
    port = free_port()
    (directory / "nginx.conf").write_text(
        f"daemon off;\nworker_processes {workers};\npid {directory}/nginx.pid;\n"
        f"error_log {directory}/error.log;\nevents {{ worker_connections 4096; }}\n"
        "http {\n  access_log off;\n"
        f"  client_body_temp_path {directory}/body;\n  client_max_body_size 200m;\n"
        "  keepalive_requests 1000000;\n"
        f"  server {{ listen 127.0.0.1:{port}; location / {{ return 204; }} }}\n}}\n"
    )
    process = subprocess.Popen(["nginx", "-c", str(directory / "nginx.conf")])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}{RELAY_PATH}"
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


def timed(
    command: Sequence[str],
    *,
    stdin: bytes = b"",
    env: Optional[Dict[str, str]] = None,
    shell: bool = False,
    cwd: Optional[Path] = None,
) -> float:
    """Wall seconds of one run of a command (which must succeed)."""
    started = time.perf_counter()
    result = subprocess.run(
        command if not shell else command[0],
        input=stdin,
        env=env,
        shell=shell,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{command} exited {result.returncode}: {result.stderr.decode()[:300]}")
    return elapsed


def alternate(runs: int, contenders: Dict[str, Callable[[], float]]) -> Dict[str, List[float]]:
    """Run each contender once per round, in turn, `runs` rounds; returns all times."""
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, run in contenders.items():
            times[name].append(run())
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return (
        f"{platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}, commit {commit or '?'}"
    )


def peak_rss_mb(
    command: Sequence[str], *, stdin_path: Optional[str] = None, env: Optional[Dict[str, str]] = None
) -> Tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a command, from the kernel's rusage of that child."""
    with open(stdin_path or os.devnull, "rb") as stdin:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, stdin=stdin, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        assert process.stderr is not None
        errors = process.stderr.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{command} exited {process.returncode}: {errors.decode()[-300:]}")
    return elapsed, usage.ru_maxrss / 1024
