"""The commands that MTAs never run: import, check and serve.

They live apart from cli.py so that `deliver`, which every delivered message pays for, does
not build their options; cli.py's group loads this module only when one of them is asked for.
"""

from __future__ import annotations

import os
import sys
from typing import Any, List, Optional

import click

from mailbox_relay.cli import (
    connection_options,
    delivery_options,
    no_log,
    option_help,
    refuse_password_on_argv,
    stderr_log,
)
from mailbox_relay.outcome import RELAY_PATH, SYSEXITS

IMPORT_HELP = """Import mbox files (optionally .gz), Maildirs and trees of .eml files.

Each PATH is detected as an mbox file (starts with a From_ line), a Maildir (has cur/ and
new/; flags are ignored), a directory of *.eml files, or a single .eml message. Messages are
validated like `deliver` does, sent exactly as stored (minus the From_ line) with `--jobs`
concurrent keep-alive connections, and retried like `deliver` (`--retry-for` per message).

A journal (SQLite) records every delivered message, so a rerun after Ctrl-C, a crash or
failures resumes: it sends only what is not yet delivered, and a completed rerun sends
nothing. Inputs are never modified.

\b
Exit codes:
   0  nothing left undelivered
  75  some messages failed for a reason that may pass (run the same command again)
  65  some messages are invalid (and none failed otherwise)
  66  an input cannot be read; 64 usage error
"""


def _date(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Any:
    if value is None:
        return None
    from datetime import datetime, timezone

    try:
        date = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date such as 2024-01-31 or 2024-01-31T12:00") from None
    return date if date.tzinfo else date.replace(tzinfo=timezone.utc)


@click.command(name="import", help=IMPORT_HELP)
@connection_options
@delivery_options
@click.option("--jobs", type=int, metavar="N", help=option_help("Concurrent deliveries.", "jobs", "4"))
@click.option(
    "--rate", type=float, metavar="N", help=option_help("At most N messages a second.", "rate", "unlimited")
)
@click.option(
    "--state",
    metavar="PATH",
    type=click.Path(dir_okay=False),
    help=option_help("The resume journal (SQLite).", "state", "$XDG_STATE_HOME/mailbox-relay/import.sqlite3"),
)
@click.option("--no-state", is_flag=True, help="Keep no journal: a rerun sends everything again.")
@click.option("--restart", is_flag=True, help="Forget earlier progress for these inputs first.")
@click.option("--dry-run", is_flag=True, help="Read, split and validate everything; send nothing.")
@click.option(
    "--since", callback=_date, metavar="DATE", help="Only messages whose Date: is on or after DATE."
)
@click.option("--until", callback=_date, metavar="DATE", help="Only messages whose Date: is before DATE.")
@click.option(
    "--label",
    multiple=True,
    metavar="LABEL",
    help="Only messages with this Gmail Takeout X-Gmail-Labels label (repeatable).",
)
@click.option(
    "--exclude-label",
    multiple=True,
    metavar="LABEL",
    help="Skip messages with this X-Gmail-Labels label, e.g. Spam, Trash, Chat (repeatable).",
)
@click.option(
    "--mbox-format",
    type=click.Choice(["mboxo", "mboxrd"]),
    help=option_help(
        "mboxo sends bytes as stored; mboxrd strips one > from >From lines.", "mbox_format", "mboxo"
    ),
)
@click.option(
    "--failed-dir",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Write every message that could not be delivered there, as a Maildir message.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress; a summary only if something failed.")
@click.argument("paths", nargs=-1, required=True, type=click.Path(), metavar="PATH...")
def import_(
    paths: List[str],
    verbose: bool,
    no_state: bool,
    restart: bool,
    dry_run: bool,
    label: List[str],
    exclude_label: List[str],
    failed_dir: Optional[str],
    as_json: bool,
    quiet: bool,
    **options: Any,
) -> int:
    from mailbox_relay.importer import Filters, run_import, summary_lines
    from mailbox_relay.outcome import RelayError
    from mailbox_relay.progress import RichProgress, choose
    from mailbox_relay.sources import NotASource

    filters = Filters(
        since=options.pop("since"),
        until=options.pop("until"),
        labels=frozenset(name.casefold() for name in label),
        exclude_labels=frozenset(name.casefold() for name in exclude_label),
    )
    progress = choose(sys.stderr, quiet=quiet, fancy=not as_json)
    live_bar = isinstance(progress, RichProgress)
    log = no_log if quiet else progress.log if isinstance(progress, RichProgress) else stderr_log
    try:
        summary = run_import(
            options,
            paths,
            os.environ,
            dry_run=dry_run,
            use_state=not no_state,
            restart=restart,
            filters=filters,
            failed_dir=failed_dir,
            progress=progress,
            log=log,
            # Worker processes write to stderr themselves, which would tear a live bar.
            quiet=quiet or live_bar,
            verbose=verbose,
        )
    except RelayError as error:
        click.echo(error.outcome.line(), err=True)
        return SYSEXITS[error.outcome.kind]
    except NotASource as error:
        click.echo(f"mailbox-relay import: {error}", err=True)
        return 66
    if as_json:
        import json

        click.echo(json.dumps(summary.as_json(), indent=2))
    elif not quiet or summary.exit_code():
        for line in summary_lines(summary):
            click.echo(line)
    if summary.abandoned:
        # Worker threads still blocked in a post would be joined at interpreter exit; the user
        # asked twice to stop, the journal is saved, so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(summary.exit_code())
    return summary.exit_code()


CHECK_HELP = """Check that delivery would work, step by step, without creating an inbound email.

Reports the settings (and where each came from), DNS, TCP, TLS (version, certificate,
expiry), then posts with the right password and a deliberately wrong Content-Type: Action
Mailbox answers 415 to that only when the URL, the relay ingress and the password are all
right, and stores nothing.

\b
Exit codes (for people and monitoring):
   0  ready
  77  password rejected (401/403)
  78  configuration: wrong path (404), redirect, missing URL/password, plain http
  69  unreachable, TLS failure, timeout or 5xx
"""


@click.command(help=CHECK_HELP)
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def check(verbose: bool, as_json: bool, **options: Any) -> int:
    from mailbox_relay.check import render, run_check

    report = run_check(options, os.environ, stderr_log if verbose else no_log)
    if as_json:
        import json

        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        render(report, sys.stdout)
    return report.exit_code


SERVE_HELP = """Run a local relay ingress that answers exactly like Action Mailbox's.

POST /rails/action_mailbox/relay/inbound_emails with Basic auth (user actionmailbox) and
Content-Type message/rfc822 gets 204 and the exact bytes land in the Maildir (tmp/, fsync,
new/); a byte-identical re-post answers 204 and is not stored twice, as in Rails. Anything
else gets what Rails answers: 404 (other paths), 401, 415, or 422 for an empty body.

The password comes from MAILBOX_RELAY_PASSWORD, INGRESS_PASSWORD, --password-file or the
config file; serve refuses to start without one. Logs one line per request on stderr.
"""


@click.command(help=SERVE_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=3025, show_default=True, type=click.IntRange(0, 65535), help="Port.")
@click.option(
    "--maildir",
    default="mailbox-relay-inbox",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Maildir to store accepted messages in (created if missing).",
)
@click.option(
    "--password-file",
    metavar="PATH",
    type=click.Path(dir_okay=False),
    help=option_help("Read the password from the first line of PATH.", "password_file"),
)
@click.option("--password", hidden=True, expose_value=False, callback=refuse_password_on_argv)
@click.option(
    "--config",
    metavar="PATH",
    type=click.Path(dir_okay=False),
    help="TOML config file (its password or password_file). [env: MAILBOX_RELAY_CONFIG]",
)
def serve(host: str, port: int, maildir: str, **options: Any) -> int:
    from mailbox_relay.maildir import MaildirWriter
    from mailbox_relay.outcome import ConfigError
    from mailbox_relay.server import make_server
    from mailbox_relay.settings import open_layers

    try:
        password = open_layers(options, os.environ).password()[0]
        if password is None:
            raise ConfigError("serve needs a password: set MAILBOX_RELAY_PASSWORD or pass --password-file")
        server = make_server(host, port, password, MaildirWriter(maildir), stderr_log)
    except ConfigError as error:
        click.echo(f"mailbox-relay serve: {error.outcome.detail}", err=True)
        return 78
    except OSError as error:
        click.echo(f"mailbox-relay serve: cannot listen on {host}:{port}: {error.strerror}", err=True)
        return 69
    bound = server.server_address[1]
    click.echo(
        f"mailbox-relay serve: listening on http://{host}:{bound}{RELAY_PATH}, "
        f"storing into {maildir}/new (Ctrl-C stops)",
        err=True,
    )
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        click.echo("mailbox-relay serve: stopped", err=True)
    finally:
        server.server_close()
    return 0
