"""The options commands share, built from settings' fields: each is declared once, in settings.py.

Values reach the settings as typed (no click `type=`): the field's parser checks them, so a
value is validated once, the same way whether it came from an option, the environment or TOML.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple, TypeVar

import click

from mailbox_relay.outcome import Exit, UsageError
from mailbox_relay.settings import CONFIG, CONNECTION, FIELDS, PASSWORD_ENV, Field, Settings

F = TypeVar("F", bound=Callable[..., Any])


def field_help(field: Field[Any]) -> str:
    """The field's help, ending with its default and environment names, the same way everywhere."""
    shown = f"default: {field.shown_default}; " if field.shown_default else ""
    return f"{field.help} [{shown}env: {', '.join(field.env)}]"


def field_option(field: Field[Any]) -> Callable[[F], F]:
    if field.is_switch:  # default None: "not given", so the environment and config still count
        return click.option(field.flag, is_flag=True, default=None, help=field_help(field))
    choices = getattr(field.parse, "choices", None)
    metavar = f"[{'|'.join(choices)}]" if choices else field.metavar
    return click.option(field.flag, metavar=metavar, multiple=field.multiple, help=field_help(field))


def _refuse_password_on_argv(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> None:
    if value is not None:
        raise click.BadParameter(
            f"passwords are never accepted on the command line (other users can read it there): "
            f"set {PASSWORD_ENV[0]}, or use --password-file"
        )


# Only there to refuse a password on argv with advice, instead of "no such option".
_PASSWORD_REFUSED = click.option(
    "--password", hidden=True, expose_value=False, callback=_refuse_password_on_argv
)

VERBOSE_HELP = "Log every setting and where it came from to stderr. Never logs the password."


def _verbose(help_text: str) -> Callable[[F], F]:
    return click.option("-v", "--verbose", is_flag=True, help=help_text)


def exit_codes_help(rows: Sequence[Tuple[Exit, str]], title: str = "Exit codes") -> str:
    """A command's exit-code table for its --help: the numbers from `Exit`, one row each."""
    import textwrap  # only the help of the commands people run: deliver never pays for it

    lines = ["\b", f"{title}:"]
    for code, meaning in rows:
        first, *rest = textwrap.wrap(meaning, 80)
        lines.append(f"  {int(code):>2}  {first}")
        lines += [f"      {line}" for line in rest]
    return "\n".join(lines) + "\n"


def account_option(help_text: str) -> Callable[[F], F]:
    """--account NAME (repeatable): which [accounts.NAME] tables a command works on."""
    return click.option("--account", "accounts", multiple=True, metavar="NAME", help=help_text)


def _apply(decorators: Sequence[Callable[[Any], Any]], command: F) -> F:
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


def settings_options(*groups: str, verbose: str = VERBOSE_HELP) -> Callable[[F], F]:
    """The options of every field in these groups (settings.CONNECTION, DELIVERY, ...), in order;
    with CONNECTION also -v, whose help (`verbose`) says what it logs for this command."""

    def decorate(command: F) -> F:
        fields = [field for group in groups for field in FIELDS.values() if field.group == group]
        decorators = [field_option(field) for field in fields]
        if CONNECTION in groups:
            decorators += [_PASSWORD_REFUSED, _verbose(verbose)]
        return _apply(decorators, command)

    return decorate


def field_options(*fields: Field[Any]) -> Callable[[F], F]:
    """The options of just these fields (status: --fetch-state and --config, nothing it ignores)."""

    def decorate(command: F) -> F:
        return _apply([field_option(field) for field in fields], command)

    return decorate


def config_option(command: F) -> F:
    """--config alone, for a command that reads the config file but talks to no ingress (status)."""
    return field_option(CONFIG)(command)


def password_options(command: F) -> F:
    """Where a password may come from, for a command that needs only that (serve)."""
    return _apply([field_option(Settings.password_file), field_option(CONFIG), _PASSWORD_REFUSED], command)


@contextmanager
def usage_errors() -> Iterator[None]:
    """A bad option value found by a field's parser is a usage error, reported as click's are."""
    try:
        yield
    except UsageError as error:
        raise click.UsageError(error.outcome.detail, ctx=click.get_current_context()) from None
