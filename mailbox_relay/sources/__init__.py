"""Where messages come from: files (mbox, Maildir, .eml) for import, and the mailbox sources
fetch and watch read, each one module behind the protocol in mailbox.py (IMAP, POP3, Graph).

A new source is one module with a `connect_source(account)` and one line in `connect` below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailbox_relay.accounts import Account
    from mailbox_relay.sources.mailbox import Source


def connect(account: Account) -> Source:
    """A logged-in source for the account, by its kind (each imported only when used)."""
    from mailbox_relay.sources.mailbox import SourceProblem

    kind = getattr(account, "source", "imap")
    if kind == "imap":
        from mailbox_relay.sources.imap import connect_source

        return connect_source(account)
    if kind == "pop3":
        from mailbox_relay.sources.pop3 import connect_source as connect_pop3

        return connect_pop3(account)
    if kind == "graph":
        from mailbox_relay.sources.graph import connect_source as connect_graph

        return connect_graph(account)
    raise SourceProblem("protocol", f"account {account.name}: source {kind!r} is not supported yet")
