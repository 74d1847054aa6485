"""`auth`: obtain and store the first OAuth2 grant of an `auth = "xoauth2"` account."""

from __future__ import annotations

import os
from typing import Any, Optional

import click

from mailbox_relay.cli.options import config_option, exit_codes_help, usage_errors
from mailbox_relay.log import say, to_stderr, to_stderr_error
from mailbox_relay.outcome import AUTH_EXITS, Exit, Trouble, auth_exit_code

AUTH_HELP = f"""Sign in to an IMAP account's OAuth2 provider once, and store the grant.

ACCOUNT is an [accounts.NAME] table with auth = "xoauth2" and oauth2_client_id. The grant (a
refresh token) is saved in a 0600 file, oauth2_token_file (default:
$XDG_STATE_HOME/mailbox-relay/oauth2/ACCOUNT.json); fetch, watch and check then refresh the
access tokens themselves, and save a rotated refresh token each time.

\b
Two flows, both usable over SSH on a headless mail host:
  device    prints an address and a code to enter on any device (Microsoft's default)
  loopback  prints an address to open in a browser, which comes back to 127.0.0.1:PORT on
            this host, with PKCE (Google's default; Google's device flow does not grant
            Gmail). On a headless host, forward the port first:
            ssh -L 8765:127.0.0.1:8765 mailhost, then auth ACCOUNT --port 8765

{exit_codes_help(AUTH_EXITS)}"""


@click.command(
    "auth", help=AUTH_HELP, short_help="Sign in to an account's OAuth2 provider and store the grant."
)
@click.argument("account")
@config_option
@click.option(
    "--flow",
    type=click.Choice(["device", "loopback"]),
    help="How to sign in. Default: device where the provider has a device endpoint, else loopback.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    metavar="PORT",
    default=0,
    show_default=True,
    help="Loopback flow: the port on 127.0.0.1 to listen on (0: any free port; fix one to forward it).",
)
@click.option(
    "--wait",
    "wait_seconds",
    type=click.FloatRange(1, 3600),
    metavar="SECONDS",
    default=300,
    show_default=True,
    help="How long to wait for the sign-in, in seconds.",
)
def auth(account: str, flow: Optional[str], port: int, wait_seconds: float, **options: Any) -> Exit:
    from mailbox_relay.accounts import load_accounts
    from mailbox_relay.settings import open_layers
    from mailbox_relay.sources import oauth2

    try:
        with usage_errors():
            chosen = load_accounts(open_layers(options, os.environ), [account])[0]
        settings = oauth2.refreshable(chosen)
        provider = settings.provider
        flow = flow or ("device" if provider.device_url else "loopback")
        say(
            f"Authorising account {chosen.name} ({chosen.username} at {chosen.host}) with the {flow} flow; "
            f"client {settings.client_id}; scopes: {' '.join(provider.scopes) or '(none)'}"
        )
        if flow == "device":
            answer = oauth2.device_flow(chosen, say, wait_seconds)
        else:
            answer = oauth2.loopback_flow(chosen, say, port, wait_seconds)
        token = oauth2.store_first_grant(chosen, answer)
    except oauth2.TokenProblem as problem:
        to_stderr_error(problem.line)
        return auth_exit_code(Trouble.of(problem.kind))
    # A ConfigError (the config file, the client secret file, the grant file) ends at cli.run: 78.
    except KeyboardInterrupt:
        to_stderr(f"interrupted; nothing was saved: run `mailbox-relay auth {account}` again")
        return Exit.TEMPFAIL
    say(
        f"Account {chosen.name} is authorised; the grant is saved in {settings.token_file} "
        f"({'scopes ' + token.scopes if token.scopes else 'scopes as asked'}).",
        err=False,
    )
    return Exit.OK
