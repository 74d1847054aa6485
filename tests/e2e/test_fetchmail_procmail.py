"""Scenarios 3 and 4: fetchmail's mda with %T, and procmail's `:0 w` pipe with its fallback."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict

from .world import ROOT, Dovecot, RailsApp, ensure_user, message, need


def fetchmailrc(directory: Path, dovecot: Dovecot, user: str, relay: str) -> Path:
    """A single-drop poll whose mda passes %T (the address after `is`) as the envelope recipient."""
    rc = directory / "fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        f"poll 127.0.0.1 protocol imap port {dovecot.port} auth password\n"
        f'  user "{user}" there with password "secret-{user}" is "support@example.com" here\n'
        "  sslproto ''\n"
        f'  mda "{relay} deliver --envelope-recipient %T"\n'
    )
    rc.chmod(0o600)
    return rc


def test_fetchmail_passes_the_envelope_recipient_that_rails_routes_on(
    tmp_path: Path, dovecot: Dovecot, rails: RailsApp, relay: str, relay_env: Dict[str, str]
) -> None:
    need("fetchmail")
    user = dovecot.new_user()
    dovecot.append(user, [message("to a list", to="list@example.com")])
    rc = fetchmailrc(tmp_path, dovecot, user, relay)
    env = {**relay_env, "FETCHMAILHOME": str(tmp_path)}
    result = subprocess.run(
        ["fetchmail", "-f", str(rc), "--pidfile", str(tmp_path / "pid")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert rails.stored() == 1
    (routed,) = rails.routed(1)
    assert "support@example.com" in routed["recipients"]  # type: ignore[operator]
    assert "list@example.com" in routed["recipients"]  # type: ignore[operator]
    assert dovecot.count(user) == 0


def procmail(rc: Path, raw: bytes) -> subprocess.CompletedProcess[bytes]:
    # procmail clears the environment anyway; start it nearly empty, as an MTA would.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(rc.parent)}
    return subprocess.run(["procmail", "-m", str(rc)], input=raw, env=env, capture_output=True, timeout=60)


def procmailrc(directory: Path, relay: str, url: str, password: str) -> Path:
    rc = directory / "procmailrc"
    rc.write_text(
        f"MAILBOX_RELAY_URL={url}\nMAILBOX_RELAY_PASSWORD={password}\nMAILBOX_RELAY_RETRY_FOR=1\n"
        f"DEFAULT={directory}/fallback.mbox\nLOGFILE={directory}/procmail.log\n\n"
        f":0 w\n| {relay} deliver\n"
    )
    return rc


def test_procmail_delivers_and_on_failure_falls_through_to_default(
    tmp_path: Path, rails: RailsApp, relay: str
) -> None:
    need("procmail")
    good = procmailrc(tmp_path, relay, rails.url, rails.password)
    assert procmail(good, message("through procmail")).returncode == 0
    assert rails.stored() == 1
    assert not (tmp_path / "fallback.mbox").exists()

    bad = procmailrc(tmp_path, relay, rails.url, "wrong")
    assert procmail(bad, message("kept by procmail")).returncode == 0
    assert rails.stored() == 1
    fallback = (tmp_path / "fallback.mbox").read_bytes()
    assert fallback.count(b"Subject: ") == 1  # nothing lost: it is in $DEFAULT
    assert b"Subject: kept by procmail" in fallback
    log = (tmp_path / "procmail.log").read_text()
    assert "4.7.0 ingress rejected the password" in log


def test_the_shipped_multidrop_example_routes_each_message_to_its_envelope_recipient(
    tmp_path: Path, dovecot: Dovecot, rails: RailsApp, relay: str, relay_env: Dict[str, str]
) -> None:
    """contrib/fetchmailrc-multidrop.example as shipped, but for the server, the account and TLS
    (the test Dovecot speaks plain IMAP on a free port) and the program's path."""
    need("fetchmail")
    user = dovecot.new_user()
    to_a_list = message(
        "multidrop sales", to="list@lists.example", extra="Delivered-To: sales@support.example.com\r\n"
    )
    to_another = message(
        "multidrop help", to="someone@else.example", extra="Delivered-To: help@support.example.com\r\n"
    )
    dovecot.append(user, [to_a_list, to_another])
    shipped = (ROOT / "contrib" / "fetchmailrc-multidrop.example").read_text()
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        + shipped.replace(
            "poll imap.example.com protocol imap port 993",
            f"poll 127.0.0.1 protocol imap port {dovecot.port} auth password",
        )
        .replace('user "catchall@example.com" there', f'user "{user}" there with password "secret-{user}"')
        .replace("ssl sslcertck", "sslproto ''")
        .replace("/usr/local/bin/mailbox-relay", relay)
    )
    rc.chmod(0o600)
    result = subprocess.run(
        ["fetchmail", "-f", str(rc), "--pidfile", str(tmp_path / "pid")],
        env={**relay_env, "FETCHMAILHOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    routed = {entry["subject"]: entry["recipients"] for entry in rails.routed(2)}
    assert "sales@support.example.com" in routed["multidrop sales"]  # type: ignore[operator]
    assert "help@support.example.com" in routed["multidrop help"]  # type: ignore[operator]
    assert dovecot.count(user) == 0


PROCMAIL_USER = "mrvprocmail"


def test_the_shipped_procmailrc_finds_the_users_config_and_keeps_mail_on_failure(
    rails: RailsApp, mail_host: Path
) -> None:
    """contrib/procmailrc.example as ~/.procmailrc of a real user, with only the program's path
    substituted: procmail clears the environment and sets HOME from passwd, and mailbox-relay
    finds ~/.config/mailbox-relay/config.toml by itself. On failure the mail lands in $DEFAULT."""
    need("procmail", "runuser")
    home = Path("/tmp") / f"mailbox-relay-e2e-procmail-{os.getpid()}"
    shutil.rmtree(home, ignore_errors=True)
    ensure_user(PROCMAIL_USER, home)
    (home / ".config" / "mailbox-relay").mkdir(parents=True)
    shipped = (ROOT / "contrib" / "procmailrc.example").read_text()
    (home / ".procmailrc").write_text(shipped.replace("/usr/local/bin/mailbox-relay", str(mail_host)))
    spool = Path("/var/mail") / PROCMAIL_USER
    spool.unlink(missing_ok=True)
    try:
        for path in (home, *home.rglob("*")):
            shutil.chown(path, PROCMAIL_USER)
        home.chmod(0o755)
        config = home / ".config" / "mailbox-relay" / "config.toml"

        def deliver(password: str, subject: str) -> int:
            config.write_text(f'url = "{rails.url}"\npassword = "{password}"\nretry_for = 1\n')
            config.chmod(0o600)
            shutil.chown(config, PROCMAIL_USER)
            result = subprocess.run(
                [str(shutil.which("runuser")), "-u", PROCMAIL_USER, "--", "procmail"],
                input=message(subject),
                env={"PATH": "/usr/bin:/bin"},
                capture_output=True,
                timeout=120,
            )
            return result.returncode

        assert deliver(rails.password, "procmail as shipped") == 0
        assert rails.stored() == 1
        assert not spool.exists() or b"procmail as shipped" not in spool.read_bytes()
        assert deliver("wrong", "kept by the shipped procmailrc") == 0
        assert rails.stored() == 1
        assert b"Subject: kept by the shipped procmailrc" in spool.read_bytes()  # $DEFAULT
    finally:
        spool.unlink(missing_ok=True)
        shutil.rmtree(home, ignore_errors=True)
