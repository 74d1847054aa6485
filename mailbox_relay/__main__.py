"""`python -m mailbox_relay` runs the same entry point as the `mailbox-relay` script."""

from mailbox_relay.cli import main

# Guarded: import's worker processes (spawn) import the parent's __main__ module.
if __name__ == "__main__":
    main()
