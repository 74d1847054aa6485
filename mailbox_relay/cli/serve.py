"""`mailbox-relay serve`: a local relay ingress (see server.py)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import click

from mailbox_relay.cli.options import exit_codes_help, password_options, usage_errors
from mailbox_relay.ingress.formats import INGRESSES
from mailbox_relay.log import to_stderr, to_stderr_error
from mailbox_relay.outcome import SERVE_EXITS, Exit

HELP = f"""Run a local ingress that answers exactly like Action Mailbox's.

POST /rails/action_mailbox/relay/inbound_emails with Basic auth (user actionmailbox) and
Content-Type message/rfc822 gets 204 and the exact bytes land in the Maildir (tmp/, fsync,
new/, files 0600); a byte-identical re-post answers 204 and is not stored twice, as in
Rails. Anything else gets what Rails answers: 404 (other paths and methods), 401, 415, or 422
for an empty body; a request with conflicting Content-Length headers gets 400 and stores
nothing.

The password comes from MAILBOX_RELAY_PASSWORD, INGRESS_PASSWORD, --password-file or the
config file; serve refuses to start without one. Logs one line per request on stderr.

With --ingress postmark, sendgrid, mailgun or mandrill it takes that ingress's requests
instead, on its path, as Rails' controller does: Basic auth (postmark, sendgrid) or the
signature made with the password as signing key (mailgun) or API key (mandrill); the raw
message from RawEmail, email, body-mime or each inbound event's raw_msg.

{exit_codes_help(SERVE_EXITS)}"""


@click.command(
    help=HELP, short_help="A local relay ingress that answers like Action Mailbox, into a Maildir."
)
@click.option(
    "--host", metavar="ADDRESS", default="127.0.0.1", show_default=True, help="Address to listen on."
)
@click.option(
    "--port",
    metavar="PORT",
    default=3025,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on (0: any free port).",
)
@click.option(
    "--maildir",
    default="mailbox-relay-inbox",
    show_default=True,
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Maildir to store accepted messages in (created if missing).",
)
@click.option(
    "--ingress",
    type=click.Choice(list(INGRESSES)),
    default="relay",
    show_default=True,
    help="Which Action Mailbox ingress to answer as.",
)
@password_options
def serve(host: str, port: int, maildir: str, ingress: str, **options: Any) -> Exit:
    from mailbox_relay.maildir import MaildirWriter
    from mailbox_relay.outcome import ConfigError
    from mailbox_relay.server import answer, listen
    from mailbox_relay.settings import open_layers
    from mailbox_relay.signals import stop_signals

    with usage_errors():  # a ConfigError ends at cli.run's boundary: 78
        password = open_layers(options, os.environ).password()[0]
    if password is None:
        raise ConfigError("serve needs a password: set MAILBOX_RELAY_PASSWORD or pass --password-file")
    try:  # listen first: a server that cannot run creates no Maildir
        server = listen(host, port, to_stderr)
    except OSError as error:
        why = error.strerror or str(error)
        to_stderr_error(f"cannot listen on {host}:{port}: {why}; is another server there? Pass --port")
        return Exit.UNAVAILABLE
    try:
        try:
            inbox = MaildirWriter(maildir)
        except OSError as error:
            why = error.strerror or str(error)
            to_stderr_error(f"cannot use {maildir} as a Maildir: {why}; pass --maildir DIR")
            return Exit.CANTCREAT
        answer(server, password, inbox, INGRESSES[ingress])
        bound = server.server_address[1]
        where = f"http://{host}:{bound}{INGRESSES[ingress].path}"
        to_stderr(
            f"listening on {where}, as the {ingress} ingress, storing into {maildir}/new "
            "(Ctrl-C or SIGTERM stops)"
        )
        with stop_signals(_stop), contextlib.suppress(_Stopped):
            server.serve_forever(poll_interval=0.2)
        to_stderr("stopped")
    finally:
        server.server_close()
    return Exit.OK


class _Stopped(Exception):
    """Ctrl-C or SIGTERM: leave serve_forever and say `stopped` (exit 0), as watch does."""


def _stop() -> None:
    raise _Stopped
