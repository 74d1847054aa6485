"""A small OAuth2 provider over real HTTP, for the tests: the token endpoint (refresh,
device-code and authorization-code-with-PKCE grants), the device and authorize endpoints, and
an introspection endpoint that the suite's Dovecot asks about each XOAUTH2 token. App-only
grants too: client credentials with a secret (for the mailboxes in `app_mailboxes`, as an
Exchange app with IMAP.AccessAsApp is scoped to some), and Google's JWT-bearer grant of a
service account whose key it verifies (the mailbox is the assertion's `sub`).

The "person" is simulated: `/device?user_code=..&user=..` enters a device code, and
`/authorize` signs in as `sign_in_as` at once (or declines, with `decline = True`) and
redirects back to the client, as a browser would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlencode, urlsplit

CLIENT_ID = "mailbox-relay-test"


class OAuthProvider(threading.Thread):
    def __init__(
        self, *, lifetime: int = 3600, rotate: bool = False, client_secret: Optional[str] = None
    ) -> None:
        super().__init__(daemon=True)
        self.lifetime = lifetime  # seconds an access token lives
        self.rotate = rotate  # a refresh returns a new refresh token and retires the old one
        self.client_secret = client_secret  # None: a public client (no secret)
        self.sign_in_as = "user1"
        self.decline = False
        self.refresh_tokens: Dict[str, str] = {}  # token -> user
        self.access_tokens: Dict[str, Tuple[str, float]] = {}  # token -> (user, expires at)
        self.devices: Dict[str, Dict[str, Any]] = {}  # device_code -> user_code, user, state
        self.codes: Dict[str, Dict[str, str]] = {}  # authorization code -> user, challenge, redirect
        self.issued: List[str] = []  # every token ever issued, to look for leaks
        self.grants_used: Dict[str, int] = {}  # grant_type -> successful token answers
        self.app_secret = "app-secret-value"
        self.app_mailboxes: List[str] = []  # what a client-credentials token may open
        self.service_account: Any = None  # tests.app_credentials.Certificate of the Google key
        self.service_email = "relay@project.iam.gserviceaccount.com"
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> OAuthProvider:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def run(self) -> None:
        self.server.serve_forever(poll_interval=0.05)

    # --- what a test does -------------------------------------------------------------------

    def grant(self, user: str) -> str:
        """A refresh token for `user`, as if they had signed in through a flow."""
        with self.lock:
            return self._new_refresh(user)

    def revoke(self, user: str) -> None:
        """The user withdrew the grant: every refresh and access token of theirs stops working."""
        with self.lock:
            for token in [t for t, u in self.refresh_tokens.items() if u == user]:
                del self.refresh_tokens[token]
            for token in [t for t, (u, _) in self.access_tokens.items() if u == user]:
                del self.access_tokens[token]

    def forget_access_tokens(self) -> None:
        """Access tokens stop working early (the provider's choice); refresh still works."""
        with self.lock:
            self.access_tokens.clear()

    def grant_file(self, refresh_token: str) -> str:
        """A grant file's JSON, as `auth` writes it, holding only a refresh token."""
        return json.dumps(
            {"refresh_token": refresh_token, "client_id": CLIENT_ID, "token_url": f"{self.url}/token"}
        )

    def account(self) -> Dict[str, Any]:
        """The account keys that point mailbox-relay at this provider."""
        return {
            "auth": "xoauth2",
            "oauth2_client_id": CLIENT_ID,
            "oauth2_token_url": f"{self.url}/token",
            "oauth2_device_url": f"{self.url}/devicecode",
            "oauth2_authorize_url": f"{self.url}/authorize",
            "oauth2_scopes": ["imap", "offline_access"],
        }

    # --- tokens -------------------------------------------------------------------------------

    def _new_refresh(self, user: str) -> str:
        token = "rt-" + secrets.token_urlsafe(24)
        self.refresh_tokens[token] = user
        self.issued.append(token)
        return token

    def _answer_for(self, user: str, grant_type: str, refresh: Optional[str]) -> Dict[str, Any]:
        access = "at-" + secrets.token_urlsafe(24)
        self.access_tokens[access] = (user, time.time() + self.lifetime)
        self.issued.append(access)
        self.grants_used[grant_type] = self.grants_used.get(grant_type, 0) + 1
        answer: Dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.lifetime,
            "scope": "imap offline_access",
        }
        if refresh is not None:
            answer["refresh_token"] = refresh
        return answer

    def app_token(self, form: Dict[str, str]) -> Tuple[int, Dict[str, Any]]:
        """client_credentials (an app, for the mailboxes it is scoped to) or JWT bearer (a
        service account, for the mailbox it names as sub)."""
        kind = form.get("grant_type", "")
        if kind == "client_credentials":
            if form.get("client_id") != CLIENT_ID or form.get("client_secret") != self.app_secret:
                return 401, {
                    "error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret provided.",
                    "error_codes": [7000215],
                }
            if not form.get("scope", "").endswith("/.default"):
                return 400, {"error": "invalid_scope", "error_codes": [1002012]}
            users = list(self.app_mailboxes)
        else:
            from .app_credentials import AssertionRefused

            try:
                claims = self._service_claims(form.get("assertion", ""))
            except AssertionRefused as refused:
                return 400, {"error": "invalid_grant", "error_description": refused.why}
            users = [str(claims["sub"])]
        with self.lock:
            access = "at-" + secrets.token_urlsafe(24)
            self.access_tokens[access] = (users[0] if users else "", time.time() + self.lifetime)
            self.issued.append(access)
            self.grants_used[kind] = self.grants_used.get(kind, 0) + 1
        return 200, {"access_token": access, "token_type": "Bearer", "expires_in": self.lifetime}

    def _service_claims(self, assertion: str) -> Dict[str, Any]:
        import json as json_

        from .app_credentials import AssertionRefused, unb64, verify

        try:
            subject = str(json_.loads(unb64(assertion.split(".")[1]))["sub"])
        except (ValueError, KeyError, IndexError):
            raise AssertionRefused(0, "Invalid JWT") from None
        claims = verify(
            assertion,
            self.service_account,
            audience=f"{self.url}/token",
            issuer=self.service_email,
            subject=subject,
            by_thumbprint=False,
        )
        if claims.get("scope") != "https://mail.google.com/":
            raise AssertionRefused(0, "unauthorized_client: not authorized for the scopes requested")
        return claims

    def token(self, form: Dict[str, str]) -> Tuple[int, Dict[str, Any]]:
        if form.get("grant_type") in ("client_credentials", "urn:ietf:params:oauth:grant-type:jwt-bearer"):
            return self.app_token(form)
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != self.client_secret:
            return 401, {"error": "invalid_client", "error_description": "unknown client or wrong secret"}
        kind = form.get("grant_type", "")
        with self.lock:
            if kind == "refresh_token":
                return self._refresh(form.get("refresh_token", ""))
            if kind == "urn:ietf:params:oauth:grant-type:device_code":
                return self._device_grant(form.get("device_code", ""))
            if kind == "authorization_code":
                return self._code_grant(form)
        return 400, {"error": "unsupported_grant_type"}

    def _refresh(self, refresh: str) -> Tuple[int, Dict[str, Any]]:
        user = self.refresh_tokens.get(refresh)
        if user is None:
            return 400, {"error": "invalid_grant", "error_description": "the refresh token was revoked"}
        new = None
        if self.rotate:
            del self.refresh_tokens[refresh]
            new = self._new_refresh(user)
        return 200, self._answer_for(user, "refresh_token", new)

    def _device_grant(self, device_code: str) -> Tuple[int, Dict[str, Any]]:
        device = self.devices.get(device_code)
        if device is None:
            return 400, {"error": "invalid_grant"}
        if device["state"] == "pending":
            return 400, {"error": "authorization_pending"}
        if device["state"] == "declined":
            return 400, {"error": "access_denied"}
        del self.devices[device_code]
        return 200, self._answer_for(device["user"], "device_code", self._new_refresh(device["user"]))

    def _code_grant(self, form: Dict[str, str]) -> Tuple[int, Dict[str, Any]]:
        code = self.codes.pop(form.get("code", ""), None)
        if code is None or form.get("redirect_uri") != code["redirect_uri"]:
            return 400, {"error": "invalid_grant", "error_description": "unknown code or redirect_uri"}
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if challenge != code["challenge"]:
            return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
        return 200, self._answer_for(code["user"], "authorization_code", self._new_refresh(code["user"]))

    def device_code(self, form: Dict[str, str]) -> Tuple[int, Dict[str, Any]]:
        if form.get("client_id") != CLIENT_ID:
            return 401, {"error": "invalid_client"}
        device_code, user_code = secrets.token_urlsafe(16), secrets.token_hex(4).upper()
        with self.lock:
            self.devices[device_code] = {"user_code": user_code, "user": "", "state": "pending"}
        return 200, {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": f"{self.url}/device",
            "expires_in": 600,
            "interval": 1,
        }

    def enter_code(self, query: Dict[str, str]) -> Tuple[int, Dict[str, Any]]:
        with self.lock:
            for device in self.devices.values():
                if device["user_code"] == query.get("user_code"):
                    device["user"] = query.get("user", self.sign_in_as)
                    device["state"] = "declined" if query.get("decline") else "approved"
                    return 200, {"ok": True}
        return 404, {"error": "no such code"}

    def authorize(self, query: Dict[str, str]) -> Tuple[int, str]:
        """The person signs in at once: a redirect back to the client, with a code or an error."""
        redirect = query.get("redirect_uri", "")
        if query.get("client_id") != CLIENT_ID or not redirect.startswith("http://127.0.0.1:"):
            return 400, ""
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return 400, ""
        if self.decline:
            return 302, f"{redirect}?{urlencode({'error': 'access_denied', 'state': query.get('state', '')})}"
        code = secrets.token_urlsafe(16)
        with self.lock:
            self.codes[code] = {
                "user": self.sign_in_as,
                "challenge": query["code_challenge"],
                "redirect_uri": redirect,
            }
        return 302, f"{redirect}?{urlencode({'code': code, 'state': query.get('state', '')})}"

    def introspect(self, form: Dict[str, str]) -> Tuple[int, Dict[str, Any]]:
        with self.lock:
            user, expires = self.access_tokens.get(form.get("token", ""), ("", 0.0))
        if not user or expires < time.time():
            return 200, {"active": False}
        return 200, {"active": True, "username": user, "exp": int(expires)}

    def _handler(self) -> Any:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                route = {
                    "/token": provider.token,
                    "/devicecode": provider.device_code,
                    "/introspect": provider.introspect,
                }.get(urlsplit(self.path).path)
                self._json(*(route(form) if route else (404, {})))

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                if parts.path == "/device":
                    self._json(*provider.enter_code(query))
                elif parts.path == "/authorize":
                    status, location = provider.authorize(query)
                    self.send_response(status)
                    if location:
                        self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._json(404, {})

            def _json(self, status: int, body: Dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler
