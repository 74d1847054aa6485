"""`watch` at scale: N accounts on one private Dovecot, idle, new mail, resets, SIGTERM (issue 20).

Run by hand as root (Dovecot stores mail as an unprivileged user; the kernel limit below is a
sysctl); needs dovecot-imapd:

    python bench/watch_scale.py                  # N = 100, then 1,000 (about 3 minutes each)
    python bench/watch_scale.py --n 10000        # 10,000 only: long, and Dovecot needs GBs

For each N, one config with N `[accounts.uNNNNN]` tables (start = "new", tls = "none",
127.0.0.1), each its own Dovecot user, posting into an in-process 204 ingress that notes when
each Message-ID arrived; `mailbox-relay watch` runs as a subprocess. The first --faulty accounts
reach Dovecot through tests/peers.FaultProxy, the rest directly. Measured:

- connected: from starting watch to its Nth "caught up; waiting for new mail" line;
- idle: VmRSS and Threads from /proc/PID/status, CPU (utime + stime from /proc/PID/stat) over
  --idle seconds (30) once everything is connected;
- latency: 100 messages appended one at a time to random accounts, from the end of each APPEND
  to the POST arriving: p50 / p95 (an imap process delays IDLE news by 0.5 s, a hibernated
  connection does not: see imap_hibernate_timeout below);
- RST, then FIN, of every proxied connection: the latency of a message appended at once to a
  proxied account, and watch's CPU in the 10 s after the fault;
- 20 reset cycles (FIN and RST in turn, each waiting until every proxied folder has caught up
  again): Threads and VmRSS before, after 2, 10 and 20 cycles. Not growing means: threads
  within the pools' fixed ceiling (they start lazily, so 10 folders reconnecting at once may add
  login threads) and RSS up by at most 1 MB from cycle 10 to 20;
- SIGTERM: until the process has exited.

A message that has not arrived 30 s after its APPEND counts as missing (latency inf, and a
MISSED line); before SIGTERM the script waits up to 100 s more (past idle_refresh) and notes
when each came, if it did, with watch's last log lines on that account.

It prints each figure against issue 20's targets (met / missed). Figures are medians or single
runs on whatever machine this is: on a shared machine read them as such.

What Dovecot and the kernel need for N idle connections, and why (set for the run only):

- fs.inotify.max_user_instances (sysctl, default 128), raised to N + 1024 and restored at the
  end: every IDLE connection's imap process (or imap-hibernate, which inherits its fd) keeps one
  inotify instance, all under the one mail user's uid. Past the limit Dovecot logs "Inotify
  instance limit for user ... exceeded" and falls back to looking at the mailbox every
  mailbox_idle_check_interval (30 s): latency would then measure Dovecot's polling, not watch.
  max_user_watches (a few per connection) is raised too if it is below 8 per account. If the
  sysctl is refused (a container), the script says so and the latency at large N is not valid.
- default_process_limit (100) and service imap's process_limit (1024): one imap process per
  logged-in connection until it hibernates, and login processes during reconnect storms; past
  the limit Dovecot queues logins ("process_limit reached"). Set to N + 1024.
- default_client_limit (1000): auth and anvil take a client per login process (imap, pop3 and
  imap-urlauth, each up to its process limit), log one per process, imap-hibernate one per
  hibernated connection; Dovecot warns at start when they are too low. Set to 4 (N + 1024).
- imap_hibernate_timeout = 5s (--hibernate; 0 turns it off): a connection idle in IDLE for 5 s
  moves to the imap-hibernate process, which keeps it (and its inotify fd) in a few KB instead
  of an imap process of a few MB, and hands it back to an imap process when the mailbox changes
  or the client speaks. This is what makes 10,000 IDLE connections fit on one host; it is on at
  every N so the runs are alike. Its two UNIX sockets are opened to the mail user and Dovecot's
  internal user. A side effect: a hibernated connection is woken at once, without the 0.5 s
  NOTIFY_DELAY_MSECS an imap process waits before it sends news, so latencies are ~0.5 s lower
  than with --hibernate 0 (bench/fetch.py's watch latency is the unhibernated case).
- RLIMIT_NOFILE: watch holds a socket per account; the soft limit is raised to the hard one
  for the children (the script says so if that is below N + 256).
"""

from __future__ import annotations

import argparse
import itertools
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PASSWORD, machine, relay_script
from bench.fetch import Recorder, small_message
from mailbox_relay.fetch.watch import ROUND_TRIPS
from mailbox_relay.settings import WatchSettings
from tests.e2e.world import _DOVECOT_CONF, MAIL_USER, Dovecot, ensure_user, wait_for_port
from tests.peers import FaultProxy

CAUGHT_UP = "caught up; waiting for new mail"
NOTIFY_DELAY = 0.5  # Dovecot's NOTIFY_DELAY_MSECS: IDLE news is sent 0.5 s after the change
INOTIFY = Path("/proc/sys/fs/inotify")
# watch's threads at most: the main one, the login pool (logins, 20), the IDLE/NOOP pool
# (ROUND_TRIPS, 16) and the pass pool (jobs, 4), all at their defaults.
CEILING = 1 + WatchSettings.logins.default + ROUND_TRIPS + WatchSettings.jobs.default
TICKS = 100.0  # USER_HZ, the unit of utime and stime in /proc/PID/stat (100 on Linux)

_SCALE_CONF = """
default_process_limit = {processes}
default_client_limit = {clients}
service imap {{
  process_limit = {processes}
  unix_listener imap-master {{
    user = $default_internal_user
    mode = 0600
  }}
  extra_groups = $default_internal_group
}}
imap_hibernate_timeout = {hibernate}s
service imap-hibernate {{
  unix_listener imap-hibernate {{
    mode = 0660
    group = $default_internal_group
  }}
}}
"""


class ScaleDovecot(Dovecot):
    """tests/e2e/world.Dovecot with `size` users (u00001 ...) and limits raised for them."""

    def __init__(self, root: Path, size: int, hibernate: int) -> None:
        super().__init__(root)
        self.size = size
        self.hibernate = hibernate

    def start(self) -> None:
        ensure_user(MAIL_USER)
        for sub in ("run", "home"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        shutil.chown(self.root / "home", MAIL_USER, MAIL_USER)
        self.passwd.write_text("".join(f"{user}:{{PLAIN}}secret-{user}\n" for user in self.names()))
        config = self.root / "dovecot.conf"
        text = _DOVECOT_CONF.format(root=self.root, port=self.port, pop3_port=self.pop3_port, user=MAIL_USER)
        processes = self.size + 1024  # the imap-login, pop3-login and auth processes count too
        text += _SCALE_CONF.format(processes=processes, clients=4 * processes, hibernate=self.hibernate)
        config.write_text(text)
        log = self.root / "dovecot.out"
        self.process = subprocess.Popen(
            ["dovecot", "-F", "-c", str(config)], stdout=log.open("wb"), stderr=subprocess.STDOUT
        )
        wait_for_port(self.port, self.process, 30, log)

    def names(self, count: Optional[int] = None) -> List[str]:
        return [f"u{n:05d}" for n in range(1, (count or self.size) + 1)]

    def complaints(self) -> List[str]:
        """Dovecot's log lines that would make the figures wrong (limits hit, polling)."""
        words = ("inotify", "limit", "fatal", "panic", "error")
        lines = (self.root / "dovecot.log").read_text(errors="replace").splitlines()
        return [line for line in lines if any(word in line.lower() for word in words)]


def raise_inotify(accounts: int) -> Dict[str, int]:
    """Raise the per-uid inotify limits for `accounts` IDLE connections; returns the old values."""
    wanted = {"max_user_instances": accounts + 1024, "max_user_watches": 8 * accounts + 8192}
    old: Dict[str, int] = {}
    for name, value in wanted.items():
        current = int((INOTIFY / name).read_text())
        if current >= value:
            continue
        try:
            (INOTIFY / name).write_text(str(value))
            old[name] = current
        except OSError as error:
            print(f"warning: cannot raise fs.inotify.{name} ({current}) to {value}: {error};")
            print("  past the limit Dovecot polls every 30 s and the latencies are not watch's")
    return old


def restore_inotify(old: Dict[str, int]) -> None:
    for name, value in old.items():
        (INOTIFY / name).write_text(str(value))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime and stime: fields 14 and 15


def status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def percentile(values: List[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def wait_until(what: Callable[[], bool], seconds: float, failure: Callable[[], str]) -> None:
    deadline = time.monotonic() + seconds
    while not what():
        if time.monotonic() > deadline:
            raise RuntimeError(failure())
        time.sleep(0.05)


class Run:
    """One watch over the first `size` users of the Dovecot, and what it measured."""

    def __init__(self, directory: Path, dovecot: ScaleDovecot, size: int, faulty: int, seed: int) -> None:
        self.dovecot = dovecot
        self.size = size
        self.users = dovecot.names(size)
        self.faulty = self.users[:faulty]
        self.random = random.Random(seed)
        self.numbers = itertools.count(1)
        self.recorder = Recorder()
        self.proxy = FaultProxy(dovecot.port)
        self.proxy.start()
        self.log = directory / f"watch-{size}.log"
        self.config = directory / f"config-{size}.toml"
        self.state = directory / f"state-{size}.sqlite3"
        self.figures: Dict[str, float] = {}
        self.appended: Dict[bytes, Tuple[str, float]] = {}  # Message-ID: its user, when appended
        self.notes: List[str] = []
        self.process: Optional[subprocess.Popen[bytes]] = None

    def write_config(self) -> None:
        lines = [f'url = "{self.recorder.url}"', f'password = "{PASSWORD}"', f'fetch_state = "{self.state}"']
        for user in self.users:
            port = self.proxy.port if user in self.faulty else self.dovecot.port
            lines += [
                "",
                f"[accounts.{user}]",
                'host = "127.0.0.1"',
                f"port = {port}",
                'tls = "none"',
                f'username = "{user}"',
                f'password = "secret-{user}"',
                'start = "new"',
            ]
        self.config.write_text("\n".join(lines) + "\n")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def caught_up(self) -> int:
        return self.text().count(CAUGHT_UP)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def tail(self) -> str:
        return "watch's log ends:\n" + self.text()[-2000:]

    def measure(self, idle: float, messages: int, cycles: int) -> Dict[str, float]:
        self.write_config()
        started = time.monotonic()
        self.process = subprocess.Popen(
            [relay_script(), "watch", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
        )
        try:
            wait_until(lambda: self.caught_up() >= self.size, 60 + self.size / 10, self.tail)
            self.figures["connected_s"] = time.monotonic() - started
            self.idle(idle)
            seconds = [self.deliver(self.random.choice(self.users)) for _ in range(messages)]
            self.figures["latency_p50_s"] = statistics.median(seconds)
            self.figures["latency_p95_s"] = percentile(seconds, 0.95)
            self.figures["latency_max_s"] = max(seconds)
            self.figures["latency_missing"] = sum(1 for value in seconds if value == float("inf"))
            for kind in ("rst", "fin"):
                self.fault(kind)
            self.resets(cycles)
            self.late(100)  # past idle_refresh (90 s), whose pass would find a missed message
            self.terminate()
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.recorder.server.shutdown()
            self.proxy.__exit__()
        self.notes += [f"watch: {line}" for line in self.text().splitlines() if "internal error" in line]
        return self.figures

    def idle(self, seconds: float) -> None:
        time.sleep(6)  # the first heartbeats are written, and Dovecot hibernates the connections
        before = cpu_seconds(self.pid)
        time.sleep(seconds)
        self.figures["idle_cpu_pct"] = 100 * (cpu_seconds(self.pid) - before) / seconds
        self.figures["idle_rss_mb"] = status(self.pid, "VmRSS") / 1024
        self.figures["idle_threads"] = status(self.pid, "Threads")

    def deliver(self, user: str, wait: float = 30) -> float:
        """Append one message to `user`: seconds from the end of the APPEND to its arrival."""
        number = next(self.numbers)
        client = self.dovecot.imap(user)
        client.append("INBOX", None, None, small_message(number))
        appended = time.monotonic()
        client.logout()
        key = f"bench-{number}@example.com".encode()
        self.appended[key] = (user, appended)
        while key not in self.recorder.arrivals and time.monotonic() < appended + wait:
            time.sleep(0.002)
        time.sleep(0.05)
        return self.recorder.arrivals.get(key, float("inf")) - appended

    def late(self, wait: float) -> None:
        """Messages that missed their wait: when (or whether) they came, and what watch said."""
        missing = [key for key in self.appended if key not in self.recorder.arrivals]
        deadline = time.monotonic() + wait
        while missing and any(key not in self.recorder.arrivals for key in missing):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for key in missing:
            user, appended = self.appended[key]
            came = self.recorder.arrivals.get(key)
            when = f"arrived after {came - appended:.1f} s" if came else f"had not arrived after {wait:g} s"
            said = [line for line in self.text().splitlines() if f"{user}/" in line]
            self.notes.append(f"{key.decode()} to {user} {when}; watch's last lines on it: {said[-3:]}")

    def fault(self, kind: str) -> None:
        """Break every proxied connection; the next message's latency and the CPU of 10 s."""
        reconnected = self.caught_up() + len(self.faulty)
        cpu = cpu_seconds(self.pid)
        broken = time.monotonic()
        getattr(self.proxy, kind)()
        self.figures[f"{kind}_latency_s"] = self.deliver(self.random.choice(self.faulty))
        time.sleep(max(0.0, broken + 10 - time.monotonic()))
        self.figures[f"{kind}_cpu_pct"] = 100 * (cpu_seconds(self.pid) - cpu) / (time.monotonic() - broken)
        wait_until(lambda: self.caught_up() >= reconnected, 60, self.tail)

    def resets(self, cycles: int) -> None:
        samples: List[Tuple[int, int]] = [(status(self.pid, "Threads"), status(self.pid, "VmRSS"))]
        for n in range(cycles):
            reconnected = self.caught_up() + len(self.faulty)
            getattr(self.proxy, "rst" if n % 2 else "fin")()
            wait_until(lambda reconnected=reconnected: self.caught_up() >= reconnected, 60, self.tail)
            time.sleep(0.3)
            samples.append((status(self.pid, "Threads"), status(self.pid, "VmRSS")))
        for label, index in (("before", 0), ("after2", 2), ("half", cycles // 2), ("after", cycles)):
            self.figures[f"cycles_threads_{label}"] = samples[min(index, cycles)][0]
            self.figures[f"cycles_rss_{label}_mb"] = samples[min(index, cycles)][1] / 1024
        self.figures["cycles_latency_s"] = self.deliver(self.random.choice(self.faulty))

    def terminate(self) -> None:
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(60)
        self.figures["sigterm_s"] = time.monotonic() - started
        if code != 0:
            self.notes.append(f"watch exited {code} after SIGTERM")


def report(size: int, cycles: int, faulty: int, figures: Dict[str, float]) -> None:
    """Print one N's figures, and each of issue 20's targets as met or missed."""
    f = figures
    print(f"\n== {size:,} accounts ({faulty} through the fault proxy) ==")
    print(f"  all connected (caught up) after {f['connected_s']:.1f} s")
    print(
        f"  idle: RSS {f['idle_rss_mb']:.0f} MB, {f['idle_threads']:.0f} threads, "
        f"CPU {f['idle_cpu_pct']:.2f}% of a core"
    )
    print(
        f"  latency APPEND -> POST: p50 {f['latency_p50_s']:.3f} s, p95 {f['latency_p95_s']:.3f} s, "
        f"max {f['latency_max_s']:.3f} s"
    )
    for kind in ("rst", "fin"):
        print(
            f"  after {kind.upper()}: next message in {f[kind + '_latency_s']:.2f} s, "
            f"CPU {f[kind + '_cpu_pct']:.2f}% of a core over the next 10 s"
        )
    labels = ("before", "after2", "half", "after")
    threads = [f[f"cycles_threads_{label}"] for label in labels]
    rss = [f[f"cycles_rss_{label}_mb"] for label in labels]
    print(
        f"  {cycles} reset cycles, before / after 2 / {cycles // 2} / {cycles}: threads "
        + " / ".join(f"{value:.0f}" for value in threads)
        + ", RSS "
        + " / ".join(f"{value:.1f}" for value in rss)
        + f" MB; next message {f['cycles_latency_s']:.2f} s"
    )
    print(f"  SIGTERM: exited after {f['sigterm_s']:.2f} s")
    targets = [
        (
            f"every latency message arrived within 30 s ({f['latency_missing']:.0f} did not; see the notes)",
            f["latency_missing"] == 0,
        ),
        (f"after RST: next message <= 5 s ({f['rst_latency_s']:.2f})", f["rst_latency_s"] <= 5),
        (f"after FIN: next message <= 5 s ({f['fin_latency_s']:.2f})", f["fin_latency_s"] <= 5),
        (f"after RST: CPU < 2% of a core for 10 s ({f['rst_cpu_pct']:.2f}%)", f["rst_cpu_pct"] < 2),
        (f"after FIN: CPU < 2% of a core for 10 s ({f['fin_cpu_pct']:.2f}%)", f["fin_cpu_pct"] < 2),
        # The pools start a thread only when none is free, up to their size: 10 folders that
        # reconnect at once may add login threads now and then, never past the pools' ceiling.
        (
            f"{cycles} cycles: threads within the pools' ceiling of {CEILING} ({threads[3]:.0f})",
            threads[3] <= CEILING,
        ),
        (
            f"{cycles} cycles: RSS does not grow in the second half, +1 MB at most "
            f"({rss[2]:.1f} -> {rss[3]:.1f})",
            rss[3] <= rss[2] + 1,
        ),
    ]
    scale = "10,000" if size >= 10000 else "1,000"
    rss_target, cpu_target = (600, 5.0) if size >= 10000 else (120, 1.0)
    targets += [
        (f"[{scale}] RSS <= {rss_target} MB ({f['idle_rss_mb']:.0f})", f["idle_rss_mb"] <= rss_target),
        (
            f"[{scale}] idle CPU <= {cpu_target:g}% of a core ({f['idle_cpu_pct']:.2f})",
            f["idle_cpu_pct"] <= cpu_target,
        ),
    ]
    if size < 10000:
        targets += [
            (f"[1,000] all connected within 30 s ({f['connected_s']:.1f})", f["connected_s"] <= 30),
            (
                f"[1,000] latency p95 <= notify delay (<= 0.5 s) + 0.5 s ({f['latency_p95_s']:.3f})",
                f["latency_p95_s"] <= NOTIFY_DELAY + 0.5,
            ),
            (f"[1,000] SIGTERM within 3 s ({f['sigterm_s']:.2f})", f["sigterm_s"] <= 3),
        ]
    if size < 1000:
        print("  (the 1,000-account targets, applied to fewer accounts)")
    for what, met in targets:
        print(f"  {'met   ' if met else 'MISSED'}  {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, action="append", help="accounts (repeatable); default 100 and 1000")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measurement")
    parser.add_argument("--messages", type=int, default=100, help="messages for the latency")
    parser.add_argument("--faulty", type=int, default=10, help="accounts behind the fault proxy")
    parser.add_argument("--cycles", type=int, default=20, help="reset cycles")
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument(
        "--hibernate", type=int, default=5, help="Dovecot's imap_hibernate_timeout in seconds (0: off)"
    )
    args = parser.parse_args()
    sizes = args.n or [100, 1000]
    largest = max(sizes)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < largest + 256:
        print(f"warning: RLIMIT_NOFILE is {hard}, watch needs about {largest + 256} descriptors")
    old = raise_inotify(largest)
    directory = Path(tempfile.mkdtemp(prefix="mailbox-relay-bench-watch-scale-"))
    directory.chmod(0o755)  # Dovecot reads its users' mail as an unprivileged user
    dovecot = ScaleDovecot(directory / "dovecot", largest, args.hibernate)
    print(machine())
    results: Dict[int, Dict[str, float]] = {}
    notes: List[str] = []
    try:
        dovecot.start()
        for size in sizes:
            run = Run(directory, dovecot, size, min(args.faulty, size), args.seed)
            results[size] = run.measure(args.idle, args.messages, args.cycles)
            notes += run.notes
            report(size, args.cycles, min(args.faulty, size), results[size])
        complaints = dovecot.complaints()
    finally:
        dovecot.stop()
        restore_inotify(old)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        shutil.rmtree(directory, ignore_errors=True)
    for line in notes:
        print(f"note: {line}")
    if complaints:
        print(f"Dovecot's log has {len(complaints)} lines about limits or errors (the figures may be off):")
        for line in complaints[:10]:
            print(f"  {line}")
    else:
        print("Dovecot's log: no limit reached, no inotify fallback, no errors")


if __name__ == "__main__":
    main()
