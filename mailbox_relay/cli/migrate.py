"""`migrate getmailrc FILE...` and `migrate fetchmailrc FILE...`: print the equivalent
[accounts.NAME] tables (see migrate.py)."""

from __future__ import annotations

import os
from typing import Any, List, Tuple

import click

from mailbox_relay.cli.options import exit_codes_help
from mailbox_relay.log import say, to_stderr_error
from mailbox_relay.outcome import MIGRATE_EXITS, Exit

HELP = f"""Print a getmail6 or fetchmail configuration as [accounts.NAME] tables for fetch and watch.

KIND is getmailrc (one account per file: getmail's Simple POP3/IMAP retrievers, SSL or not)
or fetchmailrc (one account per poll). Append what it prints to the config file, then run
`mailbox-relay check --account NAME`. What has no equivalent, and what was chosen instead, is
said in comments above each table. Settings of the whole config file that deliver's options
carried (--url, --ingress, --max-size) are comments too: a config file has one ingress.

A password found in a file is never printed: the account gets a password_file under
--password-dir, which --save-passwords writes (0600) for you.

{exit_codes_help(MIGRATE_EXITS)}"""


def _default_password_dir() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "mailbox-relay", "passwords")


@click.command(help=HELP, short_help="Print getmailrc or fetchmailrc accounts as [accounts.NAME] tables.")
@click.argument("kind", type=click.Choice(["getmailrc", "fetchmailrc"]))
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option(
    "--password-dir",
    metavar="DIR",
    help="Where the password_file of each account with a password in its file goes "
    "[default: $XDG_CONFIG_HOME/mailbox-relay/passwords].",
)
@click.option(
    "--save-passwords",
    is_flag=True,
    help="Write each password found into its password_file (0600, in a 0700 directory); never printed.",
)
def migrate(kind: str, files: Tuple[str, ...], password_dir: Any, save_passwords: bool) -> Exit:
    from mailbox_relay.migrate import Migrated, MigrateError, from_fetchmailrc, from_getmailrc, render, unique

    directory = os.path.abspath(os.path.expanduser(password_dir or _default_password_dir()))
    accounts: List[Migrated] = []
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError as error:
            to_stderr_error(f"cannot read {path}: {error.strerror or error}")
            return Exit.NOINPUT
        try:
            if kind == "getmailrc":
                accounts.append(from_getmailrc(text, path, directory))
            else:
                accounts += from_fetchmailrc(text, path, directory)
        except MigrateError as error:
            to_stderr_error(str(error))
            return Exit.DATAERR
    unique(accounts, directory)
    if save_passwords:
        for account in accounts:
            problem = _save(account)
            if problem:
                to_stderr_error(problem)
                return Exit.CANTCREAT
    say(render(accounts).rstrip("\n"), err=False)
    return Exit.OK


def _save(account: Any) -> str:
    """Write the account's password to its password_file; "" when done, else the line why not.
    An existing file that holds another password is left as it is."""
    secret, path = account.secret, account.table.get("password_file")
    if secret is None or not path:
        return ""
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                if handle.readline().rstrip("\r\n") == secret:
                    return ""
            return f"{path} exists and holds another password: move it away, or choose --password-dir"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(secret + "\n")
    except OSError as error:
        return f"cannot write {path}: {error.strerror or error}"
    account.notes = [note for note in account.notes if "is not printed" not in note]
    account.note(f"the password is in {path} (written by --save-passwords)")
    return ""
