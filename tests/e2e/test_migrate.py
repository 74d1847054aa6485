"""`migrate getmailrc` and `migrate fetchmailrc` on the very files the getmail6 and fetchmail
scenarios run: the printed accounts pass `check --account` unchanged and deliver the same
messages once into the real Rails app."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict

from ..helpers import invoke
from .test_fetchmail_procmail import fetchmailrc
from .test_getmail import getmail, getmailrc
from .world import Dovecot, RailsApp, message, need


def migrated_config(tmp_path: Path, rails: RailsApp, kind: str, rc: Path) -> Dict[str, str]:
    """migrate's output under the config's url and password, as README tells; the environment
    that points mailbox-relay at that config."""
    code, out, err = invoke(
        ["migrate", kind, str(rc), "--password-dir", str(tmp_path / "passwords"), "--save-passwords"]
    )
    assert (code, err) == (0, ""), err
    assert "secret-" not in out  # the password went to its file, never to stdout
    config = tmp_path / "config.toml"
    config.write_text(
        f'url = "{rails.url}"\npassword = "{rails.password}"\nfetch_state = "{tmp_path / "state"}"\n\n{out}'
    )
    return {"MAILBOX_RELAY_CONFIG": str(config)}


def test_a_migrated_getmailrc_delivers_the_messages_getmail_delivers_once(
    tmp_path: Path, dovecot: Dovecot, rails: RailsApp, relay: str, relay_env: Dict[str, str]
) -> None:
    need("getmail")
    theirs, ours = dovecot.new_user(), dovecot.new_user()
    raws = [message(f"migrated getmail {n}") for n in range(3)]
    dovecot.append(theirs, raws)
    dovecot.append(ours, raws)
    assert (
        getmail(getmailrc(tmp_path / "getmail", dovecot, theirs, relay, ("deliver",)), relay_env).returncode
        == 0
    )
    assert rails.stored() == 3

    rc = getmailrc(tmp_path / "ours", dovecot, ours, relay, ("deliver",))
    env = migrated_config(tmp_path, rails, "getmailrc", rc)
    name = f"{ours}-127-0-0-1"
    code, out, _ = invoke(["check", "--account", name], env=env)
    assert code == 0, out
    code, out, _ = invoke(["fetch"], env=env)
    assert code == 0 and "3 found, 3 delivered" in out, out
    assert dovecot.count(ours) == 0  # delete = true
    # Each once, and exactly the server's bytes (getmail adds Return-Path: and its own header).
    assert sorted(rails.sources()[3:]) == sorted(raws) and rails.stored() == 6
    assert invoke(["fetch"], env=env)[0] == 0 and rails.stored() == 6


def test_a_migrated_fetchmailrc_routes_on_the_same_envelope_recipient(
    tmp_path: Path, dovecot: Dovecot, rails: RailsApp, relay: str
) -> None:
    need("fetchmail")
    user = dovecot.new_user()
    dovecot.append(user, [message("migrated fetchmail", to="list@example.com")])
    rc = fetchmailrc(tmp_path, dovecot, user, relay)
    env = migrated_config(tmp_path, rails, "fetchmailrc", rc)
    name = f"{user}-127-0-0-1"
    code, out, _ = invoke(["check", "--account", name], env=env)
    assert code == 0, out
    code, out, _ = invoke(["fetch"], env=env)
    assert code == 0, out
    (routed,) = rails.routed(1)
    assert "support@example.com" in routed["recipients"]  # type: ignore[operator]  # fetchmail's %T
    assert "list@example.com" in routed["recipients"]  # type: ignore[operator]
    assert dovecot.count(user) == 0  # no keep
    # fetchmail itself on the same file, afterwards, finds nothing left to deliver twice
    result = subprocess.run(
        ["fetchmail", "-f", str(rc), "--pidfile", str(tmp_path / "pid")],
        env={**os.environ, "FETCHMAILHOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and rails.stored() == 1, result.stdout + result.stderr  # 1: no mail
