"""mailbox-relay: move email into a Rails app's Action Mailbox relay ingress, safely."""

__version__ = "0.2.0"
