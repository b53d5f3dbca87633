"""A SMART Backend Services token endpoint and a token-checking FHIR front, on loopback.

:class:`TokenServer` is the state; :meth:`TokenServer.create_app` makes a fresh Quart app
with

* ``POST /token``: the client-credentials grant. The client assertion is verified as an EHR
  does (SMART App Launch STU2, Backend Services): signature with the registered public key
  (:mod:`joserfc`), ``kid`` equal to that key's RFC 7638 thumbprint, ``iss`` = ``sub`` = a
  registered client id, ``aud`` = this token URL, ``exp`` in the future and at most five
  minutes ahead, ``jti`` never seen before (replays are refused). Refusals are RFC 6749 error
  bodies (``invalid_client`` and so on). Tokens are opaque random strings with
  ``expires_in``; :meth:`TokenServer.fail_tokens` makes the next answers 503 or 400 (with
  a ``Retry-After`` if asked), and ``answer_raw`` the next answer's body whatever it is.
* ``POST /fhir/`` (the FHIR base): needs ``Authorization: Bearer <a live token>`` (unless
  made with ``require_token=False``), else 401; answers a batch Bundle with a
  ``batch-response`` of ``201 Created`` entries itself, recording what it got.
* ``GET``/``HEAD /fhir/metadata``: a CapabilityStatement, without authentication.

Time comes from a :class:`FakeClock` shared with the client under test, so expiry needs no
sleeping. :func:`serving` runs an app under Hypercorn on ``127.0.0.1`` (optionally HTTPS that
requires a client certificate) and yields the port.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import socket
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey
from quart import Quart, Response, request

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LIFETIME_S = 300
LEEWAY_S = 5


class FakeClock:
    """Wall clock and monotonic clock that move only when told."""

    def __init__(self, start: datetime | None = None) -> None:
        self._start = start or datetime(2026, 11, 26, 12, tzinfo=UTC)
        self._elapsed = 0.0

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._elapsed)

    def monotonic(self) -> float:
        return 1000.0 + self._elapsed

    def advance(self, seconds: float) -> None:
        self._elapsed += seconds


class OAuthRefusal(Exception):
    """An RFC 6749 error answer."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


@dataclass
class TokenServer:
    """What the endpoint knows and has done (tests read the counters)."""

    clock: FakeClock
    expires_in: int = 300
    # What the answer says instead of ``expires_in`` when set (a sloppy endpoint's value).
    answered_expires_in: object = None
    answer_raw: bytes | None = None  # the next token answer's body as is, with a 200
    token_url: str = ""
    clients: dict[str, RSAKey | ECKey] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)
    seen_jti: set[str] = field(default_factory=set)
    issued: int = 0
    token_requests: int = 0
    refusals: list[str] = field(default_factory=list)
    scopes: list[str] = field(default_factory=list)
    fhir_requests: int = 0
    unauthorized: int = 0
    bundles: list[list[str]] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    refuse_every_token: bool = False
    _fail: tuple[int, str | None, str | None] | None = None
    _fail_count: int | None = None

    def register(self, client_id: str, public_jwk: dict[str, Any]) -> None:
        """Register a client with its public key (a JWK, as an EHR admin pastes it)."""
        key = (
            RSAKey.import_key(public_jwk)
            if public_jwk["kty"] == "RSA"
            else ECKey.import_key(public_jwk)
        )
        self.clients[client_id] = key

    def revoke_all(self) -> None:
        """Forget every issued token (as a server restart or a revocation does)."""
        self.tokens.clear()

    def fail_tokens(
        self,
        status: int,
        error: str | None = None,
        count: int | None = None,
        *,
        retry_after: str | None = None,
    ) -> None:
        """Answer the next ``count`` token requests (None: all) with ``status`` (and a
        ``Retry-After`` header when ``retry_after`` is given)."""
        self._fail, self._fail_count = (status, error, retry_after), count

    def heal(self) -> None:
        self._fail = self._fail_count = None

    # -- the token endpoint -----------------------------------------------------------------

    def _check_assertion(self, form: dict[str, str]) -> str:
        if form.get("grant_type") != "client_credentials":
            raise OAuthRefusal("unsupported_grant_type", "grant_type must be client_credentials")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise OAuthRefusal("invalid_client", "client_assertion_type must be jwt-bearer")
        if not form.get("scope"):
            raise OAuthRefusal("invalid_scope", "scope is required")
        assertion = form.get("client_assertion", "")
        try:
            payload = assertion.split(".")[1]
            peek = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (IndexError, ValueError):
            raise OAuthRefusal("invalid_client", "client_assertion is not a JWT") from None
        client_id = str(peek.get("iss")) if isinstance(peek, dict) else ""
        key = self.clients.get(client_id)
        if key is None:
            raise OAuthRefusal("invalid_client", "unknown client")
        try:
            token = jwt.decode(assertion, key, algorithms=["RS384", "ES384"])
        except JoseError as exc:
            raise OAuthRefusal(
                "invalid_client", f"client assertion signature is invalid ({exc.error})"
            ) from None
        if token.header.get("kid") != key.thumbprint():
            raise OAuthRefusal("invalid_client", "kid does not name a registered key")
        now = int(self.clock.now().timestamp())
        claims = jwt.JWTClaimsRegistry(
            now=now,
            leeway=LEEWAY_S,
            iss={"essential": True, "value": client_id},
            sub={"essential": True, "value": client_id},
            aud={"essential": True, "value": self.token_url},
            exp={"essential": True},
            jti={"essential": True},
        )
        try:
            claims.validate(token.claims)
        except JoseError as exc:
            raise OAuthRefusal("invalid_client", f"client assertion: {exc.description}") from None
        if token.claims["exp"] > now + MAX_ASSERTION_LIFETIME_S + LEEWAY_S:
            raise OAuthRefusal("invalid_client", "exp is more than five minutes ahead")
        jti = str(token.claims["jti"])
        if jti in self.seen_jti:
            raise OAuthRefusal("invalid_client", "jti was used before (replay)")
        self.seen_jti.add(jti)
        return form["scope"]

    async def _token(self) -> Response:
        self.token_requests += 1
        if self.answer_raw is not None:
            raw, self.answer_raw = self.answer_raw, None  # once
            return Response(raw, 200, content_type="application/json")
        if self._fail is not None:
            status, error, retry_after = self._fail
            if self._fail_count is not None:
                self._fail_count -= 1
                if self._fail_count <= 0:
                    self.heal()
            failure = {
                "error": error or "temporarily_unavailable",
                "error_description": "told to fail",
            }
            headers = {} if retry_after is None else {"Retry-After": retry_after}
            return Response(
                json.dumps(failure), status, content_type="application/json", headers=headers
            )
        form = dict((await request.form).items())
        try:
            scope = self._check_assertion(form)
        except OAuthRefusal as refusal:
            self.refusals.append(refusal.description)
            refused = {"error": refusal.error, "error_description": refusal.description}
            return Response(json.dumps(refused), refusal.status, content_type="application/json")
        value = secrets.token_urlsafe(24)
        self.tokens[value] = self.clock.monotonic() + self.expires_in
        self.issued += 1
        self.scopes.append(scope)
        body: dict[str, object] = {
            "access_token": value,
            "token_type": "bearer",
            "expires_in": self.expires_in
            if self.answered_expires_in is None
            else self.answered_expires_in,
            "scope": scope,
        }
        return Response(json.dumps(body), 200, content_type="application/json")

    # -- the FHIR front ---------------------------------------------------------------------

    def _authorised(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        expires = self.tokens.get(value)
        return (
            scheme.lower() == "bearer"
            and expires is not None
            and self.clock.monotonic() < expires
            and not self.refuse_every_token
        )

    async def _bundle(self, require_token: bool) -> Response:
        self.fhir_requests += 1
        header = request.headers.get("Authorization", "")
        self.auth_headers.append(header)
        if require_token and not self._authorised(header):
            self.unauthorized += 1
            return Response(
                json.dumps({"resourceType": "OperationOutcome", "issue": [{"code": "login"}]}),
                401,
                content_type="application/fhir+json",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        bundle = json.loads(await request.get_data())
        types = [e["request"]["url"].split("?")[0] for e in bundle.get("entry", [])]
        self.bundles.append(types)
        answer = {
            "resourceType": "Bundle",
            "type": "batch-response",
            "entry": [
                {
                    "response": {
                        "status": "201 Created",
                        "location": f"{t}/{uuid.uuid4()}/_history/1",
                    }
                }
                for t in types
            ],
        }
        return Response(json.dumps(answer), 200, content_type="application/fhir+json")

    def create_app(self, *, require_token: bool = True) -> Quart:
        """A fresh app over this state."""
        app = Quart(__name__)

        @app.post("/token")
        async def token() -> Response:
            return await self._token()

        @app.route("/fhir/metadata", methods=["GET", "HEAD"])
        async def metadata() -> Response:
            body = {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance"}
            return Response(json.dumps(body), 200, content_type="application/fhir+json")

        @app.post("/fhir/")
        async def bundle() -> Response:
            return await self._bundle(require_token)

        return app


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate and the CA whose client certificates it requires."""

    certfile: Path
    keyfile: Path
    client_ca: Path


@contextlib.asynccontextmanager
async def serving(app: Quart, *, tls: ServerTls | None = None) -> AsyncIterator[int]:
    """Serve ``app`` on 127.0.0.1 (a free port, yielded) until the block ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # connections queue until Hypercorn accepts: no start-up polling
    port = sock.getsockname()[1]
    config = HypercornConfig()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("tests.token_server")
    config.graceful_timeout = 0.5
    if tls is not None:
        config.certfile = str(tls.certfile)
        config.keyfile = str(tls.keyfile)
        config.ca_certs = str(tls.client_ca)
        config.verify_mode = ssl.VerifyMode.CERT_REQUIRED
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))
    try:
        yield port
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
