"""The command line: parse options, call the core, and map its outcome to an exit code, once.

Kept thin and cheap to import: every delivered message pays for what `deliver` imports, so the
other commands live in commands.py, loaded only when asked for, and import their machinery
(rich, sqlite3, http.server, multiprocessing) inside their own functions.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, ClassVar, Dict, List, NoReturn, Optional, Sequence

import click

from mailbox_relay import __version__
from mailbox_relay.outcome import QMAIL, SYSEXITS, Kind, Outcome, Reason, exit_code
from mailbox_relay.settings import FIELDS
from mailbox_relay.signals import Interrupted, signals_interrupt

F = Callable[..., Any]

# Usage errors in commands that an MTA runs must not exit 2 (a bounce): they are temporary.
_USAGE_EXIT = {"check": 64, "serve": 64, "import": 64}


def _env_names(name: str) -> str:
    return ", ".join(FIELDS[name].env)


def option_help(text: str, name: str, default: Optional[str] = None) -> str:
    """Option help that ends with its default and environment names, the same way everywhere."""
    shown = f"default: {default}; " if default else ""
    return f"{text} [{shown}env: {_env_names(name)}]"


def refuse_password_on_argv(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> None:
    if value is not None:
        raise click.BadParameter(
            "passwords are never accepted on the command line (other users can read it there): "
            "set MAILBOX_RELAY_PASSWORD, or use --password-file"
        )


def connection_options(command: F) -> F:
    """The options every command that talks to an ingress shares, each with its env name."""
    options = [
        click.option(
            "--url",
            metavar="URL",
            help=option_help(
                "Relay ingress URL; a bare https://host gets /rails/action_mailbox/relay/inbound_emails.",
                "url",
            ),
        ),
        click.option(
            "--password-file",
            metavar="PATH",
            type=click.Path(dir_okay=False),
            help=option_help(
                "Read the ingress password from the first line of PATH. Otherwise "
                "MAILBOX_RELAY_PASSWORD, then INGRESS_PASSWORD, then the config file.",
                "password_file",
            ),
        ),
        click.option("--password", hidden=True, expose_value=False, callback=refuse_password_on_argv),
        click.option(
            "--config",
            metavar="PATH",
            type=click.Path(dir_okay=False),
            help="TOML file with the same keys (url, password_file, timeout, ...). Default "
            "$XDG_CONFIG_HOME/mailbox-relay/config.toml, then /etc/mailbox-relay/config.toml. "
            "[env: MAILBOX_RELAY_CONFIG]",
        ),
        click.option(
            "--timeout",
            type=float,
            metavar="SECONDS",
            help=option_help("Per-attempt connect and read timeout.", "timeout", "30"),
        ),
        click.option(
            "--ca-bundle",
            metavar="PATH",
            type=click.Path(dir_okay=False),
            help=option_help("Verify TLS with this CA bundle.", "ca_bundle"),
        ),
        click.option(
            "--insecure",
            is_flag=True,
            default=None,
            help=option_help("Do not verify the TLS certificate (not recommended).", "insecure"),
        ),
        click.option(
            "--allow-http",
            is_flag=True,
            default=None,
            help=option_help(
                "Allow sending the password over plain http:// to a host that is not loopback.",
                "allow_http",
            ),
        ),
        click.option(
            "--user-agent",
            metavar="TEXT",
            help=option_help("User-Agent header.", "user_agent", "mailbox-relay/VERSION"),
        ),
        click.option(
            "-v",
            "--verbose",
            is_flag=True,
            help="Log every setting and where it came from (and, for deliver, each attempt) to "
            "stderr. Never logs the password.",
        ),
    ]
    return _apply(options, command)


def _apply(options: Sequence[Callable[[Any], Any]], command: F) -> F:
    for option in reversed(options):
        command = option(command)
    return command


def delivery_options(command: F) -> F:
    """Options of the commands that deliver messages (deliver, import)."""
    options = [
        click.option(
            "--retry-for",
            type=float,
            metavar="SECONDS",
            help=option_help(
                "Keep retrying network errors, timeouts, 408, 429 and 5xx for this long "
                "(0: one attempt). The last attempt may take up to --timeout more.",
                "retry_for",
                "60",
            ),
        ),
        click.option(
            "--max-size",
            metavar="BYTES",
            help=option_help(
                "Refuse larger messages as permanently undeliverable; K/M/G suffixes allowed.",
                "max_size",
                "no limit",
            ),
        ),
        click.option(
            "--envelope-recipient",
            multiple=True,
            metavar="ADDR",
            help=option_help(
                "Prepend X-Original-To: ADDR (unless present) so Action Mailbox routes Bcc, "
                "forwarded and catch-all mail. Repeatable, or one space/comma separated list "
                "as fetchmail's %T gives.",
                "envelope_recipient",
            ),
        ),
    ]
    return _apply(options, command)


class LazyGroup(click.Group):
    """Loads the commands that MTAs never run only when asked for (see commands.py)."""

    LAZY: ClassVar[Dict[str, str]] = {"import": "import_", "check": "check", "serve": "serve"}

    def list_commands(self, ctx: click.Context) -> List[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name in self.LAZY:
            from mailbox_relay import commands

            command: click.Command = getattr(commands, self.LAZY[name])
            return command
        return super().get_command(ctx, name)


@click.group(
    cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="mailbox-relay")
def cli() -> None:
    """Move email into a Rails app's Action Mailbox relay ingress, safely.

    \b
    deliver  one message from stdin (getmail, fetchmail, procmail, Postfix, Exim, qmail)
    import   mbox files, Maildirs and .eml trees, resumably and fast
    check    diagnose the settings and the ingress without creating anything
    serve    a local relay ingress that answers like Action Mailbox, into a Maildir
    """


DELIVER_HELP = """Deliver one message (FILE, or stdin) to the Action Mailbox relay ingress.

Checks that it is an RFC 822 message, strips one leading mbox "From " line, posts it as
message/rfc822 with Basic auth (user actionmailbox), and retries what may work later.
Prints nothing on success.

\b
Exit codes:           sysexits   qmail
  delivered (2xx)            0       0
  invalid message           65     100   permanent: the caller bounces it
  anything else             75     111   temporary: the caller keeps it and retries

On failure one line on stderr says what to do next, led by an enhanced status code
(4.x.x or 5.x.x) that Postfix uses.

\b
Example (getmail MDA_external, Postfix pipe, fetchmail mda):
  MAILBOX_RELAY_URL=https://app.example.com MAILBOX_RELAY_PASSWORD=... \\
    mailbox-relay deliver < message.eml
"""


@cli.command(help=DELIVER_HELP)
@connection_options
@delivery_options
@click.option(
    "--exit-codes",
    type=click.Choice(["sysexits", "qmail"]),
    help=option_help("Exit-code convention.", "exit_codes", "sysexits"),
)
@click.argument("file", required=False, type=click.Path(dir_okay=False, allow_dash=True))
def deliver(file: Optional[str], verbose: bool, **options: Any) -> int:
    from mailbox_relay.deliver import deliver as deliver_message
    from mailbox_relay.deliver import exit_style, read_message

    style = exit_style(options, os.environ)
    log = stderr_log if verbose else no_log
    notes: List[str] = []
    with signals_interrupt(), _captured_warnings(notes):
        try:
            outcome, style, more = deliver_message(
                options, os.environ, lambda: read_message(file, sys.stdin.buffer), log, style
            )
            notes += more
        except Interrupted as signal_name:
            outcome = Outcome(
                Reason.INTERRUPTED,
                f"interrupted by {signal_name} before the ingress confirmed delivery; "
                "the message will be retried",
            )
        except Exception as error:  # the boundary: a crash must defer, never bounce
            outcome = _internal_error(error)
    return _finish(outcome, style, notes, verbose)


def _finish(outcome: Outcome, style: str, notes: List[str], verbose: bool) -> int:
    if not outcome.delivered:
        click.echo(outcome.line(), err=True)
    if verbose or not outcome.delivered:
        for note in dict.fromkeys(notes):
            click.echo(note, err=True)
    if verbose and outcome.delivered:
        click.echo("delivered", err=True)
    return exit_code(outcome, style)


def _internal_error(error: BaseException) -> Outcome:
    return Outcome(
        Reason.INTERNAL,
        f"internal error ({type(error).__name__}: {error}); the message was not delivered and "
        "will be retried; please report this",
    )


def stderr_log(line: str) -> None:
    click.echo(f"mailbox-relay: {line}", err=True)


def no_log(line: str) -> None:
    pass


class _captured_warnings:
    """Python warnings go to `notes` (shown on failure or -v): stderr must stay silent on success."""

    def __init__(self, notes: List[str]) -> None:
        self.notes = notes

    def __enter__(self) -> None:
        import warnings

        self.previous = warnings.showwarning
        warnings.showwarning = self._record

    def _record(self, message: Any, category: Any, *rest: Any, **kw: Any) -> None:
        self.notes.append(f"warning: {category.__name__}: {message}")

    def __exit__(self, *exc: object) -> None:
        import warnings

        warnings.showwarning = self.previous


def _command_name(error: click.ClickException) -> str:
    ctx = getattr(error, "ctx", None)
    return (ctx.info_name or "") if ctx is not None and ctx.parent is not None else ""


def _usage_error(error: click.ClickException, args: List[str]) -> int:
    command = _command_name(error)
    if command in _USAGE_EXIT:
        error.show()
        return _USAGE_EXIT[command]
    codes = QMAIL if "qmail" in args or os.environ.get("MAILBOX_RELAY_EXIT_CODES") == "qmail" else SYSEXITS
    where = f"mailbox-relay {command} --help" if command else "mailbox-relay --help"
    message = error.format_message().rstrip(".")
    click.echo(f"{Reason.CONFIG.code} usage error: {message}; see {where}", err=True)
    return codes[Kind.TEMPORARY]


# click >= 8.2 raises this for a bare `mailbox-relay`; older versions print the help and exit 0.
_NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


def run(argv: Optional[List[str]] = None) -> int:
    """Run the CLI and return its exit code; the one place outcomes become exit codes."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        result = cli.main(args=args, prog_name="mailbox-relay", standalone_mode=False)
    except _NO_ARGS_IS_HELP as error:  # `mailbox-relay` alone: the help, as a usage error
        error.show()
        return 64
    except click.ClickException as error:
        return _usage_error(error, args)
    except click.exceptions.Abort:
        return SYSEXITS[Kind.TEMPORARY]
    except Exception as error:  # the last boundary: a crash is temporary, never exit 1
        click.echo(_internal_error(error).line(), err=True)
        return SYSEXITS[Kind.TEMPORARY]
    return result if isinstance(result, int) else 0


def main(argv: Optional[List[str]] = None) -> NoReturn:
    sys.exit(run(argv))
