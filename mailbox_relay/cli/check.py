"""`mailbox-relay check`: would delivery work? (see check.py)."""

from __future__ import annotations

import os
import sys
from typing import Any, Tuple

import click

from mailbox_relay.cli.options import account_option, exit_codes_help, settings_options, usage_errors
from mailbox_relay.log import mute, nowhere, say, to_stderr
from mailbox_relay.outcome import CHECK_EXITS, Exit
from mailbox_relay.settings import CONNECTION

HELP = f"""Check that delivery would work, step by step, without creating an inbound email.

Reports the settings (and where each came from), DNS, TCP, TLS (version, certificate,
expiry), then posts with the right password and a deliberately wrong Content-Type: Action
Mailbox answers 415 to that only when the URL, the relay ingress and the password are all
right, and stores nothing.

{exit_codes_help(CHECK_EXITS, "Exit codes (for people and monitoring)")}"""


@click.command(help=HELP, short_help="Diagnose the settings and the ingress without creating anything.")
@settings_options(
    CONNECTION,
    verbose="Log every setting and where it came from to stderr, before the report. Never logs the password.",
)
@account_option(
    "Also check this IMAP account of the config file first: DNS, TCP, TLS, login, "
    "capabilities, and each folder opened read-only with its message count (repeatable)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def check(verbose: bool, accounts: Tuple[str, ...], as_json: bool, **options: Any) -> Exit:
    from mailbox_relay.check import crashed, render, run_check

    try:
        with usage_errors():
            report = run_check(options, os.environ, to_stderr if verbose else nowhere, accounts)
    except click.ClickException:
        raise
    except Exception as error:  # check exits with its own codes only, even on a bug of ours
        report = crashed(error)
    if as_json:
        import json

        say(json.dumps(report.as_json(), indent=2), err=False)
    else:
        try:
            render(report, sys.stdout)
        except (OSError, ValueError):  # the reader went away: the exit code still tells
            mute(sys.stdout)
    return report.exit_code
