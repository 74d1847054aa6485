"""`deliver`: one message in, one outcome out. Reads settings, validates, posts; never prints."""

from __future__ import annotations

from typing import Any, BinaryIO, Callable, Mapping, Optional

from mailbox_relay.ingress.target import target_from
from mailbox_relay.log import Log
from mailbox_relay.message import prepare
from mailbox_relay.outcome import ConfigError, Outcome, RelayError
from mailbox_relay.settings import EXIT_CODES, open_layers


def read_message(file: Optional[str], stdin: Optional[BinaryIO]) -> bytes:
    """The raw message from FILE or stdin, as bytes (no decoding, no newline translation)."""
    if file in (None, "-"):
        return _read_stdin(stdin)
    try:
        with open(str(file), "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ConfigError(f"cannot read the message file {file}: {error.strerror}") from None


def _read_stdin(stdin: Optional[BinaryIO]) -> bytes:
    if stdin is None:  # started with stdin closed (`<&-`): Python then has no sys.stdin
        raise ConfigError("no message: stdin is closed; pipe the message in, or name a FILE")
    try:
        if stdin.isatty():
            raise ConfigError("no message: pipe one into stdin, or name a FILE")
        return stdin.read()
    except OSError as error:
        raise ConfigError(f"cannot read the message from stdin: {error.strerror or error}") from None


def deliver(
    options: Mapping[str, Any], environ: Mapping[str, str], read: Callable[[], bytes], log: Log
) -> Outcome:
    """Deliver one message. Settings warnings go through the `warnings` module (see cli.deliver)."""
    try:
        layers = open_layers(options, environ)
        layers.get(EXIT_CODES)  # checked here, so a typo is said; cli.exit_style picks the style
        settings = target_from(layers)
        for line in settings.describe():
            log(line)
        prepared = prepare(read(), recipients=settings.envelope_recipient, max_size=settings.max_size)
        log(f"message: {prepared.size} bytes to send, {len(prepared.prefix)} of them added headers")
        # Imported here: requests is the heaviest import, and a bad config or message skips it.
        from mailbox_relay.ingress.client import make_session, post_with_retry

        with make_session(settings) as session:
            return post_with_retry(session, settings, prepared, log=log)
    except RelayError as error:
        return error.outcome
