"""`fetch`, `watch` and `status`: IMAP accounts into the ingress (see fetching.py, watcher.py)."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Tuple

import click

from mailbox_relay.cli.options import (
    account_option,
    exit_codes_help,
    field_options,
    settings_options,
    usage_errors,
)
from mailbox_relay.log import Log, nowhere, say
from mailbox_relay.outcome import FETCH_EXITS, STATUS_EXITS, WATCH_EXITS, Exit
from mailbox_relay.settings import (
    CONFIG,
    CONNECTION,
    DELIVERY,
    FAILED,
    FETCH,
    LOGS,
    WATCH,
    FetchSettings,
    WatchSettings,
)

ACCOUNTS = """
Accounts are [accounts.NAME] tables of the config file (see the README, "Fetching from
IMAP"): IMAP (source = "imap", the default), POP3 (source = "pop3") or Microsoft Graph
(source = "graph"). Messages are sent exactly as the server stores them (IMAP reads with
BODY.PEEK[], so nothing is marked \\Seen; Graph's download is spooled once), and `after`
(keep, seen, delete, move:FOLDER) is applied only once the ingress answered 2xx. The state
(per account and folder: where delivery has got, failures, quarantine) makes every run catch
up from where the last one stopped, however long ago.
"""

FETCH_HELP = f"""Fetch new mail from every account (or those named) once, then exit.
{ACCOUNTS}
A message the ingress refuses on its own (a 500 for that message only) is tried again on
later runs with growing delays, and quarantined after --max-tries once other messages got
through: it stays on the server, and `status` lists it. An invalid message is recorded and
left on the server. An answer every message would get (401, 404, TLS, connection refused)
pauses that folder until the next run.

{exit_codes_help(FETCH_EXITS)}"""

WATCH_HELP = f"""Stay connected and deliver each message as it arrives (IMAP IDLE, or polling).
{ACCOUNTS}
One process serves every account and folder, on one event loop. It logs one line per event
to stderr, never exits on network, IMAP or ingress trouble (it reconnects with backoff and
catches up), and on SIGTERM or Ctrl-C finishes the deliveries in flight (cut after a moment),
logs out and exits 0. SIGHUP reads the config again: added accounts and folders start, removed
ones log out, changed ones reconnect, the others keep their connections; a config that no
longer parses changes nothing (one line says why).

{exit_codes_help(WATCH_EXITS)}"""

STATUS_HELP = f"""Show, per account and folder, what fetch and watch have done (from the state file).

Last successful sync, delivered / failed / quarantined / invalid counts, the last error (IMAP,
token, password command, state or ingress) and when it happened, and whether a watch is
connected now: only while its last round-trip with the server is fresh (2 x idle_refresh +
timeout), not merely while its process exists. Changes nothing.

{exit_codes_help(STATUS_EXITS)}"""

_ACCOUNT = account_option("Only this account (repeatable); all accounts by default.")


@click.command(help=FETCH_HELP, short_help="Fetch new mail once: IMAP, POP3, Graph (cron, systemd timers).")
@_ACCOUNT
@settings_options(
    CONNECTION,
    DELIVERY,
    FETCH,
    FAILED,
    LOGS,
    verbose="Log every setting and where it came from, each account's settings, and each message "
    "found, delivered or failed, to stderr. Never logs a password or token.",
)
@click.option(
    "--retry-quarantined", is_flag=True, help="Give quarantined messages a fresh set of tries first."
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Print the summary only if something failed.")
def fetch(
    accounts: Tuple[str, ...],
    verbose: bool,
    retry_quarantined: bool,
    as_json: bool,
    quiet: bool,
    **options: Any,
) -> Exit:
    from mailbox_relay.fetch.once import fetch_once, open_context
    from mailbox_relay.logformat import operator_logs
    from mailbox_relay.signals import stop_signals

    stop: List[bool] = []
    # A ConfigError (a setting, the state file) ends at cli.run's boundary: 78, as for watch.
    with usage_errors():
        context = open_context(options, os.environ, accounts)
        _format, log, _errors = operator_logs(options, os.environ)
    if verbose:
        for line in context.describe():
            log(line)
    if retry_quarantined:
        _release(context, log)
    with stop_signals(lambda: stop.append(True)):
        summary = fetch_once(
            context, log=log, events=log if verbose else nowhere, stopping=lambda: bool(stop)
        )
    if as_json:
        import json

        say(json.dumps(summary.as_json(), indent=2), err=False)
    elif not quiet or summary.exit_code():
        for line in summary.lines():
            say(line, err=False)
    return summary.exit_code()


def _release(context: Any, log: Log) -> None:
    state = context.open_state()
    try:
        for account in context.accounts:
            count = state.release(account.name)
            if count:
                log(f"{account.name}: {count} quarantined messages get a fresh set of tries")
    finally:
        state.close()


@click.command(help=WATCH_HELP, short_help="Deliver mail as it arrives (IMAP IDLE, or polling); reconnects.")
@_ACCOUNT
@settings_options(
    CONNECTION,
    DELIVERY,
    FETCH,
    FAILED,
    LOGS,
    WATCH,
    verbose="Log every setting and where it came from, and each account's settings, to stderr at "
    "start. Never logs a password or token.",
)
@field_options(WatchSettings.jobs)
def watch(accounts: Tuple[str, ...], verbose: bool, **options: Any) -> Exit:
    from mailbox_relay.fetch.once import open_context
    from mailbox_relay.fetch.watch import run_watch
    from mailbox_relay.logformat import operator_logs
    from mailbox_relay.settings import WatchSettings, open_layers

    with usage_errors():  # a ConfigError ends at cli.run's boundary: 78
        context = open_context(options, os.environ, accounts)
        context.open_state().close()  # an unusable state file is a setting to fix: say it now
        _format, log, _errors = operator_logs(options, os.environ)
        listen = WatchSettings.resolve(open_layers(options, os.environ)).listen
    if verbose:
        for line in context.describe():
            log(line)
    if len(context.accounts) <= 20:
        names = ", ".join(f"{a.name} ({', '.join(a.folders)})" for a in context.accounts)
    else:
        names = f"{len(context.accounts)} accounts ({sum(len(a.folders) for a in context.accounts)} folders)"
    log(f"watching {names}; delivering to {context.settings.url}")
    # SIGHUP reads the config again, with the same options and environment
    return run_watch(context, log, lambda: open_context(options, os.environ, accounts), listen=listen)


@click.command(help=STATUS_HELP, short_help="What fetch and watch have done, per account and folder.")
@_ACCOUNT
@field_options(FetchSettings.fetch_state, CONFIG)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON on stdout.")
def status(accounts: Tuple[str, ...], as_json: bool, **options: Any) -> Exit:
    from mailbox_relay.fetch.status import folder_status

    with usage_errors():  # a ConfigError ends at cli.run's boundary: 78
        rows, path = folder_status(options, os.environ, accounts)
    if as_json:
        import json

        say(json.dumps({"state": path, "folders": rows}, indent=2), err=False)
        return Exit.OK
    if not rows:
        say(f"nothing fetched yet (state: {path})", err=False)
    for row in rows:
        for line in _status_lines(row):
            say(line, err=False)
    return Exit.OK


def _status_lines(row: Dict[str, Any]) -> List[str]:
    if row["watching"]:
        watching = f"watched now by pid {row['watcher_pid']} (since {_when(row['watcher_since'])})"
    elif row["watcher_pid"]:  # its process, or its last round-trip with the server, is gone
        pid = row["watcher_pid"]
        watching = f"not watched now (pid {pid}: no fresh round-trip with the server; stale at {_stale(row)})"
    else:
        watching = "not watched now"
    synced = f"last sync {_when(row['last_sync'])}" if row["synced"] else "never synced"
    lines = [
        f"{row['account']}/{row['folder']}: {synced}; {watching}",
        f"  delivered {row['delivered']}, failed {row['failed']}, quarantined {row['quarantined']}, "
        f"invalid {row['invalid']}; last delivery {_when(row['last_delivered'])}",
    ]
    if row["last_error"]:
        lines.append(f"  last error ({_when(row['last_error_at'])}): {row['last_error']}")
    for item in row["quarantined_uids"]:
        lines.append(f"  quarantined UID {item['uid']} after {item['tries']} tries: {item['reason']}")
    return lines


def _stale(row: Dict[str, Any]) -> str:
    """When the watch's heartbeat went stale: it was fresh until watcher_until."""
    until = row["watcher_until"]
    return _when(until) if until is not None else "its start"


def _when(timestamp: Optional[float]) -> str:
    if timestamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
