"""`deliver`: one message in, one outcome out. Reads settings, validates, posts; never prints."""

from __future__ import annotations

from typing import Any, BinaryIO, Callable, List, Mapping, Optional, Tuple

from mailbox_relay.message import prepare
from mailbox_relay.outcome import ConfigError, Outcome, RelayError
from mailbox_relay.settings import Layers, open_layers, settings_from

Log = Callable[[str], None]


def read_message(file: Optional[str], stdin: BinaryIO) -> bytes:
    """The raw message from FILE or stdin, as bytes (no decoding, no newline translation)."""
    if file in (None, "-"):
        if stdin.isatty():
            raise ConfigError("no message: pipe one into stdin, or name a FILE")
        return stdin.read()
    try:
        with open(str(file), "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ConfigError(f"cannot read the message file {file}: {error.strerror}") from None


def exit_style(options: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    """The exit-code style from the option or env alone, for failures before the config is read."""
    try:
        return str(Layers(options, environ).get("exit_codes")[0])
    except ConfigError:
        return "sysexits"


def deliver(
    options: Mapping[str, Any],
    environ: Mapping[str, str],
    read: Callable[[], bytes],
    log: Log,
    style: str = "sysexits",
) -> Tuple[Outcome, str, List[str]]:
    """Deliver one message: (outcome, exit-code style, warnings worth showing on failure).

    `style` is what the option or env said (see exit_style); the config file may change it.
    """
    notes: List[str] = []
    try:
        layers = open_layers(options, environ)
        style = str(layers.get("exit_codes")[0])
        settings = settings_from(layers)
        notes += settings.warnings
        for line in settings.describe():
            log(line)
        prepared = prepare(read(), recipients=settings.envelope_recipients, max_size=settings.max_size)
        log(f"message: {prepared.size} bytes to send, {len(prepared.prefix)} of them added headers")
        # Imported here: requests is the heaviest import, and a bad config or message skips it.
        from mailbox_relay.ingress import make_session, post_with_retry

        with make_session(settings) as session:
            return post_with_retry(session, settings, prepared, log=log), style, notes
    except RelayError as error:
        return error.outcome, style, notes
