"""The real world the end-to-end tests start: Dovecot IMAP, a Rails Action Mailbox app, and the
programs that call mailbox-relay (getmail6, fetchmail, procmail). All on 127.0.0.1."""

from __future__ import annotations

import imaplib
import json
import os
import pwd
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

from ..peers import free_port

MAIL_USER = "mrvmail"  # Dovecot refuses to store mail as uid 0
TEMPLATE_VERSION = "4"  # bump when the app template below changes


def need(*programs: str) -> None:
    """Skip (a failure under CI=true) when a peer program is missing."""
    missing = [program for program in programs if shutil.which(program) is None]
    if missing:
        pytest.skip(
            f"needs {', '.join(missing)} (Debian: apt-get install getmail6 fetchmail procmail "
            "dovecot-imapd ruby-rails ruby-sqlite3 puma)"
        )


def relay_command() -> str:
    """The installed mailbox-relay console script (not a pyenv shim: procmail clears PATH)."""
    beside = Path(sys.executable).with_name("mailbox-relay")
    if beside.exists():
        return str(beside)
    found = shutil.which("mailbox-relay")
    if not found:
        pytest.skip("mailbox-relay is not installed: pip install -e .")
    return found


def wait_for_port(port: int, process: subprocess.Popen[bytes], seconds: float, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listened on port {port} within {seconds}s: {log.read_text()[-2000:]}")


def message(subject: str, *, to: str = "support@example.com", extra: str = "") -> bytes:
    return (
        f"From: Sender <sender@example.com>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@e2e.example>\r\n{extra}\r\nHello from {subject}.\r\n"
    ).encode()


# --- Dovecot ------------------------------------------------------------------------------------


class Dovecot:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.passwd = root / "passwd"
        self.users = 0
        self.process: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> None:
        _ensure_mail_user()
        for sub in ("run", "home"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        shutil.chown(self.root / "home", MAIL_USER, MAIL_USER)
        # All users exist from the start: Dovecot caches passwd-file by mtime, so users added
        # within the same second may not be seen.
        self.passwd.write_text("".join(f"user{n}:{{PLAIN}}secret-user{n}\n" for n in range(1, 101)))
        config = self.root / "dovecot.conf"
        config.write_text(_DOVECOT_CONF.format(root=self.root, port=self.port, user=MAIL_USER))
        log = self.root / "dovecot.out"
        self.process = subprocess.Popen(
            ["dovecot", "-F", "-c", str(config)], stdout=log.open("wb"), stderr=subprocess.STDOUT
        )
        wait_for_port(self.port, self.process, 30, log)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)

    def new_user(self) -> str:
        """A fresh mailbox per test, so counts never leak between tests."""
        self.users += 1
        return f"user{self.users}"

    def imap(self, user: str) -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.port)
        client.login(user, f"secret-{user}")
        return client

    def append(self, user: str, messages: Sequence[bytes]) -> None:
        client = self.imap(user)
        for raw in messages:
            client.append("INBOX", None, None, raw)
        client.logout()

    def count(self, user: str) -> int:
        client = self.imap(user)
        status, data = client.select("INBOX")
        client.logout()
        assert status == "OK"
        return int(data[0] or 0)


_DOVECOT_CONF = """
protocols = imap
listen = 127.0.0.1
base_dir = {root}/run
instance_name = mailbox-relay-e2e-{port}
log_path = {root}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{root}/home/%u/Maildir
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={user} gid={user} home={root}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
}}
"""


def _ensure_mail_user() -> None:
    try:
        pwd.getpwnam(MAIL_USER)
    except KeyError:
        if os.geteuid() != 0:
            pytest.skip(f"needs a system user {MAIL_USER} for Dovecot's mail (run as root to create it)")
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", MAIL_USER],
            check=True,
        )


# --- Rails -------------------------------------------------------------------------------------

_RAILS_NEW = [
    "rails",
    "new",
    "app",
    "--skip-bundle",
    "--skip-git",
    "--skip-javascript",
    "--skip-webpack-install",
    "--skip-action-cable",
    "--skip-sprockets",
    "--skip-spring",
    "--skip-listen",
    "--skip-bootsnap",
    "--skip-test",
    "--skip-system-test",
    "--skip-turbolinks",
    "--skip-jbuilder",
    "--skip-action-text",
    "--database=sqlite3",
]

_GEMFILE = "source 'https://rubygems.org'\ngem 'rails', '~> 6.1.7'\ngem 'sqlite3', '~> 1.4'\ngem 'puma'\n"

# Some Debian gem packages (ruby-sqlite3 1.4.2-4+b3) ship a gemspec whose gem directory does not
# exist; Bundler then takes the gem for deleted and `bundle install --local` fails with "Could not
# find sqlite3-1.4.2.gem for installation". An empty directory is all Bundler looks for.
_DEBIAN_GEM_DIRS = (
    'Gem::Specification.each { |s| next unless s.loaded_from.to_s.include?("rubygems-integration"); '
    "FileUtils.mkdir_p(s.full_gem_path) unless File.directory?(s.full_gem_path) }"
)

_DEVELOPMENT_EXTRA = """
Rails.application.configure do
  # E2E_INGRESS=none starts the app without the relay ingress (it then answers 404).
  config.action_mailbox.ingress = ENV.fetch("E2E_INGRESS", "relay").to_sym
  config.hosts.clear
  # Route inside the request. With the default :async adapter, the routing job's UPDATE races
  # the request's own Active Storage transaction on SQLite and sometimes fails after the 5 s
  # busy timeout even for one message at a time ("database is locked"): the email is stored
  # (204) but never routed, which would make routing assertions flaky for reasons of Rails'.
  # (E2E_JOBS=async gives Rails' default adapter back, to see that race for yourself.)
  config.active_job.queue_adapter = ENV.fetch("E2E_JOBS", "inline").to_sym
  config.action_mailbox.incinerate = false  # :inline cannot schedule the 30-day incineration
end
"""

_APPLICATION_MAILBOX = """class ApplicationMailbox < ActionMailbox::Base
  routing :all => :recorder
end
"""

# Records what Rails routed, so tests assert what the app saw, not only what it answered.
_RECORDER_MAILBOX = """require "json"

class RecorderMailbox < ApplicationMailbox
  def process
    File.open(Rails.root.join("log", "routed.jsonl"), "a") do |file|
      file.flock(File::LOCK_EX)
      file.puts({message_id: mail.message_id, recipients: mail.recipients, subject: mail.subject,
                 size: inbound_email.source.bytesize}.to_json)
    end
  end
end
"""


def rails_version() -> str:
    out = subprocess.run(["rails", "--version"], capture_output=True, text=True, check=True).stdout
    return out.split()[-1]


def build_app_template(cache: Path) -> Path:
    """`rails new` plus Action Mailbox, cached per Rails version: later runs only copy it."""
    template = cache / f"rails-{rails_version()}-t{TEMPLATE_VERSION}"
    if (template / "app" / "db" / "development.sqlite3").exists():
        return template / "app"
    building = Path(tempfile.mkdtemp(dir=cache))

    def run(args: List[str], cwd: Path = building) -> None:
        subprocess.run(args, cwd=cwd, check=True, capture_output=True, timeout=300)

    run(_RAILS_NEW)
    app = building / "app"
    (app / "Gemfile").write_text(_GEMFILE)
    (app / "Gemfile.lock").unlink(missing_ok=True)
    run(["ruby", "-rfileutils", "-e", _DEBIAN_GEM_DIRS])
    run(["bundle", "install", "--local"], cwd=app)
    run(["bin/rails", "action_mailbox:install"], cwd=app)
    run(["bin/rails", "db:migrate"], cwd=app)
    with (app / "config" / "environments" / "development.rb").open("a") as handle:
        handle.write(_DEVELOPMENT_EXTRA)
    (app / "app" / "mailboxes" / "application_mailbox.rb").write_text(_APPLICATION_MAILBOX)
    (app / "app" / "mailboxes" / "recorder_mailbox.rb").write_text(_RECORDER_MAILBOX)
    shutil.rmtree(template, ignore_errors=True)
    building.rename(template)
    return template / "app"


class RailsApp:
    def __init__(self, root: Path, password: str = "e2e-ingress-password") -> None:
        self.root = root
        self.password = password
        self.url = ""  # of the relay-configured server, once started
        self.servers: List[subprocess.Popen[bytes]] = []

    def serve(self, *, ingress: str = "relay", jobs: str = "inline", password: str = "") -> str:
        """Start `bin/rails server` (puma) on a free port; returns the base URL."""
        port = free_port()
        log = self.root / "log" / f"server-{port}.out"
        log.parent.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "RAILS_INBOUND_EMAIL_PASSWORD": password or self.password,
            "E2E_INGRESS": ingress,
            "E2E_JOBS": jobs,
        }
        process = subprocess.Popen(
            ["bin/rails", "server", "-b", "127.0.0.1", "-p", str(port), "-P", f"tmp/pids/{port}.pid"],
            cwd=self.root,
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.servers.append(process)
        wait_for_port(port, process, 90, log)
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        for process in self.servers:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.root / "db" / "development.sqlite3", timeout=30)

    def stored(self) -> int:
        """Inbound emails stored: what 'delivered' means (routing may fail later on SQLite)."""
        with self._db() as db:
            return int(db.execute("SELECT count(*) FROM action_mailbox_inbound_emails").fetchone()[0])

    def stored_message_ids(self) -> List[str]:
        with self._db() as db:
            rows = db.execute("SELECT message_id FROM action_mailbox_inbound_emails ORDER BY id")
            return [str(row[0]) for row in rows]

    def routed(self, expected: int = 0, seconds: float = 20) -> List[Dict[str, object]]:
        """What the recorder mailbox saw; waits until `expected` entries (routing is async)."""
        path = self.root / "log" / "routed.jsonl"
        deadline = time.monotonic() + seconds
        while True:
            lines = path.read_text().splitlines() if path.exists() else []
            if len(lines) >= expected or time.monotonic() > deadline:
                return [json.loads(line) for line in lines]
            time.sleep(0.1)

    def reset(self) -> None:
        with self._db() as db:
            db.execute("DELETE FROM action_mailbox_inbound_emails")
        (self.root / "log" / "routed.jsonl").unlink(missing_ok=True)
