"""`mailbox-relay import`: backfill mbox files, Maildirs and .eml trees (see importer.py)."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from typing import Any, List, Optional

import click

from mailbox_relay.cli.options import exit_codes_help, settings_options, usage_errors
from mailbox_relay.log import nowhere, say, to_stderr_error
from mailbox_relay.outcome import IMPORT_EXITS, Exit
from mailbox_relay.settings import CONNECTION, DELIVERY, FAILED, IMPORT, LOGS

HELP = f"""Import mbox files (optionally .gz), Maildirs and trees of .eml files.

Each PATH is detected as an mbox file (starts with a From_ line; an empty file is an empty
mbox), a Maildir (has cur/ and new/; flags are ignored), a single .eml message, or a
directory, in which every Maildir, mbox file and .eml file is read. Messages are validated
like `deliver` does, sent exactly as stored (minus the From_ line) with `--jobs` concurrent
keep-alive connections, and retried like `deliver` (`--retry-for` per message).

A journal (SQLite) records every delivered message, so a rerun after Ctrl-C, a crash or
failures resumes: it sends only what is not yet delivered, and a completed rerun sends
nothing. Inputs are never modified. An unreadable message or a damaged input is counted and
the run goes on; an answer every message would get (401, 404, TLS, ...) stops it early.

{exit_codes_help(IMPORT_EXITS)}"""


def _date(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[datetime]:
    from mailbox_relay.filters import parse_date

    try:
        return None if value is None else parse_date(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@click.command(
    name="import", help=HELP, short_help="mbox files, Maildirs and .eml trees, resumably and fast."
)
@settings_options(
    CONNECTION,
    DELIVERY,
    IMPORT,
    FAILED,
    LOGS,
    verbose="Log every setting and where it came from, and each attempt that is retried, to stderr. "
    "Never logs the password.",
)
@click.option("--no-state", is_flag=True, help="Keep no journal: a rerun sends everything again.")
@click.option("--restart", is_flag=True, help="Forget earlier progress for these inputs first.")
@click.option("--dry-run", is_flag=True, help="Read, split and validate everything; send nothing.")
@click.option(
    "--since",
    callback=_date,
    metavar="DATE",
    help="Only messages whose Date: is on or after DATE (2024-01-31, 2024-01-31T12:00, UTC unless "
    "an offset is given).",
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
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress; a summary only if something failed.")
@click.argument("paths", nargs=-1, required=True, type=click.Path(), metavar="PATH...")
def import_(
    paths: List[str],
    verbose: bool,
    no_state: bool,
    restart: bool,
    dry_run: bool,
    since: Optional[datetime],
    until: Optional[datetime],
    label: List[str],
    exclude_label: List[str],
    as_json: bool,
    quiet: bool,
    **options: Any,
) -> Exit:
    from mailbox_relay.filters import Filters
    from mailbox_relay.import_summary import summary_lines
    from mailbox_relay.importer import run_import
    from mailbox_relay.progress import RichProgress, choose
    from mailbox_relay.sources.files import NotASource

    filters = Filters(
        since=since,
        until=until,
        labels=frozenset(name.casefold() for name in label),
        exclude_labels=frozenset(name.casefold() for name in exclude_label),
    )
    from mailbox_relay.logformat import operator_logs

    with usage_errors():
        log_format, lines, _errors = operator_logs(options, os.environ)
    # A live bar would tear JSON lines: with --log-format json, progress is plain lines too.
    progress = choose(sys.stderr, quiet=quiet, fancy=not as_json and log_format == "plain")
    live_bar = isinstance(progress, RichProgress)
    log = nowhere if quiet else progress.log if isinstance(progress, RichProgress) else lines
    try:
        with usage_errors():
            summary = run_import(
                options,
                paths,
                os.environ,
                dry_run=dry_run,
                use_state=not no_state,
                restart=restart,
                filters=filters,
                progress=progress,
                log=log,
                # Worker processes write to stderr themselves, which would tear a live bar.
                quiet=quiet or live_bar,
                verbose=verbose,
            )
    except NotASource as error:
        to_stderr_error(str(error))
        return Exit.NOINPUT
    if as_json:
        import json

        say(json.dumps(summary.as_json(), indent=2), err=False)
    elif not quiet or summary.exit_code():
        for line in summary_lines(summary):
            say(line, err=False)
    if summary.abandoned:
        # Worker processes still blocked in a post would be waited for at interpreter exit; the
        # user asked twice to stop and the journal is saved, so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(summary.exit_code())
    return summary.exit_code()
