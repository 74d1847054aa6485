"""watch on one event loop, for real: SIGHUP adds, removes and changes accounts without touching
the others, a broken config changes nothing; two shards deliver every account's mail once;
20 resets in a row neither spin nor grow the process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import pytest

from ..helpers import wait_for
from ..peers import FaultProxy, Ingress204
from .world import Dovecot, message


@pytest.fixture
def ingress() -> Iterator[Ingress204]:
    with Ingress204() as server:
        yield server


class Accounts:
    """Several Dovecot users as [accounts.NAME] tables of one config file."""

    def __init__(self, dovecot: Dovecot, tmp: Path, url: str) -> None:
        self.dovecot = dovecot
        self.tmp = tmp
        self.url = url
        self.config = tmp / "config.toml"
        self.users: Dict[str, str] = {}
        self.tables: Dict[str, Dict[str, object]] = {}

    def add(self, name: str, **keys: object) -> str:
        user = self.users.get(name) or self.dovecot.new_user()
        self.users[name] = user
        self.tables[name] = {
            "host": "127.0.0.1",
            "port": self.dovecot.port,
            "tls": "none",
            "username": user,
            "password": f"secret-{user}",
            "start": "new",
            **keys,
        }
        return user

    def write(self, extra: str = "") -> None:
        lines = [f'url = "{self.url}"', 'password = "pw"', f'fetch_state = "{self.tmp / "state.sqlite3"}"']
        lines.append("retry_for = 0")
        for name, table in self.tables.items():
            lines += ["", f"[accounts.{name}]"]
            lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
        self.config.write_text("\n".join(lines) + "\n" + extra)

    def append(self, name: str, raw: bytes) -> None:
        self.dovecot.append(self.users[name], [raw])


class Watching:
    def __init__(self, accounts: Accounts, *args: str, state: str = "") -> None:
        self.log = accounts.tmp / f"watch-{time.monotonic_ns()}.log"
        env = {**os.environ, "MAILBOX_RELAY_CONFIG": str(accounts.config)}
        if state:
            env["MAILBOX_RELAY_FETCH_STATE"] = state
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mailbox_relay", "watch", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition: Callable[[], object], seconds: float = 20) -> None:
        try:
            wait_for(condition, seconds)
        except AssertionError:
            raise AssertionError(f"timed out; watch said:\n{self.text()}") from None

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(10)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def socket_fds(pid: int) -> List[str]:
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return [link for link in links if link.startswith("socket:")]


def status_of(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(key)


def test_sighup_adds_removes_and_changes_accounts_and_keeps_the_others(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    accounts = Accounts(dovecot, tmp_path, ingress.url)
    for name in ("kept", "removed", "changed"):
        accounts.add(name)
    accounts.write()
    watch = Watching(accounts)
    try:
        watch.wait_for(lambda: watch.text().count("waiting for new mail") == 3)
        accounts.append("kept", message("kept before"))
        watch.wait_for(lambda: message("kept before") in ingress.bodies)
        # added, removed and changed (idle_refresh is a key that needs a new connection)
        del accounts.tables["removed"]
        accounts.add("changed", idle_refresh=30)
        accounts.add("added")
        accounts.write()
        watch.process.send_signal(signal.SIGHUP)
        watch.wait_for(lambda: "reload: 1 added, 1 removed, 1 changed; 1 unchanged" in watch.text())
        watch.wait_for(lambda: watch.text().count("waiting for new mail") == 5)
        assert watch.text().count("kept/INBOX: connected") == 1, watch.text()  # kept its connection
        for name in ("kept", "changed", "added", "removed"):
            accounts.append(name, message(f"{name} after"))
        watch.wait_for(
            lambda: {message(f"{n} after") for n in ("kept", "changed", "added")} <= set(ingress.bodies)
        )
        # a config that no longer parses changes nothing, and says why in one line
        accounts.config.write_text(accounts.config.read_text() + "\n[accounts.broken\n")
        watch.process.send_signal(signal.SIGHUP)
        watch.wait_for(lambda: "reload: the config was not changed: cannot read config file" in watch.text())
        accounts.append("kept", message("kept after a broken reload"))
        watch.wait_for(lambda: message("kept after a broken reload") in ingress.bodies)
        time.sleep(1)
        assert message("removed after") not in ingress.bodies
        assert sorted(set(ingress.bodies)) == sorted(ingress.bodies), "something was delivered twice"
        assert watch.process.poll() is None
        assert watch.stop() == 0
    finally:
        watch.kill()


def test_two_shards_deliver_every_accounts_mail_once(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    accounts = Accounts(dovecot, tmp_path, ingress.url)
    names = [f"shard-account-{n}" for n in range(6)]
    for name in names:
        accounts.add(name)
    accounts.write()
    # each shard its own state file, as on two hosts
    shards = [
        Watching(accounts, "--shard", f"{k}/2", state=str(tmp_path / f"state-{k}.sqlite3")) for k in (0, 1)
    ]
    try:
        for shard in shards:
            shard.wait_for(lambda shard=shard: "shard " in shard.text())  # type: ignore[misc]
        watched = [int(shard.text().split("/2: watching ")[1].split(" of")[0]) for shard in shards]
        assert sum(watched) == len(names) and all(watched), watched
        for shard, count in zip(shards, watched):
            shard.wait_for(lambda s=shard, c=count: s.text().count("waiting for new mail") == c)  # type: ignore[misc]
        raws = {name: message(f"to {name}") for name in names}
        for name, raw in raws.items():
            accounts.append(name, raw)
        wait_for(lambda: len(ingress.bodies) >= len(names), 20)
        time.sleep(1)
        assert sorted(ingress.bodies) == sorted(raws.values())
        assert all(shard.stop() == 0 for shard in shards)
    finally:
        for shard in shards:
            shard.kill()


def test_twenty_resets_neither_spin_nor_grow_the_watch(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    with FaultProxy(dovecot.port) as proxy:
        accounts = Accounts(dovecot, tmp_path, ingress.url)
        accounts.add("box", port=proxy.port)
        accounts.write()
        watch = Watching(accounts)
        try:
            watch.wait_for(lambda: "waiting for new mail" in watch.text())
            pid = watch.process.pid
            before = cpu_seconds(pid)
            for n in range(22):
                if n == 2:  # each pool has started its thread (and its state connection): the baseline
                    sockets, threads = len(set(socket_fds(pid))), status_of(pid, "Threads")
                    rss = status_of(pid, "VmRSS")
                time.sleep(0.3)
                getattr(proxy, "rst" if n % 2 else "fin")()
                watch.wait_for(lambda n=n: watch.text().count("waiting for new mail") >= n + 2)  # type: ignore[misc]
            accounts.append("box", message("after 20 resets"))
            watch.wait_for(lambda: message("after 20 resets") in ingress.bodies, 10)
            used = cpu_seconds(pid) - before
            assert used < 5.0, f"{used:.2f}s of CPU for 20 reconnects\n{watch.text()}"
            # No connection left behind: one to Dovecot, plus the ingress's keep-alive one (the
            # baseline was taken before any post). Counted by socket, not descriptor: a command
            # in flight holds a second descriptor of its socket for its deadline (deadline.py).
            wait_for(lambda: len(set(socket_fds(pid))) <= sockets + 1, 5)
            assert status_of(pid, "Threads") <= threads + 2  # a pool may have started one more
            assert status_of(pid, "VmRSS") < rss + 20_000, (rss, status_of(pid, "VmRSS"))
            assert ingress.bodies == [message("after 20 resets")]
            assert watch.stop() == 0
        finally:
            watch.kill()
