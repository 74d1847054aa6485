"""What the ingress's answer means: an HTTP status or a network error, mapped to an Outcome.

Both classifiers live here, side by side, so every way a post can end is read in one place.
Each detail line says what to do next.
"""

from __future__ import annotations

import socket
import time
from typing import Callable, Iterator, List, Optional

import requests

from mailbox_relay.ingress.endpoint import RELAY_PATH, UNREACHABLE_HINT, Endpoint, plain_http_hint
from mailbox_relay.ingress.formats import RELAY, Ingress
from mailbox_relay.outcome import DELIVERED, Outcome, Reason

# Paths that old guides (and the relay controller's own doc comment) print, but Rails never routed.
_WRONG_INGRESS_SEGMENTS = ("/postfix/", "/exim/", "/qmail/")


def _wrong_ingress_path(url: str) -> bool:
    """`url` is Endpoint's (already checked): no host holds a "/", so this looks at the path."""
    path = url.split("?", 1)[0].split("#", 1)[0]
    return any(segment in path for segment in _WRONG_INGRESS_SEGMENTS)


def _not_found_detail(url: str, ingress: Ingress) -> str:
    if ingress is not RELAY:
        return (
            f"no {ingress.name} ingress at {url} (HTTP 404): check the URL ends in {ingress.path} and "
            f"the app sets config.action_mailbox.ingress = :{ingress.name} (mailbox-relay check finds "
            "the ingress the app uses)"
        )
    if _wrong_ingress_path(url):
        fixed = url.split("/rails/action_mailbox/")[0] + RELAY_PATH
        return (
            f"no relay ingress at {url} (HTTP 404): Rails only routes {RELAY_PATH}; "
            f"use {fixed} (the app must set config.action_mailbox.ingress = :relay)"
        )
    return (
        f"no relay ingress at {url} (HTTP 404): check the URL ends in {RELAY_PATH} and the app "
        "sets config.action_mailbox.ingress = :relay"
    )


def classify_response(
    status: int,
    *,
    url: str,
    location: Optional[str] = None,
    size: Optional[int] = None,
    password_source: str = "the configured password",
    retry_after: Optional[float] = None,
    ingress: Ingress = RELAY,
) -> Outcome:
    """Map an HTTP status from the ingress to its outcome and a line that says what to do."""
    if 200 <= status < 300:
        return DELIVERED
    if 300 <= status < 400:
        where = location or "(no Location header)"
        return Outcome(
            Reason.REDIRECT,
            f"ingress redirected to {where} (HTTP {status}): set the URL to the final address; "
            "mailbox-relay never follows redirects",
        )
    if status == 401:
        return Outcome(Reason.AUTH, _rejected_detail(ingress, password_source))
    if status == 403:
        return Outcome(
            Reason.FORBIDDEN,
            f"ingress refused access (HTTP 403): something in front of the app (proxy, firewall, "
            f"allow-list) blocks this client at {url}",
        )
    if status == 404:
        return Outcome(Reason.NOT_FOUND, _not_found_detail(url, ingress))
    if status == 413:
        of = f" of {size} bytes" if size is not None else ""
        return Outcome(
            Reason.INGRESS_LIMIT,
            f"message{of} is larger than the ingress accepts (HTTP 413): raise the proxy's body "
            "limit (nginx client_max_body_size, 1m by default)",
        )
    if status == 415 and ingress is RELAY:
        return Outcome(
            Reason.WRONG_MEDIA_TYPE,
            "ingress refused Content-Type message/rfc822 (HTTP 415): a proxy rewrites the "
            "Content-Type, or the URL is not an Action Mailbox relay ingress",
        )
    if status in (408, 429):
        what = "timed out reading the request" if status == 408 else "is rate limiting this client"
        return Outcome(
            Reason.BUSY,
            f"ingress {what} (HTTP {status}): it will be retried; lower the sending rate if it persists",
            retry_after,
        )
    if status >= 500:
        return Outcome(
            Reason.SERVER_ERROR,
            f"ingress failed with HTTP {status}: see the app's log (database, Active Storage, job "
            "queue, or no ingress password set on the server)",
            retry_after,
        )
    return Outcome(
        Reason.CLIENT_ERROR,
        f"ingress answered HTTP {status}, which Action Mailbox never sends: check the URL points at "
        f"the {ingress.name} ingress ({url})",
    )


def _rejected_detail(ingress: Ingress, source: str) -> str:
    if ingress.basic_auth:
        return (
            f"ingress rejected the password for user actionmailbox (HTTP 401): make {source} "
            f"match the app's {ingress.app_secret}"
        )
    also = (
        "; a clock more than 2 minutes behind also fails"
        if ingress.name == "mailgun"
        else "; the URL must be the one the app sees (scheme, host, port)"
    )
    return (
        f"ingress rejected the {ingress.secret} signature (HTTP 401): make {source} the app's "
        f"{ingress.app_secret}{also}"
    )


def parse_retry_after(value: Optional[str], now: Callable[[], float] = time.time) -> Optional[float]:
    """Seconds from a Retry-After header: delay-seconds or an HTTP-date. None if absent or junk."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() is true, and float("²") raises
        return float(value)
    from email.utils import parsedate_to_datetime  # rare: only servers that send a date

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now())


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and everything it wraps (urllib3 nests the socket error several levels deep)."""
    seen: List[int] = []
    todo: List[BaseException] = [error]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.append(id(current))
        yield current
        nested = [getattr(current, "reason", None), current.__cause__, current.__context__]
        nested += list(current.args)
        todo += [item for item in nested if isinstance(item, BaseException)]


def classify_error(error: requests.RequestException, endpoint: Endpoint, timeout: float) -> Outcome:
    """Map a requests exception to its outcome, naming host and port."""
    where = endpoint.host_port
    url = endpoint.url
    causes = list(_causes(error))
    if isinstance(error, requests.exceptions.SSLError):
        plain = next((hint for hint in map(plain_http_hint, causes) if hint), "")
        if plain:
            return Outcome(Reason.TLS, f"TLS with {where} failed ({_last_words(causes)}){plain}")
        return Outcome(
            Reason.TLS,
            f"TLS with {where} failed ({_last_words(causes)}): fix the server's certificate, or "
            "pass --ca-bundle with the CA that signed it",
        )
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return Outcome(
            Reason.TIMEOUT,
            f"could not connect to {where} within {timeout:g}s: is a firewall dropping packets?",
        )
    if isinstance(error, requests.exceptions.ReadTimeout):
        return Outcome(
            Reason.TIMEOUT,
            f"ingress at {where} did not answer within {timeout:g}s: raise --timeout if the app is slow",
        )
    if any(isinstance(cause, ConnectionRefusedError) for cause in causes):
        return Outcome(
            Reason.UNREACHABLE,
            f"connection refused by {where}: {UNREACHABLE_HINT}",
        )
    if any(isinstance(cause, socket.gaierror) for cause in causes):
        return Outcome(
            Reason.UNREACHABLE,
            f"cannot resolve {endpoint.host}: check the host name in the URL and DNS",
        )
    if isinstance(error, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema)):
        return Outcome(Reason.CONFIG, f"the ingress URL {url!r} is not usable: {error}")
    return Outcome(
        Reason.NETWORK,
        f"connection to {where} failed before the ingress answered ({_last_words(causes)})",
    )


def _last_words(causes: List[BaseException]) -> str:
    innermost = causes[-1]
    return f"{type(innermost).__name__}: {innermost}".strip().rstrip(":")
