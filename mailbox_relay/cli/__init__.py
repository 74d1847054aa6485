"""The command line: the group, a lazy loader for its commands, and `run`, the one error boundary.

Every delivered message pays for what `deliver` imports, so each command lives in its own module
(deliver, import_, check, fetch, serve), loaded only when it is asked for, and imports its machinery
(rich, sqlite3, http.server, multiprocessing) inside its own function.

Commands return an `Outcome` (deliver) or an `Exit` (the others); only `run` turns them into a
number, and only `exit_style` decides between sysexits and qmail codes.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Any, Dict, List, Mapping, NoReturn, Optional, Sequence, Tuple

import click

from mailbox_relay import __version__
from mailbox_relay.log import flush_or_mute, say, to_stderr, to_stderr_error
from mailbox_relay.outcome import (
    QMAIL,
    SYSEXITS,
    ConfigError,
    Exit,
    Kind,
    Outcome,
    Reason,
    UsageError,
    exit_code,
    internal_error,
)
from mailbox_relay.settings import CONFIG, EXIT_CODES, Layers, PasswordFileWarning, open_layers

# name -> "module:function". The order is the order of the top-level --help.
COMMANDS: Dict[str, str] = {
    "deliver": "mailbox_relay.cli.deliver:deliver",
    "import": "mailbox_relay.cli.import_:import_",
    "check": "mailbox_relay.cli.check:check",
    "fetch": "mailbox_relay.cli.fetch:fetch",
    "watch": "mailbox_relay.cli.fetch:watch",
    "status": "mailbox_relay.cli.fetch:status",
    "auth": "mailbox_relay.cli.auth:auth",
    "serve": "mailbox_relay.cli.serve:serve",
    "migrate": "mailbox_relay.cli.migrate:migrate",
}

# Commands that people run, never an MTA: their usage errors exit 64 (EX_USAGE). Anything else
# (deliver, a missing or unknown command) may be an MTA's pipe, where 64 bounces: it exits 75.
FOR_PEOPLE = frozenset({"import", "check", "fetch", "watch", "status", "auth", "serve", "migrate"})


class LazyGroup(click.Group):
    """Imports a command's module only when that command is asked for."""

    def list_commands(self, ctx: click.Context) -> List[str]:
        return list(COMMANDS)

    def resolve_command(
        self, ctx: click.Context, args: List[str]
    ) -> Tuple[Optional[str], Optional[click.Command], List[str]]:
        name = args[0] if args else ""
        if name not in COMMANDS and not name.startswith("-") and not ctx.resilient_parsing:
            raise click.UsageError(_no_such_command(name), ctx=ctx)
        return super().resolve_command(ctx, args)

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name not in COMMANDS:
            return None
        module, _, function = COMMANDS[name].partition(":")
        command: click.Command = getattr(importlib.import_module(module), function)
        return command


TOP_HELP = f"""Move email into a Rails app's Action Mailbox relay ingress, safely.

`mailbox-relay COMMAND --help` shows a command's options and exit codes.

A usage error exits {int(SYSEXITS[Kind.TEMPORARY])}, a temporary failure \
({int(QMAIL[Kind.TEMPORARY])} with --exit-codes qmail), not {int(Exit.USAGE)}, when it is made at the top \
level (no command, an unknown command) or in the command deliver: a typo in a master.cf or \
getmailrc line must defer mail, not bounce it. The other commands exit {int(Exit.USAGE)} on a usage \
error, and {int(Exit.CONFIG)} when a setting is wrong.
"""


@click.group(
    cls=LazyGroup,
    help=TOP_HELP,
    no_args_is_help=False,  # `mailbox-relay < message` is an MTA's mistake: exit 75, not help
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="mailbox-relay")
def cli() -> None:
    pass


def _no_such_command(name: str) -> str:
    """Unknown command, with the nearest ones (`imprt` -> import) if any."""
    import difflib  # only for a mistyped command: deliver never pays for it

    close = difflib.get_close_matches(name, list(COMMANDS), n=2, cutoff=0.6)
    if close:
        return f"no such command {name!r} (did you mean {_either(close)}?)"
    return f"no such command {name!r}"


def _either(names: Sequence[str]) -> str:
    quoted = [repr(name) for name in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def usage_text(error: click.ClickException) -> str:
    """click's message as one line of ours: lower case first word, no final full stop, and a
    "did you mean" for a mistyped option."""
    if isinstance(error, click.NoSuchOption):
        text = f"no such option {error.option_name!r}"
        if error.possibilities:
            text += f" (did you mean {_either(sorted(error.possibilities))}?)"
        return text
    text = error.format_message().strip().rstrip(".")
    if text[:2].isalpha() and text[0].isupper() and text[1].islower():
        text = text[0].lower() + text[1:]
    return text


def exit_style(args: Sequence[str], environ: Mapping[str, str]) -> str:
    """sysexits or qmail: --exit-codes, else the environment, else the config file.

    The one place the convention is chosen. It reads the arguments itself, so a usage error
    (which click raises before any command runs) still exits in the caller's convention.
    """
    options = {
        EXIT_CODES.name: _last_value(args, EXIT_CODES.flag),
        CONFIG.name: _last_value(args, CONFIG.flag),
    }
    try:
        return open_layers(options, environ).get(EXIT_CODES)[0]
    except ConfigError:
        pass
    try:  # an unreadable config file: the option or the environment still count
        return Layers(options, environ).get(EXIT_CODES)[0]
    except ConfigError:
        return EXIT_CODES.default or "sysexits"


def _last_value(args: Sequence[str], flag: str) -> Optional[str]:
    """The value of `flag` in `args` (`--flag VALUE` or `--flag=VALUE`); the last one wins."""
    value = None
    for index, arg in enumerate(args):
        if arg == "--":
            break
        if arg == flag and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1 :]
    return value


def _command_name(error: click.ClickException, args: Sequence[str]) -> str:
    """The command whose usage was wrong ("" for mailbox-relay itself). click leaves some errors
    without a context (an option missing its value): then the first argument names it."""
    ctx = getattr(error, "ctx", None)
    if ctx is not None:
        return (ctx.info_name or "") if ctx.parent is not None else ""
    first = next((arg for arg in args if not arg.startswith("-")), "")
    return first if first in COMMANDS else ""


def _usage_error(error: click.ClickException, args: Sequence[str], environ: Mapping[str, str]) -> Any:
    """One line each. A person's command exits 64. deliver and mailbox-relay itself may be an
    MTA's pipe, where 64 bounces: a temporary failure, which the line says (deliver's leads with
    the enhanced status code Postfix reads)."""
    command = _command_name(error, args)
    where = f"`mailbox-relay {command} --help`" if command else "`mailbox-relay --help`"
    text = f"{usage_text(error)}; see {where}"
    if command in FOR_PEOPLE:
        to_stderr_error(text)
        return Exit.USAGE
    outcome = Outcome(Reason.CONFIG, f"usage error: {text}")
    code = int(exit_code(outcome, exit_style(args, environ)))
    kept = f"exit {code}, temporary, so a mail program that ran this keeps the message"
    if command:  # deliver: an MTA reads this line
        say(f"{outcome.line()} ({kept})")
    else:
        to_stderr_error(f"{text} ({kept})")
    return outcome


def _config_error(error: ConfigError, args: Sequence[str]) -> Any:
    """A setting is wrong: one line and 78 from every command people run (64 if the value was
    typed as an option). Anything else may be an MTA's pipe: a temporary failure, as deliver's."""
    command = next((arg for arg in args if not arg.startswith("-")), "")
    if command in FOR_PEOPLE:
        to_stderr_error(error.outcome.detail)
        return Exit.USAGE if isinstance(error, UsageError) else Exit.CONFIG
    return _said(error.outcome)


def _said(outcome: Outcome) -> Outcome:
    """The one line of a failure the boundary itself met (commands report their own)."""
    say(outcome.line())
    return outcome


def _show_warning(message: Any, category: Any, *rest: Any, **kwargs: Any) -> None:
    to_stderr(f"warning: {message}")


def run(argv: Optional[List[str]] = None, environ: Optional[Mapping[str, str]] = None) -> int:
    """Run the CLI and return its exit code: the one place outcomes become numbers."""
    args = sys.argv[1:] if argv is None else list(argv)
    environ = os.environ if environ is None else environ
    warnings.showwarning = _show_warning  # one line each, in our prefix (deliver records its own)
    warnings.simplefilter("always", PasswordFileWarning)  # every run says it, not the first only
    try:
        result = cli.main(args=args, prog_name="mailbox-relay", standalone_mode=False)
    except click.ClickException as error:
        result = _usage_error(error, args, environ)
    except ConfigError as error:
        result = _config_error(error, args)
    except click.exceptions.Abort:
        result = _said(Outcome(Reason.INTERRUPTED, "interrupted; nothing was delivered"))
    except Exception as error:  # the last boundary: a crash is temporary, never exit 1
        result = _said(internal_error(error))
    if isinstance(result, Outcome):
        return int(Exit.OK if result.delivered else exit_code(result, exit_style(args, environ)))
    return int(result or 0)


def main(argv: Optional[List[str]] = None) -> NoReturn:
    code = run(argv)
    flush_or_mute()  # a reader that went away must not turn the exit code into 120 at shutdown
    sys.exit(code)
