"""A POP3 backlog drained by `fetch` (source = "pop3", after = "delete") against getmail6.

Run by hand as root (Dovecot stores mail as an unprivileged user the script creates); needs
dovecot-imapd, dovecot-pop3d, getmail6 and nginx:

    python bench/pop3.py --messages 2000 --getmail-messages 200 --runs 3

Each round fills one Dovecot user with --messages messages (IMAP APPEND, not timed) and times
`mailbox-relay fetch` draining them over Dovecot's POP3 listener into the nginx 204 stub (a fresh
state each run, `start = "all"`, `after = "delete"`: RETR, post, DELE after the 2xx, QUIT); then
fills another user with --getmail-messages and times getmail6 (SimplePOP3Retriever, `delete =
true`, a fresh oldmail directory) running `mailbox-relay deliver` as its MDA, one process per
message, into the same stub. getmail + deliver manages a few messages a second, so it gets the
smaller backlog and the two are compared as messages per second (medians of the alternating
rounds). Both must leave their mailbox empty, or the run fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PASSWORD, alternate, machine, median, nginx_204, relay_script
from bench.fetch import fill
from tests.e2e.world import Dovecot


def fetch_seconds(directory: Path, url: str, dovecot: Dovecot, user: str, count: int) -> float:
    fill(dovecot, user, count)
    (directory / "state.sqlite3").unlink(missing_ok=True)
    path = directory / "config.toml"
    path.write_text(
        f'url = "{url}"\npassword = "{PASSWORD}"\nfetch_state = "{directory}/state.sqlite3"\n'
        f'[accounts.{user}]\nsource = "pop3"\nhost = "127.0.0.1"\nport = {dovecot.pop3_port}\n'
        f'tls = "none"\nusername = "{user}"\npassword = "secret-{user}"\nstart = "all"\n'
        'after = "delete"\n'
    )
    started = time.perf_counter()
    subprocess.run([relay_script(), "fetch", "-q", "--config", str(path)], check=True)
    elapsed = time.perf_counter() - started
    left = dovecot.count(user)
    if left:
        raise RuntimeError(f"fetch left {left} of {count} messages on the server")
    return elapsed


def getmail_seconds(directory: Path, url: str, dovecot: Dovecot, user: str, count: int) -> float:
    fill(dovecot, user, count)
    run = directory / "getmail"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    (run / "getmailrc").write_text(
        "[retriever]\ntype = SimplePOP3Retriever\n"
        f"server = 127.0.0.1\nport = {dovecot.pop3_port}\nusername = {user}\npassword = secret-{user}\n\n"
        "[destination]\ntype = MDA_external\n"
        f'path = {relay_script()}\narguments = ("deliver",)\nallow_root_commands = true\n\n'
        "[options]\nread_all = true\ndelete = true\ndelivered_to = false\nreceived = false\nverbose = 0\n"
    )
    env = {**os.environ, "MAILBOX_RELAY_URL": url, "MAILBOX_RELAY_PASSWORD": PASSWORD}
    started = time.perf_counter()
    subprocess.run(["getmail", "--getmaildir", str(run), "--rcfile", "getmailrc"], env=env, check=True)
    elapsed = time.perf_counter() - started
    left = dovecot.count(user)
    if left:
        raise RuntimeError(f"getmail left {left} of {count} messages on the server")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="fetch's backlog per run")
    parser.add_argument("--getmail-messages", type=int, default=200, help="getmail's backlog per run")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("getmail") is None:
        sys.exit("needs getmail6 (apt-get install getmail6)")
    directory = Path(tempfile.mkdtemp(prefix="mailbox-relay-bench-pop3-"))
    directory.chmod(0o755)  # Dovecot reads its users' mail as an unprivileged user
    dovecot = Dovecot(directory / "dovecot")
    dovecot.start()
    try:
        with nginx_204() as url:
            ours, theirs = dovecot.new_user(), dovecot.new_user()
            times = alternate(
                args.runs,
                {
                    "fetch": lambda: fetch_seconds(directory, url, dovecot, ours, args.messages),
                    "getmail": lambda: getmail_seconds(
                        directory, url, dovecot, theirs, args.getmail_messages
                    ),
                },
            )
    finally:
        dovecot.stop()
        shutil.rmtree(directory, ignore_errors=True)
    fetch_rate = args.messages / median(times["fetch"])
    getmail_rate = args.getmail_messages / median(times["getmail"])
    print(machine())
    print(f"POP3 backlog drained with delete, medians of {args.runs} alternating runs, messages/s:")
    print(f"  fetch    {fetch_rate:8.1f}  ({args.messages} messages; runs {_seconds(times['fetch'])})")
    print(
        f"  getmail  {getmail_rate:8.1f}  (getmail6 SimplePOP3Retriever + deliver, "
        f"{args.getmail_messages} messages; runs {_seconds(times['getmail'])})"
    )
    print(f"  fetch / getmail = {fetch_rate / getmail_rate:.0f}x")


def _seconds(values: List[float]) -> str:
    return ", ".join(f"{value:.1f} s" for value in values)


if __name__ == "__main__":
    main()
