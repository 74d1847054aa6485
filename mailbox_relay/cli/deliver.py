"""`mailbox-relay deliver`: the MDA. Imports nothing of the other commands (every message pays)."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, List, Optional

import click

from mailbox_relay.cli.options import settings_options
from mailbox_relay.log import nowhere, say, to_stderr
from mailbox_relay.outcome import DELIVER_EXITS, QMAIL, SYSEXITS, Exit, Outcome, Reason
from mailbox_relay.settings import CONNECTION, DELIVER, DELIVERY
from mailbox_relay.signals import Interrupted, signals_interrupt


def _exit_codes() -> str:
    """deliver's exit codes in both conventions, from outcome.py's maps (no textwrap: every
    delivered message would pay for it)."""
    rows = [
        f"  {meaning:<18}{int(SYSEXITS[kind]):>10}{int(QMAIL[kind]):>8}" + (f"   {note}" if note else "")
        for kind, meaning, note in DELIVER_EXITS
    ]
    return "\n".join(["\b", "Exit codes:           sysexits   qmail", *rows])


HELP = f"""Deliver one message (FILE, or stdin) to the Action Mailbox relay ingress.

Checks that it is an RFC 822 message, strips one leading mbox "From " line, posts it as
message/rfc822 with Basic auth (user actionmailbox), and retries what may work later.
Prints nothing on success.

{_exit_codes()}

"Anything else" includes usage errors: a typo in a master.cf or getmailrc line must defer
mail, not bounce it (MTAs bounce {int(Exit.USAGE)}).

On failure one line on stderr says what to do next, led by an enhanced status code
(4.x.x or 5.x.x) that Postfix uses.

\b
Example (getmail MDA_external, Postfix pipe, fetchmail mda):
  MAILBOX_RELAY_URL=https://app.example.com MAILBOX_RELAY_PASSWORD=... \\
    mailbox-relay deliver < message.eml
"""


@click.command(
    help=HELP, short_help="One message from stdin (getmail, fetchmail, procmail, Postfix, Exim, qmail)."
)
@settings_options(
    CONNECTION,
    DELIVERY,
    DELIVER,
    verbose="Log every setting and where it came from, and each attempt, to stderr (also on "
    "success, which is otherwise silent). Never logs the password.",
)
@click.argument("file", required=False, type=click.Path(dir_okay=False, allow_dash=True))
def deliver(file: Optional[str], verbose: bool, **options: Any) -> Outcome:
    from mailbox_relay.deliver import deliver as deliver_message
    from mailbox_relay.deliver import read_message

    log = to_stderr if verbose else nowhere
    # Warnings are recorded, not printed: stderr must stay silent on success (getmail, Exim).
    # A crash (a bug of ours) ends at cli.run, the one boundary: a temporary failure, never 1.
    with signals_interrupt(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            outcome = deliver_message(
                options, os.environ, lambda: read_message(file, getattr(sys.stdin, "buffer", None)), log
            )
        except Interrupted as signal_name:
            outcome = Outcome(
                Reason.INTERRUPTED,
                f"interrupted by {signal_name} before the ingress confirmed delivery; "
                "the message will be retried",
            )
    _report(outcome, [f"warning: {warning.message}" for warning in caught], verbose)
    return outcome


def _report(outcome: Outcome, notes: List[str], verbose: bool) -> None:
    """Nothing on success; on failure the one line, then any warnings (also with -v)."""
    if not outcome.delivered:
        say(outcome.line())
    if verbose or not outcome.delivered:
        for note in dict.fromkeys(notes):
            say(note)
    if verbose and outcome.delivered:
        say("delivered")
