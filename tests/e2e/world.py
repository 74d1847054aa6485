"""The real world the end-to-end tests start: Dovecot IMAP, a Rails Action Mailbox app, and the
programs that call mailbox-relay (getmail6, fetchmail, procmail). All on 127.0.0.1."""

from __future__ import annotations

import imaplib
import json
import os
import pwd
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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
    """The real Dovecot on a free port. With `introspection_url`, XOAUTH2 logins are checked by
    Dovecot's own oauth2 passdb, which asks that URL (RFC 7662) about each token."""

    def __init__(self, root: Path, introspection_url: str = "") -> None:
        self.root = root
        self.introspection_url = introspection_url
        self.port = free_port()
        self.pop3_port = free_port()  # the same mailboxes over POP3 (dovecot-pop3d)
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
        text = _DOVECOT_CONF.format(root=self.root, port=self.port, pop3_port=self.pop3_port, user=MAIL_USER)
        if self.introspection_url:
            oauth2 = self.root / "oauth2.conf.ext"
            oauth2.write_text(_OAUTH2_CONF.format(url=self.introspection_url))
            text += _OAUTH2_PASSDB.format(path=oauth2)
        config.write_text(text)
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
protocols = imap pop3
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
    address = 127.0.0.1
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
"""


# Dovecot merges repeated settings: the last auth_mechanisms wins, and passdbs are asked in order
# (the oauth2 one only for the XOAUTH2 and OAUTHBEARER mechanisms).
_OAUTH2_PASSDB = """
auth_mechanisms = plain login xoauth2 oauthbearer
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {path}
}}
"""

_OAUTH2_CONF = """introspection_mode = post
introspection_url = {url}
username_attribute = username
active_attribute = active
active_value = true
"""


def _ensure_mail_user() -> None:
    ensure_user(MAIL_USER)


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
    """`rails new` plus Action Mailbox on SQLite (development), cached per Rails version."""

    def finish(app: Path, run: Callable[[List[str]], None]) -> None:
        run(["bin/rails", "db:migrate"])
        with (app / "config" / "environments" / "development.rb").open("a") as handle:
            handle.write(_DEVELOPMENT_EXTRA)

    return _app_template(cache, "", "--database=sqlite3", _GEMFILE, finish)


def _app_template(
    cache: Path,
    variant: str,
    database: str,
    gemfile: str,
    finish: Callable[[Path, Callable[[List[str]], None]], None],
) -> Path:
    """`rails new` with `database`, Action Mailbox and the recorder mailbox, then the variant's
    own `finish`; built once per Rails version and variant (later runs only copy it)."""
    template = cache / f"rails-{rails_version()}{variant}-t{TEMPLATE_VERSION}"
    if (template / "app" / ".mailbox-relay-complete").exists():
        return template / "app"
    building = Path(tempfile.mkdtemp(dir=cache))

    def run(args: List[str], cwd: Path = building) -> None:
        subprocess.run(args, cwd=cwd, check=True, capture_output=True, timeout=300)

    run([*_RAILS_NEW, database])
    app = building / "app"
    (app / "Gemfile").write_text(gemfile)
    (app / "Gemfile.lock").unlink(missing_ok=True)
    run(["ruby", "-rfileutils", "-e", _DEBIAN_GEM_DIRS])
    run(["bundle", "install", "--local"], cwd=app)
    run(["bin/rails", "action_mailbox:install"], cwd=app)  # copies the migrations
    finish(app, lambda args: run(args, cwd=app))
    (app / "app" / "mailboxes" / "application_mailbox.rb").write_text(_APPLICATION_MAILBOX)
    (app / "app" / "mailboxes" / "recorder_mailbox.rb").write_text(_RECORDER_MAILBOX)
    (app / ".mailbox-relay-complete").touch()
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
            **self.environment(),
            "RAILS_INBOUND_EMAIL_PASSWORD": password or self.password,
            # The same secret for the ingresses that sign instead of using Basic auth.
            "MAILGUN_INGRESS_SIGNING_KEY": password or self.password,
            "MANDRILL_INGRESS_API_KEY": password or self.password,
            "E2E_INGRESS": ingress,
            "E2E_JOBS": jobs,
        }
        process = subprocess.Popen(
            [
                "bin/rails",
                "server",
                *self.server_args,
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "-P",
                f"tmp/pids/{port}.pid",
            ],
            cwd=self.root,
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.servers.append(process)
        wait_for_port(port, process, 90, log)
        return f"http://127.0.0.1:{port}"

    server_args: Tuple[str, ...] = ()

    def environment(self) -> Dict[str, str]:
        """What this app variant needs in its environment (for servers and rake tasks)."""
        return {}

    def stop(self) -> None:
        for process in self.servers:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()

    def query(self, sql: str) -> List[Tuple[str, ...]]:
        """Rows of a query on the app's database, each value as text."""
        with sqlite3.connect(self.root / "db" / "development.sqlite3", timeout=30) as db:
            return [tuple(str(value) for value in row) for row in db.execute(sql).fetchall()]

    def stored(self) -> int:
        """Inbound emails stored: what 'delivered' means (routing may fail later on SQLite)."""
        return int(self.query("SELECT count(*) FROM action_mailbox_inbound_emails")[0][0])

    def stored_message_ids(self) -> List[str]:
        return [
            row[0] for row in self.query("SELECT message_id FROM action_mailbox_inbound_emails ORDER BY id")
        ]

    def sources(self) -> List[bytes]:
        """The raw bytes of each stored inbound email, as Active Storage keeps them on disk."""
        keys = self.query(
            "SELECT b.key FROM action_mailbox_inbound_emails e JOIN active_storage_attachments a "
            "ON a.record_type = 'ActionMailbox::InboundEmail' AND a.record_id = e.id AND "
            "a.name = 'raw_email' JOIN active_storage_blobs b ON b.id = a.blob_id ORDER BY e.id"
        )
        return [(self.root / "storage" / key[:2] / key[2:4] / key).read_bytes() for (key,) in keys]

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
        self.query("DELETE FROM action_mailbox_inbound_emails")
        (self.root / "log" / "routed.jsonl").unlink(missing_ok=True)


# --- a production-shaped app: PostgreSQL, puma workers and threads, background jobs -------------

PG_USER = "mrpostgres"  # initdb refuses to run as root
PG_DATABASE = "mailbox_relay_e2e"

_PG_GEMFILE = "source 'https://rubygems.org'\ngem 'rails', '~> 6.1.7'\ngem 'pg', '~> 1.1'\ngem 'puma'\n"

_PG_DATABASE_YML = """production:
  adapter: postgresql
  encoding: unicode
  host: 127.0.0.1
  port: <%= ENV.fetch("E2E_PG_PORT") %>
  username: app
  database: mailbox_relay_e2e
  # puma's threads plus the :async job adapter's threads, per worker process
  pool: <%= ENV.fetch("RAILS_MAX_THREADS", 5).to_i + 10 %>
"""

_PRODUCTION_EXTRA = """
Rails.application.configure do
  config.action_mailbox.ingress = ENV.fetch("E2E_INGRESS", "relay").to_sym
  config.log_level = :info
  # Rails' default job adapter (:async, in-process threads) routes and incinerates: nothing inline.
end
"""

# config/puma.rb of Rails 6.1 leaves workers commented out: turn them on, as production does.
_PUMA_WORKERS = """
workers ENV.fetch("WEB_CONCURRENCY") { 2 }.to_i
preload_app!
"""


def postgres_bin(program: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{program}"))
    if not found:
        pytest.skip("needs PostgreSQL (Debian: apt-get install postgresql ruby-pg)")
    return str(found[-1])


class Postgres:
    """A private PostgreSQL cluster: initdb into `root` as an unprivileged user, on a free port,
    reachable on 127.0.0.1 by the role `app` without a password (trust, loopback only). Every
    directory above `root` must be one that user may enter (/tmp is)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.data = root / "data"

    def _as_user(self, *args: str) -> None:
        result = subprocess.run(
            ["runuser", "-u", PG_USER, "--", *args], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:  # e.g. a parent directory PG_USER cannot enter
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr.strip()}")

    def start(self) -> None:
        ensure_user(PG_USER)
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.root, PG_USER, PG_USER)
        self._as_user(postgres_bin("initdb"), "-D", str(self.data), "-U", "app", "--auth=trust", "-E", "UTF8")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        log = str(self.root / "postgres.log")
        self._as_user(postgres_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self) -> None:
        if self.data.exists():
            self._as_user(postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def query(self, sql: str) -> List[Tuple[str, ...]]:
        out = subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "app",
                "-d",
                PG_DATABASE,
                "-AtF",
                "\t",
                "-c",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        return [tuple(line.split("\t")) for line in out.splitlines() if line]


def build_postgres_template(cache: Path) -> Path:
    """The same app, production-configured for PostgreSQL; the schema goes into each session's
    own cluster (see PostgresRailsApp.prepare)."""

    def finish(app: Path, run: Callable[[List[str]], None]) -> None:
        (app / "config" / "database.yml").write_text(_PG_DATABASE_YML)
        with (app / "config" / "environments" / "production.rb").open("a") as handle:
            handle.write(_PRODUCTION_EXTRA)
        with (app / "config" / "puma.rb").open("a") as handle:
            handle.write(_PUMA_WORKERS)

    return _app_template(cache, "-pg", "--database=postgresql", _PG_GEMFILE, finish)


class PostgresRailsApp(RailsApp):
    """The same Action Mailbox app, shaped like production: RAILS_ENV=production on PostgreSQL,
    puma with 2 worker processes of 5 threads, and Rails' default :async job adapter routing
    and incinerating in the background."""

    server_args = ("-e", "production")

    def __init__(self, root: Path, database: Postgres, password: str = "e2e-ingress-password") -> None:
        super().__init__(root, password)
        self.database = database

    def environment(self) -> Dict[str, str]:
        return {
            "RAILS_ENV": "production",
            "SECRET_KEY_BASE": "e2e" * 32,
            "E2E_PG_PORT": str(self.database.port),
            "WEB_CONCURRENCY": "2",
            "RAILS_MAX_THREADS": "5",
        }

    def prepare(self) -> None:
        """Create the database and load the schema into this session's cluster."""
        env = {**os.environ, **self.environment()}
        subprocess.run(
            ["bin/rails", "db:create", "db:migrate"],
            cwd=self.root,
            env=env,
            check=True,
            capture_output=True,
            timeout=300,
        )

    def query(self, sql: str) -> List[Tuple[str, ...]]:
        return self.database.query(sql)


# --- the mail-host install and Postfix ----------------------------------------------------------

RELAY_USER = "mailrelay"  # the user the contrib examples run mailbox-relay as
ROOT = Path(__file__).resolve().parents[2]
CONTRIB = ROOT / "contrib"


def ensure_user(name: str, home: Optional[Path] = None) -> None:
    """A system user (created if missing, as root); with `home`, that is its home directory."""
    if os.geteuid() != 0:
        try:
            pwd.getpwnam(name)
            return
        except KeyError:
            pytest.skip(f"needs a system user {name} (run as root to create it)")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True
        )
        entry = pwd.getpwnam(name)
    if home is not None and entry.pw_dir != str(home):
        subprocess.run(["usermod", "--home", str(home), name], check=True)


def mail_host_install(root: Path) -> Path:
    """mailbox-relay installed the way the README tells a mail host to: a venv of the system
    Python that every user can run (MTAs run it as another user). Returns the script's path."""
    python = shutil.which("python3", path="/usr/bin")
    if python is None:
        pytest.skip("needs Debian's python3 and python3-venv for the mail-host install")
    venv = root / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    for directory in (root, *root.parents):
        if directory == Path("/"):
            break
        directory.chmod(directory.stat().st_mode | 0o755)
    return venv / "bin" / "mailbox-relay"


class RelayConfig:
    """/etc/mailbox-relay/config.toml and its password file, owned by the relay user."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "config.toml"
        self.password_file = root / "password"
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)

    def write(self, url: str, password: str, retry_for: float = 1) -> None:
        self.password_file.write_text(password + "\n")
        self.password_file.chmod(0o600)
        shutil.chown(self.password_file, RELAY_USER)
        self.path.write_text(
            f'url = "{url}"\npassword_file = "{self.password_file}"\nretry_for = {retry_for}\n'
        )
        self.path.chmod(0o644)


_POSTFIX_MAIN = """
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.localhost
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# As for mail from the internet: no From:/Date:/Message-ID: added to what the tests send from
# 127.0.0.1 (Postfix rewrites headers of its own host's clients by default).
local_header_rewrite_clients =
maillog_file_prefixes = {root}
maillog_file = {root}/maillog
alias_maps =
alias_database =
local_recipient_maps =
smtputf8_enable = no
# The bounce of the invalid-message test goes nowhere; keep it out of the way.
bounce_queue_lifetime = 0
"""

_POSTFIX_SERVICES = """
{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class MailServer:
    """What the tests do with an MTA: send over SMTP, and wait for its log to say something."""

    port: int
    name = "the MTA"

    def log(self) -> str:
        raise NotImplementedError

    def send(self, sender: str, recipients: Sequence[str], raw: bytes) -> None:
        import smtplib

        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as smtp:
            smtp.sendmail(sender, list(recipients), raw)

    def wait_for_log(self, text: str, count: int = 1, seconds: float = 60) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            log = self.log()
            if log.count(text) >= count:
                return log
            time.sleep(0.2)
        raise AssertionError(f"{text!r} x{count} not in {self.name}'s log: {self.log()[-3000:]}")


def check_mta_table(section: str, head: str, rows: Dict[str, str], cases: Sequence[str]) -> None:
    """The docs/compatibility.md table of one MTA, from the verdicts its tests recorded."""
    if set(cases) - set(rows):
        pytest.skip("the table needs every test of this module in the same run")
    check_doc_section(section, head + "\n".join(f"| {case} | {rows[case]}" for case in cases) + "\n")


class Postfix(MailServer):
    """A private Postfix instance (its own config, queue and data directories, smtpd on a free
    127.0.0.1 port) with contrib's transport and main.cf lines, as shipped: only the program
    path and the config file path are substituted."""

    name = "Postfix"

    def __init__(self, root: Path, relay: Path, config: Path) -> None:
        self.root = root
        self.port = free_port()
        self.conf = root / "conf"
        transport = (CONTRIB / "postfix-master.cf.example").read_text()
        transport = transport.replace("/usr/local/bin/mailbox-relay", str(relay))
        self.transport = transport.replace("/etc/mailbox-relay/config.toml", str(config))
        self.main = (CONTRIB / "postfix-main.cf.example").read_text()

    def start(self) -> None:
        for sub in ("conf", "queue", "data"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        shutil.chown(self.root / "data", "postfix")
        (self.conf / "main.cf").write_text(_POSTFIX_MAIN.format(root=self.root) + self.main)
        services = _POSTFIX_SERVICES.format(port=f"127.0.0.1:{self.port}")
        (self.conf / "master.cf").write_text(services + self.transport)
        # One delivery at a time: the test app runs on SQLite, which stores concurrent posts (after
        # a retry) but fails some of their routing ("database is locked"). A production app needs
        # no such limit; the routing assertions do. It has to be the process limit: with
        # recipient_limit = 1, *_destination_concurrency_limit counts per recipient, so two
        # recipients of one message would still be delivered at once.
        postconf = ["postconf", "-c", str(self.conf), "-F", "actionmailbox/unix/process_limit=1"]
        subprocess.run(postconf, check=True, capture_output=True, timeout=60)
        self._postfix("start")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"Postfix did not listen: {self.log()[-2000:]}")

    def _postfix(self, *args: str) -> None:
        # `script` gives postfix a terminal: without one it reports fatal errors only to syslog.
        command = " ".join(["postfix", "-c", str(self.conf), *args])
        result = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{command}: {result.stdout.decode(errors='replace')} {self.log()[-2000:]}")

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True, timeout=60)

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def queue(self) -> str:
        result = subprocess.run(
            ["postqueue", "-c", str(self.conf), "-p"], capture_output=True, text=True, timeout=60
        )
        return result.stdout

    def flush(self) -> None:
        subprocess.run(["postqueue", "-c", str(self.conf), "-f"], check=True, capture_output=True, timeout=60)


# --- Exim ---------------------------------------------------------------------------------------

EXIM = Path(os.environ.get("MAILBOX_RELAY_E2E_EXIM", "/opt/mailbox-relay-e2e/exim/usr/sbin/exim4"))
EXIM_TRUSTED_CONFIGS = Path("/etc/exim4/trusted_configs")  # compiled into Debian's Exim

_EXIM_MAIN = """
exim_path = {exim}
primary_hostname = mx.localhost
spool_directory = {root}/spool
log_file_path = {root}/log/%slog
keep_environment =
tls_advertise_hosts =
never_users =
daemon_smtp_ports = {port}
local_interfaces = 127.0.0.1
domainlist local_domains =
# The domain the contrib router names: accepted from anywhere, as an MX would.
domainlist relay_to_domains = support.example.com
acl_smtp_rcpt = acl_check_rcpt

begin acl
acl_check_rcpt:
  accept domains = +relay_to_domains
  deny message = relay not permitted

begin routers
{router}
begin transports
{transport}
begin retry
*  *  F,2h,15m
"""


class Exim(MailServer):
    """Exim 4 from Debian's package, unpacked privately (tests/e2e/get-exim.sh), run as root with
    its own -C configuration: contrib's router and transport as shipped, with only the program
    path and the config file path substituted."""

    name = "Exim"

    def __init__(self, root: Path, relay: Path, config: Path) -> None:
        if not EXIM.exists():
            pytest.skip(f"needs Exim unpacked at {EXIM}: run tests/e2e/get-exim.sh (as root)")
        self.root = root
        self.port = free_port()
        self.conf = root / "exim.conf"
        router = (CONTRIB / "exim-router.example").read_text()
        transport = (CONTRIB / "exim-transport.example").read_text()
        transport = transport.replace("/usr/local/bin/mailbox-relay", str(relay))
        self.router = router
        self.transport = transport.replace("/etc/mailbox-relay/config.toml", str(config))
        self.process: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> None:
        ensure_user("Debian-exim")  # the Exim user compiled into Debian's binary
        for sub in ("spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
            shutil.chown(self.root / sub, "Debian-exim")
        self.root.chmod(0o755)
        self.conf.write_text(
            _EXIM_MAIN.format(
                exim=EXIM, root=self.root, port=self.port, router=self.router, transport=self.transport
            )
        )
        _trust(self.conf)
        log = self.root / "daemon.out"
        self.process = subprocess.Popen(
            [str(EXIM), "-C", str(self.conf), "-bdf"], stdout=log.open("wb"), stderr=subprocess.STDOUT
        )
        wait_for_port(self.port, self.process, 30, log)

    def _exim(self, *args: str) -> str:
        result = subprocess.run(
            [str(EXIM), "-C", str(self.conf), *args], capture_output=True, text=True, timeout=120
        )
        return result.stdout + result.stderr

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)

    def log(self) -> str:
        path = self.root / "log" / "mainlog"
        return path.read_text(errors="replace") if path.exists() else ""

    def queue(self) -> str:
        return self._exim("-bp")

    def flush(self) -> None:
        """Deliver everything in the queue now, retry times or not (like postqueue -f)."""
        self._exim("-qff")


def _trust(config: Path) -> None:
    """Debian's Exim keeps root (to run the pipe as mailrelay) only for -C files listed here."""
    EXIM_TRUSTED_CONFIGS.parent.mkdir(parents=True, exist_ok=True)
    listed = EXIM_TRUSTED_CONFIGS.read_text().split() if EXIM_TRUSTED_CONFIGS.exists() else []
    if str(config) not in listed:
        EXIM_TRUSTED_CONFIGS.write_text("\n".join([*listed, str(config)]) + "\n")


# --- docs/compatibility.md ----------------------------------------------------------------------

DOC = ROOT / "docs" / "compatibility.md"
DOC_SECTIONS = ("rake", "ingresses", "postfix", "exim")  # in the order the document shows them
DOC_TITLE = (
    "# Compatibility\n\nGenerated by the end-to-end suite (`tests/e2e/`) against real programs and a "
    "real Rails app; do not\nedit by hand. Regenerate with `MAILBOX_RELAY_WRITE_DOCS=1 python3 -m "
    "pytest tests/e2e`.\n"
)


def _doc_sections() -> Dict[str, str]:
    text = DOC.read_text() if DOC.exists() else ""
    found = re.findall(r"<!-- section (\w+) -->\n(.*?)\n<!-- /section -->", text, re.S)
    return {name: body for name, body in found}


def check_doc_section(name: str, text: str) -> None:
    """docs/compatibility.md is a title plus generated sections, one per test module: this
    section must be what the suite just saw (MAILBOX_RELAY_WRITE_DOCS=1 writes it)."""
    sections = {**_doc_sections(), name: text.strip()}
    if os.environ.get("MAILBOX_RELAY_WRITE_DOCS") == "1":
        blocks = [
            f"<!-- section {key} -->\n{sections[key]}\n<!-- /section -->"
            for key in DOC_SECTIONS
            if key in sections
        ]
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(DOC_TITLE + "\n" + "\n\n".join(blocks) + "\n")
    assert _doc_sections().get(name) == text.strip(), (
        f"docs/compatibility.md is stale (section {name}): rerun with MAILBOX_RELAY_WRITE_DOCS=1"
    )


def table_cell(text: str, width: int = 100) -> str:
    """A log excerpt for a table cell: stable across runs (ports, temp paths) and short."""
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)
    text = re.sub(r"/tmp/mailbox-relay-e2e-\w+-\d+", "...", text)
    text = text if len(text) <= width else text[: width - 3] + "..."
    return text.replace("|", "/")
