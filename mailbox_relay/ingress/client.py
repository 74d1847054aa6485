"""Talking to the ingress: one session factory and one post-with-retry. Nothing else posts.
How each of the five ingresses carries a message is in formats.py.

Retries (exponential backoff with jitter, or the server's Retry-After) happen only for answers
that may change by themselves: connect errors, resets, timeouts, 408, 429 and 5xx, and only
inside the --retry-for budget. The body is the same bytes on every attempt, so a re-post that
already reached Rails is deduplicated there.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Protocol, Tuple

import requests

from mailbox_relay.backoff import Backoff as Backoff  # watch reconnects with it too
from mailbox_relay.ingress import formats
from mailbox_relay.ingress.answers import classify_error, classify_response, parse_retry_after
from mailbox_relay.ingress.formats import RELAY
from mailbox_relay.ingress.target import Target
from mailbox_relay.log import Log, nowhere
from mailbox_relay.message import Prepared
from mailbox_relay.outcome import Outcome, Reason
from mailbox_relay.sessions import new_session
from mailbox_relay.signals import DeadlinePassed, deadline

RELAY_USER = "actionmailbox"


def make_session(target: Target, threaded: bool = False) -> requests.Session:
    """The ingress's session (sessions.new_session, plus its auth, type and TLS policy).

    `threaded`: for posts off the main thread, where SIGALRM cannot bound an attempt; its
    connections register their sockets with the thread's deadline (mailbox_relay.deadline),
    which shuts them down when --timeout passes. One such session per thread.

    Redirects are refused per request (`allow_redirects=False` in `_post`, the only post):
    requests' `max_redirects = 0` would raise before we could read the Location.
    """
    session = new_session(target.url, target.user_agent, verify=target.tls.verify, threaded=threaded)
    if target.ingress_format.basic_auth:  # mailgun and mandrill sign each request instead
        # As bytes: requests would encode a str password as Latin-1 (and fail on "€"), while
        # Rails compares the UTF-8 bytes.
        session.auth = requests.auth.HTTPBasicAuth(RELAY_USER.encode(), target.secret.encode("utf-8"))
    session.headers["Content-Type"] = "message/rfc822"
    # The environment (proxies, CA bundle) is read once, in new_session, instead of on every
    # post: requests scans os.environ twice per request otherwise, a quarter of an import's CPU.
    if target.tls.insecure:
        # The user opted out of verification explicitly; urllib3's per-request warning on stderr
        # would make getmail and Exim treat every delivery as failed.
        import warnings

        from urllib3.exceptions import InsecureRequestWarning

        warnings.simplefilter("ignore", InsecureRequestWarning)
    return session


class Body:
    """A file-like view of `prefix + raw[start:]`, so a large message is never copied to send."""

    def __init__(self, prepared: Prepared) -> None:
        self._parts = [memoryview(part) for part in prepared.parts() if len(part)]
        self._length = prepared.size

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        while self._parts and not len(self._parts[0]):
            self._parts.pop(0)
        if not self._parts:
            return b""
        part = self._parts[0]
        size = len(part) if size is None or size < 0 else size
        chunk, self._parts[0] = part[:size], part[size:]
        return bytes(chunk)


ANSWER_CAP = 64 * 1024  # of any answer's body, read at most this much: enough for an error page


def _post(
    session: requests.Session,
    target: Target,
    data: Any,
    size: int,
    headers: Optional[Dict[str, str]] = None,
) -> Tuple[Optional[int], Outcome]:
    """The one `session.post` in the project: (HTTP status or None, its outcome).

    --timeout bounds the whole attempt, and the status line decides: a 2xx is delivered
    whatever its body does afterwards (never ends, is not valid gzip, ...).
    """
    status: Optional[int] = None
    outcome: Optional[Outcome] = None
    try:
        with deadline(target.timeout):
            response = session.post(
                target.url,
                data=data,
                headers=headers,
                timeout=target.timeout,
                allow_redirects=False,
                stream=True,  # the body is read by _drain, capped, never whole
            )
            status, outcome = response.status_code, _classify(response, target, size)
            _drain(response)
    except requests.RequestException as error:
        return None, classify_error(error, target.endpoint, target.timeout)
    except DeadlinePassed:  # wherever it struck: if the status line had come, it decides
        if outcome is None:
            outcome = Outcome(
                Reason.TIMEOUT,
                f"ingress at {target.endpoint.host_port} did not answer within {target.timeout:g}s: "
                "raise --timeout if the app is slow",
            )
    return status, outcome


def _classify(response: requests.Response, target: Target, size: int) -> Outcome:
    return classify_response(
        response.status_code,
        url=target.url,
        location=response.headers.get("Location"),
        size=size,
        password_source=target.password_source,
        ingress=target.ingress_format,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
    )


def _drain(response: requests.Response) -> None:
    """Read what is left of a short answer, so keep-alive can reuse the connection; close the
    connection instead if the answer is long, endless, broken or slow. Never raises."""
    try:
        left = ANSWER_CAP
        while left > 0:
            chunk = response.raw.read(min(left, 16384), decode_content=False)
            if not chunk:
                return  # complete: urllib3 has put the connection back in the pool
            left -= len(chunk)
    except (Exception, DeadlinePassed):  # the status line already decided the outcome
        pass
    finally:
        response.close()  # closes the connection only if the body was not read to its end


STREAM_FROM = 1024 * 1024  # smaller messages are sent as one bytes object: one send, no read loop


def post_once(session: requests.Session, target: Target, prepared: Prepared) -> Outcome:
    ingress = target.ingress_format
    if ingress is RELAY:
        body = Body(prepared) if prepared.size >= STREAM_FROM else prepared.to_bytes()
        return _post(session, target, body, prepared.size)[1]
    data, headers = formats.encode(ingress, prepared.to_bytes(), target.secret, target.url)
    return _post(session, target, data, prepared.size, headers)[1]


def probe(session: requests.Session, target: Target) -> Tuple[Optional[int], Outcome]:
    """For `check`: the ingress's probe (formats.probe), with the right secret. Action Mailbox
    checks configuration (404), then the secret (401), then the request, so the probe's answer
    proves URL, ingress and secret right without creating an inbound email."""
    body, headers = formats.probe(target.ingress_format, target.secret, target.url)
    return _post(session, target, body, len(body), headers)


def _cannot_carry(target: Target, prepared: Prepared) -> Optional[Outcome]:
    ingress = target.ingress_format
    if ingress.carries_any_bytes:
        return None
    why = formats.cannot_carry(ingress, prepared.to_bytes())
    return None if why is None else Outcome(Reason.NOT_CARRIED, why)


def answers_at(session: requests.Session, target: Target, url: str) -> Optional[int]:
    """The status one empty POST to `url` gets (None if none came), for `check` to find the
    ingress an app uses: Rails answers 404 on every ingress path but the configured one, before
    it looks at anything else. Nothing is stored by any ingress for an empty request."""
    try:
        with deadline(target.timeout):
            response = session.post(
                url,
                data=b"",
                headers={"Content-Type": "text/plain"},
                timeout=target.timeout,
                allow_redirects=False,
                stream=True,
            )
            _drain(response)
            return response.status_code
    except (requests.RequestException, DeadlinePassed):
        return None


if TYPE_CHECKING:  # a runtime Protocol class would cost every delivery its creation time

    class Pacer(Protocol):
        """Paces attempts across workers (import): may hold one back, learns from outcomes."""

        def before(self) -> float:
            """Block until this attempt may start; return the seconds spent waiting."""
            ...

        def after(self, outcome: Outcome) -> None: ...


class Clock:
    """Time, injected so tests can drive the retry loop without waiting."""

    def __init__(
        self,
        now: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.now = now
        self.sleep = sleep


def post_with_retry(
    session: requests.Session,
    target: Target,
    prepared: Prepared,
    *,
    clock: Optional[Clock] = None,
    backoff: Optional[Backoff] = None,
    log: Log = nowhere,
    pacer: Optional[Pacer] = None,
    wait_for_app: bool = True,
) -> Outcome:
    """Post until delivered, a non-retryable answer, or the --retry-for budget is spent.

    The budget bounds when the last attempt may start; that attempt may take up to --timeout.
    Time spent waiting for the pacer does not count against the budget. Without `wait_for_app`
    an app that cannot be reached at all (connection refused, a name that does not resolve) is
    not retried: import's first messages say at once that the app is not running.
    """
    refusal = _cannot_carry(target, prepared)
    if refusal is not None:
        return refusal
    clock = clock or Clock()
    backoff = backoff or Backoff()
    started = clock.now()
    deadline = started + target.retry_for
    attempt = 0
    while True:
        attempt += 1
        if pacer is not None:
            deadline += pacer.before()
        outcome = post_once(session, target, prepared)
        if pacer is not None:
            pacer.after(outcome)
        if outcome.delivered or not outcome.reason.retry:
            return outcome.after(attempt, clock.now() - started)
        if not wait_for_app and outcome.reason is Reason.UNREACHABLE:
            return outcome.after(attempt, clock.now() - started)
        # The server's Retry-After, but never less than our own backoff: "Retry-After: 0" or a
        # date in the past must not turn the loop into a flood of posts.
        wait = max(backoff.delay(attempt), outcome.retry_after or 0.0)
        if clock.now() + wait > deadline:
            if outcome.retry_after is not None and outcome.retry_after >= wait:
                outcome = Outcome(
                    outcome.reason,
                    f"{outcome.detail} (it asked to wait {wait:.0f}s, past --retry-for)",
                    outcome.retry_after,
                )
            return outcome.after(attempt, clock.now() - started)
        log(f"attempt {attempt}: {outcome.line()}; retrying in {wait:.1f}s")
        clock.sleep(wait)
