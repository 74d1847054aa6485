"""`python -m mailbox_relay` runs the same entry point as the `mailbox-relay` script."""

from mailbox_relay.cli import main

main()
