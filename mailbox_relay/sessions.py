"""The one HTTP session factory: every request this tool makes (to the ingress, to an OAuth2
token endpoint, and to the sources to come) goes through a session made here.

What every session shares: our User-Agent; the environment (proxies, CA bundle) read once,
never ~/.netrc (trust_env off, so no credentials are swapped in); TLS verified unless the
caller says otherwise; and, for sessions used off the main thread, connections whose sockets
the thread's deadline shuts down (deadline.py), so a whole request is bounded in any thread.
Redirects are refused per request by the callers (`allow_redirects=False`).
"""

from __future__ import annotations

import os
from typing import Optional, Union

import requests


def new_session(
    url: str,
    user_agent: str,
    *,
    verify: Optional[Union[bool, str]] = None,
    threaded: bool = False,
) -> requests.Session:
    """A session for requests to `url`'s host. `verify`: True, False or a CA bundle path; by
    default REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, else certifi's, as requests would."""
    session = requests.Session()
    session.trust_env = False
    session.proxies.update(requests.utils.get_environ_proxies(url))
    if verify is None:
        verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    session.verify = verify
    session.headers["User-Agent"] = user_agent
    if threaded:
        from mailbox_relay.deadline import guarded

        guarded(session)
    return session
