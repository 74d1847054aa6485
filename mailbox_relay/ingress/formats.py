"""The five Action Mailbox ingresses: where each lives, how it authenticates, how it carries a
message, and the request `check` sends to prove route, secret and ingress right while storing
nothing. Each ingress is one row of INGRESSES, taken from Rails' own controllers
(actionmailbox/app/controllers/action_mailbox/ingresses/) and proven against the real app by
the e2e suite.

relay sends the message itself (`message/rfc822`, streamed by the client). The others wrap it:
postmark in JSON, sendgrid, mailgun and mandrill in a form. Envelope recipients travel the same
way on all five: as the `X-Original-To:` lines `prepare` adds to the message, so the bytes Rails
stores, and so its deduplication, do not depend on the ingress. (SendGrid's `envelope` and
Mailgun's `recipient` would make Rails prepend the lines itself, with a bare LF, and Mailgun's
only one.)

Only this module's table is read by `deliver` on the relay path; json, hmac and the rest are
imported when another ingress is used.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from mailbox_relay.ingress.endpoint import RELAY_PATH

BASE = "/rails/action_mailbox"
PROBE_MESSAGE = "mailbox-relay check: not a message, so nothing is stored"


class Ingress:
    """One ingress: its path, its secret, and what its controller answers to `check`'s probe."""

    __slots__ = ("app_secret", "basic_auth", "name", "path", "probe", "probe_status", "secret")

    def __init__(
        self,
        name: str,
        path: str,
        secret: str,
        app_secret: str,
        basic_auth: bool,
        probe_status: int,
        probe: str,
    ) -> None:
        self.name = name
        self.path = path
        self.secret = secret  # what the password setting holds for it, in words
        self.app_secret = app_secret  # where the app keeps the same secret
        self.basic_auth = basic_auth  # HTTP Basic (user actionmailbox); else an HMAC signature
        self.probe_status = probe_status  # the answer that proves route, secret and ingress
        self.probe = probe  # what check's probe is, in words

    def __reduce__(self) -> Tuple[Any, Tuple[str]]:
        # A row of INGRESSES stays that very row in a worker process (`ingress is RELAY`).
        return (_row, (self.name,))

    @property
    def carries_any_bytes(self) -> bool:
        """Only relay posts raw bytes. JSON carries only Unicode text, and Rails before 7.1
        refuses form fields that are not UTF-8 (rails#46297): the e2e suite shows both."""
        return self.name == "relay"


_PASSWORD = "RAILS_INBOUND_EMAIL_PASSWORD or action_mailbox.ingress_password"
INGRESSES: Dict[str, Ingress] = {
    "relay": Ingress(
        "relay",
        RELAY_PATH,  # endpoint's, the default of every URL
        "password",
        _PASSWORD,
        True,
        415,
        "a deliberately wrong Content-Type",
    ),
    "postmark": Ingress(
        "postmark",
        f"{BASE}/postmark/inbound_emails",
        "password",
        _PASSWORD,
        True,
        422,
        "JSON without RawEmail",
    ),
    "sendgrid": Ingress(
        "sendgrid",
        f"{BASE}/sendgrid/inbound_emails",
        "password",
        _PASSWORD,
        True,
        422,
        "an envelope that is not JSON",
    ),
    "mailgun": Ingress(
        "mailgun",
        f"{BASE}/mailgun/inbound_emails/mime",
        "signing key",
        "MAILGUN_INGRESS_SIGNING_KEY or action_mailbox.mailgun_signing_key",
        False,
        400,
        "a signed request without body-mime",
    ),
    "mandrill": Ingress(
        "mandrill",
        f"{BASE}/mandrill/inbound_emails",
        "API key",
        "MANDRILL_INGRESS_API_KEY or action_mailbox.mandrill_api_key",
        False,
        422,
        "signed events that are not JSON",
    ),
}
RELAY = INGRESSES["relay"]


def _row(name: str) -> Ingress:
    return INGRESSES[name]


def ingress_of_path(path: str) -> Optional[Ingress]:
    """The ingress whose path `path` ends with (an app may be mounted under a prefix)."""
    return next((ingress for ingress in INGRESSES.values() if path.rstrip("/").endswith(ingress.path)), None)


def cannot_carry(ingress: Ingress, raw: bytes) -> Optional[str]:
    """Why `ingress` cannot carry these bytes unchanged, or None. Never post an altered message."""
    if ingress.carries_any_bytes:
        return None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        how = "JSON carries" if ingress.name == "postmark" else "Rails before 7.1 takes form fields of"
        return (
            f"the {ingress.name} ingress cannot carry this message unchanged: it holds bytes that are not "
            f"UTF-8 (at byte {error.start}), and {how} UTF-8 text only; use the relay ingress "
            "(config.action_mailbox.ingress = :relay), which carries any bytes"
        )
    return None


# --- the request for one attempt -------------------------------------------------------------


def encode(ingress: Ingress, raw: bytes, secret: str, url: str) -> Tuple[bytes, Dict[str, str]]:
    """Body and headers of one attempt for a wrapping ingress. Called again for each retry, so
    mailgun's timestamp is always fresh; the message inside is the same bytes every time."""
    text = raw.decode("utf-8")
    if ingress.name == "postmark":
        return _json({"RawEmail": text})
    if ingress.name == "sendgrid":
        return _form([("email", text)])
    if ingress.name == "mailgun":
        return _form([("body-mime", text), *_mailgun_signature(secret)])
    if ingress.name == "mandrill":
        return _mandrill([{"event": "inbound", "msg": {"raw_msg": text}}], secret, url)
    raise ValueError(f"relay is posted as message/rfc822, not encoded: {ingress.name}")


def probe(ingress: Ingress, secret: str, url: str) -> Tuple[bytes, Dict[str, str]]:
    """A request each controller answers with `probe_status` once route, ingress and secret are
    right, before it would store anything:
    - relay: a wrong Content-Type, 415;
    - postmark: JSON without RawEmail, 422;
    - sendgrid: an envelope that is not JSON, 422 (it is parsed before anything is stored);
    - mailgun: a valid signature and no body-mime, 400 (the parameter is missing);
    - mandrill: a valid signature over events that are not JSON, 422."""
    if ingress.name == "relay":
        return PROBE_MESSAGE.encode() + b"\n", {"Content-Type": "text/plain"}
    if ingress.name == "postmark":
        return _json({"mailbox-relay-check": PROBE_MESSAGE})
    if ingress.name == "sendgrid":
        return _form([("email", PROBE_MESSAGE), ("envelope", "{ not JSON")])
    if ingress.name == "mailgun":
        return _form(_mailgun_signature(secret))
    return _mandrill_form("{ not JSON", secret, url)


def _json(document: Dict[str, str]) -> Tuple[bytes, Dict[str, str]]:
    import json

    return json.dumps(document).encode("ascii"), {"Content-Type": "application/json"}


def _form(fields: List[Tuple[str, str]]) -> Tuple[bytes, Dict[str, str]]:
    """multipart/form-data: the message goes as it is, where urlencoding would triple every
    CRLF and byte above 127. The boundary is random and checked not to occur in the fields."""
    import secrets

    data = [(name, value.encode("utf-8")) for name, value in fields]
    while True:
        boundary = "mailbox-relay-" + secrets.token_hex(16)
        if not any(boundary.encode() in value for _, value in data):
            break
    parts = [
        b'--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
        % (boundary.encode(), name.encode(), value)
        for name, value in data
    ]
    body = b"".join(parts) + b"--%s--\r\n" % boundary.encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _mailgun_signature(key: str) -> List[Tuple[str, str]]:
    """Mailgun's webhook signature: hex HMAC-SHA256 of timestamp + token. Rails accepts it for
    two minutes after `timestamp`, so it is made at each attempt."""
    import hashlib
    import hmac
    import secrets
    import time

    timestamp, token = str(int(time.time())), secrets.token_hex(25)
    signature = hmac.new(key.encode("utf-8"), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()
    return [("timestamp", timestamp), ("token", token), ("signature", signature)]


def _mandrill(events: List[Dict[str, object]], key: str, url: str) -> Tuple[bytes, Dict[str, str]]:
    import json

    return _mandrill_form(json.dumps(events), key, url)


def _mandrill_form(events: str, key: str, url: str) -> Tuple[bytes, Dict[str, str]]:
    body, headers = _form([("mandrill_events", events)])
    headers["X-Mandrill-Signature"] = mandrill_signature(key, url, {"mandrill_events": events})
    return body, headers


def mandrill_signature(key: str, url: str, params: Dict[str, str]) -> str:
    """Base64 HMAC-SHA1 over the URL the app sees (Rails' request.url) and the sorted POST
    parameters, each name followed by its value."""
    import base64
    import hashlib
    import hmac

    signed = rails_url(url) + "".join(name + params[name] for name in sorted(params))
    return base64.b64encode(
        hmac.new(key.encode("utf-8"), signed.encode("utf-8"), hashlib.sha1).digest()
    ).decode()


def rails_url(url: str) -> str:
    """The URL as Rails' request.url spells it: the port only when it is not the default."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    default = 443 if parts.scheme == "https" else 80
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port in (None, default) else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


# --- the other side, for `serve --ingress` ----------------------------------------------------


class Received:
    """What an ingress made of a request: the status Rails answers and the messages it stores."""

    __slots__ = ("messages", "status", "why")

    def __init__(self, status: int, messages: Optional[List[bytes]] = None, why: str = "") -> None:
        self.status = status
        self.messages = messages or []
        self.why = why


def receive(ingress: Ingress, secret: str, url: str, headers: Dict[str, str], body: bytes) -> Received:
    """A wrapping ingress's request as Rails 6.1's controller takes it, after its path matched and,
    for basic-auth ingresses, the password did: 400 for a missing parameter or a field that is not
    UTF-8, 401 for a wrong signature, 422 for JSON that does not parse, else the raw messages."""
    import json

    media_type = headers.get("content-type", "")
    try:
        params = _params(media_type, body)
    except ValueError as error:  # Rails: "Invalid request parameters" (rails#46297 for bytes)
        return Received(400, why=str(error))
    try:
        if ingress.name == "postmark":
            return _one(params, "RawEmail", 422)
        if ingress.name == "sendgrid":
            return _sendgrid(params, json.loads)
        if ingress.name == "mailgun":
            return _mailgun(params, secret)
        return _mandrill_received(params, secret, url, headers.get("x-mandrill-signature", ""), json.loads)
    except json.JSONDecodeError as error:
        return Received(422, why=f"not JSON: {error}")


def _params(media_type: str, body: bytes) -> Dict[str, str]:
    kind = media_type.split(";")[0].strip().lower()
    if kind == "application/json":
        import json

        try:
            document = json.loads(body or b"{}")
        except ValueError:
            raise ValueError("the JSON body does not parse") from None
        return (
            {str(k): v for k, v in document.items() if isinstance(v, str)}
            if isinstance(document, dict)
            else {}
        )
    if kind == "multipart/form-data":
        return _multipart(media_type, body)
    if kind == "application/x-www-form-urlencoded":
        from urllib.parse import parse_qsl

        pairs = parse_qsl(body.decode("ascii", "replace"), keep_blank_values=True, errors="strict")
        return dict(pairs)
    return {}


def _multipart(media_type: str, body: bytes) -> Dict[str, str]:
    """The fields of a multipart/form-data body (serve needs no files, so there are none)."""
    boundary = _attribute(media_type, "boundary")
    if not boundary:
        raise ValueError("multipart without a boundary")
    fields: Dict[str, str] = {}
    for part in body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, value = part[2:].partition(b"\r\n\r\n")
        name = _attribute(head.decode("latin-1"), "name")
        try:
            fields[name] = value[:-2].decode("utf-8") if value.endswith(b"\r\n") else value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"form field {name} is not UTF-8") from None
    return fields


def _attribute(header: str, name: str) -> str:
    """`name=value` (quoted or not) among a header's `;`-separated parts, or ""."""
    for item in header.replace("\r\n", ";").split(";"):
        key, _, value = item.strip().partition("=")
        if key.lower() == name:
            return value.strip('"')
    return ""


def _one(params: Dict[str, str], name: str, missing: int) -> Received:
    if name not in params:
        return Received(missing, why=f"no {name}")
    return Received(204, [params[name].encode("utf-8")])


def _sendgrid(params: Dict[str, str], loads: Any) -> Received:
    if "email" not in params:
        return Received(400, why="no email")
    raw = params["email"]
    if "envelope" in params:  # as Rails: each envelope recipient prepended, with a bare LF
        for to in loads(params["envelope"]).get("to", []):
            raw = f"X-Original-To: {to}\n{raw}"
    return Received(204, [raw.encode("utf-8")])


def _mailgun(params: Dict[str, str], key: str) -> Received:
    import hashlib
    import hmac
    import time

    if not all(name in params for name in ("timestamp", "token", "signature")):
        return Received(400, why="no timestamp, token or signature")
    signed = f"{params['timestamp']}{params['token']}".encode()
    expected = hmac.new(key.encode("utf-8"), signed, hashlib.sha256).hexdigest()
    fresh = params["timestamp"].isdigit() and int(params["timestamp"]) >= time.time() - 120
    if not (hmac.compare_digest(expected, params["signature"]) and fresh):
        return Received(401, why="wrong or stale signature")
    received = _one(params, "body-mime", 400)
    if received.messages and "recipient" in params:
        received.messages = [f"X-Original-To: {params['recipient']}\n".encode() + received.messages[0]]
    return received


def _mandrill_received(params: Dict[str, str], key: str, url: str, signature: str, loads: Any) -> Received:
    import hmac

    if not hmac.compare_digest(signature.encode(), mandrill_signature(key, url, params).encode()):
        return Received(401, why="wrong signature")
    if "mandrill_events" not in params:
        return Received(400, why="no mandrill_events")
    events = loads(params["mandrill_events"])
    raws = [e["msg"]["raw_msg"] for e in events if isinstance(e, dict) and e.get("event") == "inbound"]
    return Received(200, [raw.encode("utf-8") for raw in raws])
