"""Imported once, in the forkserver that import's workers are forked from (see workers.py):
everything a worker needs is loaded here, so a worker starts in milliseconds.

The forkserver shares the import's process group: Ctrl-C, systemd's SIGTERM or a hangup reach
it too. It ignores them (SIGINT it ignores already), so only the import decides what a signal
means; the forkserver exits when the import does (it reads EOF from the import's pipe), and the
workers, which the kernel kills when their parent dies, follow it.
"""

import signal

for _name in ("SIGTERM", "SIGHUP"):
    signal.signal(getattr(signal, _name), signal.SIG_IGN)

import mailbox_relay.cli  # noqa: E402  (the import's main script imports it in each worker)
import mailbox_relay.ingress.client  # noqa: E402  (requests, urllib3, the retry loop)
import mailbox_relay.workers  # noqa: E402,F401
