"""`status`: what fetch and watch have done, per account and folder, from the state file.

It creates nothing: a state file that does not exist yet means nothing was fetched. A folder
counts as watched now only while a live watch's last round-trip with the server is fresh (the
heartbeat watch.py writes), never because a pid exists.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from mailbox_relay.accounts import load_accounts
from mailbox_relay.processes import pid_alive
from mailbox_relay.settings import FetchSettings, open_layers
from mailbox_relay.state.folders import FetchState, default_path


def folder_status(
    options: Mapping[str, Any], environ: Mapping[str, str], names: Sequence[str]
) -> Tuple[List[Dict[str, Any]], str]:
    """Every folder's row of the state file (which is not created if missing), and its path."""
    layers = open_layers(options, environ)
    path = FetchSettings.resolve(layers).fetch_state or default_path(environ)
    if names:
        load_accounts(layers, names)  # a misspelt name is said, not shown as "nothing"
    if not os.path.exists(path):
        return [], path
    state = FetchState(path, readonly=True)  # status changes nothing, not even the layout
    try:
        rows = [row for row in state.report() if not names or row["account"] in names]
    finally:
        state.close()
    now = time.time()
    for row in rows:
        # Watched now: a live watch whose last server round-trip is fresh (as /readyz judges);
        # a pid alone would call a hung or spinning watch, or a renamed folder, watched.
        fresh = row["watcher_until"] is not None and row["watcher_until"] > now
        row["watching"] = fresh and pid_alive(row["watcher_pid"])
    return rows, path
