"""The HTTP side: `client` posts (one session factory, one retry loop), `answers` reads what came
back. Nothing else in mailbox-relay talks HTTP to an ingress."""
