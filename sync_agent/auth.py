"""Authentication to an upstream FHIR server: SMART Backend Services and a static bearer token.

Both are :class:`httpx.Auth` flows on the client that :func:`sync_agent.transport.build_client`
makes, so every request through it (bundles, searches, audit export) is authenticated without
its caller knowing how. Mutual TLS needs no flow: it is the client's TLS context.

**SMART Backend Services** (SMART App Launch STU2, "Backend Services"; REFERENCE.md, "Upstream
EHR connectivity"). To get an access token the box POSTs to ``token_url``::

    grant_type=client_credentials
    scope=<DEFAULT_SCOPE>
    client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer
    client_assertion=<JWT signed with the site's private key>

The assertion (:func:`client_assertion`) has ``iss`` = ``sub`` = the client id, ``aud`` =
the token URL, ``exp`` :data:`ASSERTION_LIFETIME_S` ahead (the spec allows at most five
minutes; a minute less leaves room for a server clock that runs behind ours) and a random
``jti``; its header names the algorithm (RS384 or ES384) and, as ``kid``, the key's RFC 7638
thumbprint: register the public key under that kid (:func:`public_jwks` prints the JWKS).

The token is kept in memory until ``expires_in`` minus a margin (:data:`REFRESH_MARGIN_S`,
at most half the lifetime), timed on the monotonic clock so a wall-clock step (NTP at boot)
neither stretches nor cuts it. Concurrent requests wait for one refresh (an
:class:`asyncio.Lock`). A 401 from the FHIR server drops the token, fetches one fresh token
and sends the request once more; a second 401 is ``UpstreamError(AUTH)``.

How token-endpoint failures are classed (:class:`sync_agent.upstream.Failure`):

* no connection, timeout (a 408 answer too), 5xx, 429 → **transient** (``Retry-After`` kept,
  a date counted from the answer's own ``Date``). Raised without a transport error as cause,
  so the sync loop backs off rather than probing the FHIR server, which may well answer
  while the token endpoint does not.
* 400/401 (``invalid_client``, ``invalid_scope``…), any other answer that is not a token →
  **auth**, with the server's OAuth ``error`` and ``error_description`` (they hold no PHI).
  So is an ``access_token`` that no ``Authorization`` header can carry (a line break, a
  space, a control or non-ASCII character): sent, it would fail before leaving the box,
  every time, and read as a dead link.
  Not **permanent**: that class dead-letters the items, and a rejected key says nothing
  about them. They stay pending until a person fixes the registration or the key.

The token, the assertion and the key are never logged, and no error message quotes them.
A bearer token file is held to the same rule when it is read
(:func:`read_token_file`).

Why the token request goes through its own short-lived client rather than being yielded to
the FHIR client: its transport errors must be classed here (a timeout fetching a token is
not an ambiguous bundle delivery), and a token is fetched every few minutes at most, so a
fresh connection costs nothing that matters.

The scope: the upstream's ``scope`` key, by default :data:`DEFAULT_SCOPE`, what the agent
does (read and search; create and update) on every type; EHRs grant only what the
registration allows whatever is asked. Public endpoints (``metadata``, the SMART
configuration) go without a token, which keeps the sync loop's reachability probe from
fetching tokens.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import ssl
import stat
import time
from collections.abc import AsyncGenerator, Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from appliance.config import UpstreamConfig
from appliance.errors import KeyFileError
from sync_agent.transport import TlsAwareTransport
from sync_agent.upstream import Failure, UpstreamError, retry_after_seconds

logger = logging.getLogger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART v2 scopes: read+search and create+update on every resource type.
DEFAULT_SCOPE = "system/*.rs system/*.cu"
# The spec's limit is 300 s (exp "no more than five minutes in the future").
ASSERTION_LIFETIME_S = 240
# The spec recommends 300 s tokens; used when a server leaves expires_in out.
DEFAULT_TOKEN_LIFETIME_S = 300
# A token endpoint's expires_in beyond this (a year) is not believed: the default is used.
MAX_TOKEN_LIFETIME_S = 365 * 86_400
REFRESH_MARGIN_S = 60.0
# RFC 7518 section 3.3: RSA keys for RS* are 2048 bits or larger.
MIN_RSA_BITS = 2048
_PUBLIC_PATHS = ("/metadata", "/.well-known/smart-configuration")
# What "Authorization: Bearer <token>" can carry: visible ASCII, no space (an HTTP field
# value, RFC 9110). RFC 6750's b64token is stricter, but servers issue tokens outside it
# (Salesforce's hold "!"; others ":" or "%"), and h11 sends them: refusing those would stop
# a box that works.
_SENDABLE_TOKEN = re.compile(r"[\x21-\x7e]+")


def is_bearer_token(value: str) -> bool:
    """Whether ``value`` can go in an ``Authorization: Bearer`` header (visible ASCII, one
    word: no line break, space, control or non-ASCII character)."""
    return _SENDABLE_TOKEN.fullmatch(value) is not None


def check_private_file(path: Path, what: str) -> None:
    """Refuse a key file that is missing, not a regular file, or open to group or others."""
    try:
        info = path.stat()
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path}: {what} file not found") from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the {what} ({exc.strerror})") from exc
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path}: the {what} must be a regular file")
    if info.st_mode & 0o077:
        raise KeyFileError(
            f"{path}: the {what} is readable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run 'chmod 600 {path}'"
        )


@dataclass(frozen=True, slots=True)
class SigningKey:
    """The private key that signs client assertions, with its algorithm and key id."""

    key: RSAKey | ECKey
    algorithm: str
    kid: str

    def __repr__(self) -> str:  # never the key material, whoever prints it
        return f"SigningKey({self.algorithm}, kid={self.kid})"


def load_signing_key(path: Path, algorithm: str) -> SigningKey:
    """Read a PEM private key for ``algorithm`` (RS384: RSA ≥ 2048 bits; ES384: EC P-384).

    Every failure is one :class:`KeyFileError` naming the file, never quoting its content.
    """
    if algorithm not in ("RS384", "ES384"):
        raise KeyFileError(f"{path}: unsupported assertion algorithm {algorithm!r}")
    check_private_file(path, "SMART private key")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the SMART private key ({exc.strerror})") from exc
    wanted = "an RSA" if algorithm == "RS384" else "an EC P-384"
    try:
        native = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # The library's text may describe the content; ours names only what was expected.
        public = b"PUBLIC KEY-----" in data
        raise KeyFileError(
            f"{path}: holds a public key; {algorithm} signing needs the private key"
            if public
            else f"{path}: not {wanted} private key in unencrypted PEM, as {algorithm} needs"
        ) from exc
    key: RSAKey | ECKey
    if algorithm == "RS384" and isinstance(native, rsa.RSAPrivateKey):
        if native.key_size < MIN_RSA_BITS:
            raise KeyFileError(
                f"{path}: a {native.key_size}-bit RSA key; {algorithm} needs "
                f"{MIN_RSA_BITS} bits or more"
            )
        key = RSAKey.import_key(native)
    elif algorithm == "ES384" and isinstance(native, ec.EllipticCurvePrivateKey):
        if not isinstance(native.curve, ec.SECP384R1):
            raise KeyFileError(f"{path}: an EC key on {native.curve.name}; {algorithm} needs P-384")
        key = ECKey.import_key(native)
    else:
        raise KeyFileError(
            f"{path}: not {wanted} private key in unencrypted PEM, as {algorithm} needs"
        )
    return SigningKey(key, algorithm, key.thumbprint())


def public_jwks(key: SigningKey) -> dict[str, Any]:
    """The JWKS to register with the EHR: the public half, with ``kid``, ``alg`` and ``use``."""
    public = key.key.as_dict(private=False, kid=key.kid, alg=key.algorithm, use="sig")
    return {"keys": [public]}


def client_assertion(
    key: SigningKey, client_id: str, token_url: str, *, now: datetime, jti: str
) -> str:
    """The signed JWT that authenticates the client at the token endpoint (pure)."""
    issued = int(now.timestamp())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "exp": issued + ASSERTION_LIFETIME_S,
        "jti": jti,
    }
    header = {"alg": key.algorithm, "kid": key.kid, "typ": "JWT"}
    return jwt.encode(header, claims, key.key, algorithms=[key.algorithm])


def _json_or_none(response: httpx.Response) -> Any:
    """A token endpoint's answer parsed, or None. The standard parser, which takes what a
    sloppy endpoint writes (NaN, a 400-digit expires_in: judged later), but its
    RecursionError on deep nesting is no ValueError and ended the sync process."""
    try:
        return response.json()
    except (ValueError, RecursionError):
        return None


def _oauth_error(response: httpx.Response) -> str:
    """The OAuth error of a token-endpoint answer, as one line (RFC 6749 section 5.2)."""
    body = _json_or_none(response)
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        text = body["error"]
        if isinstance(body.get("error_description"), str):
            text += f": {body['error_description']}"
    else:
        text = f"HTTP {response.status_code}"
    return " ".join(text.split())[:300]


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    refresh_at: float  # on the monotonic clock


def _is_public(request: httpx.Request) -> bool:
    return request.method in ("GET", "HEAD") and request.url.path.endswith(_PUBLIC_PATHS)


class SmartBackendAuth(httpx.Auth):
    """SMART Backend Services client-credentials flow with a signed assertion (module doc)."""

    requires_request_body = True  # a request may be sent twice (401 → refresh → retry)

    def __init__(
        self,
        *,
        client_id: str,
        token_url: str,
        key: SigningKey,
        scope: str = DEFAULT_SCOPE,
        verify: ssl.SSLContext | bool = True,
        timeout: httpx.Timeout | float = 30.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client_id = client_id
        self._token_url = token_url
        self._key = key
        self._scope = scope
        self._verify = verify
        self._timeout = timeout
        self._clock = clock
        self._monotonic = monotonic
        self._token: _Token | None = None
        self._lock = asyncio.Lock()
        # Fetches finished, and how the newest one failed (None: it did not).
        self._fetches = 0
        self._failed: UpstreamError | None = None
        self.tokens_fetched = 0

    @classmethod
    def from_config(
        cls,
        upstream: UpstreamConfig,
        *,
        verify: ssl.SSLContext | bool = True,
        timeout: httpx.Timeout | float = 30.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> SmartBackendAuth:
        """The flow for one ``auth = "smart"`` upstream; reads and checks its private key."""
        assert upstream.client_id is not None  # the config parser requires these for smart
        assert upstream.token_url is not None
        assert upstream.private_key_file is not None
        return cls(
            client_id=upstream.client_id,
            token_url=upstream.token_url,
            key=load_signing_key(upstream.private_key_file, upstream.algorithm),
            scope=upstream.scope,
            verify=verify,
            timeout=timeout,
            clock=clock,
            monotonic=monotonic,
        )

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        """Not supported: the sync agent is asynchronous."""
        raise RuntimeError("SmartBackendAuth works with httpx.AsyncClient only")

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Attach a token; on a 401, refresh once and resend once."""
        if _is_public(request):
            yield request
            return
        token = await self._access_token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401:
            return
        logger.info("upstream answered 401; fetching a fresh access token and retrying once")
        token = await self._access_token(stale=token)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            raise UpstreamError(
                Failure.AUTH,
                "the upstream refused a freshly issued access token (HTTP 401); check the "
                "client's registration and scopes",
            )

    async def _access_token(self, stale: str | None = None) -> str:
        """The cached token, or a fresh one; ``stale`` is a token the server just refused.

        Requests that waited while a fetch failed get that failure, not a fetch each, one
        after the other (each up to the timeout, against an endpoint that is refusing).
        """
        seen = self._fetches
        async with self._lock:
            cached = self._token
            if (
                cached is not None
                and cached.value != stale
                and self._monotonic() < cached.refresh_at
            ):
                return cached.value
            if self._fetches != seen and self._failed is not None:
                failed = self._failed  # a fetch failed while this request waited
                raise UpstreamError(failed.failure, failed.message, failed.retry_after_s)
            self._token = None
            try:
                self._token = await self._fetch()
            except UpstreamError as exc:
                self._failed = exc
                raise
            except BaseException:
                self._failed = None  # cancelled, say: the waiters try for themselves
                raise
            else:
                self._failed = None
            finally:
                self._fetches += 1
            return self._token.value

    async def _fetch(self) -> _Token:
        started = self._monotonic()
        form = {
            "grant_type": "client_credentials",
            "scope": self._scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": client_assertion(
                self._key,
                self._client_id,
                self._token_url,
                now=self._clock(),
                jti=secrets.token_urlsafe(24),
            ),
        }
        try:
            async with httpx.AsyncClient(
                timeout=self._timeout,
                verify=self._verify,
                transport=TlsAwareTransport(self._verify),
            ) as http:
                response = await http.post(
                    self._token_url, data=form, headers={"Accept": "application/json"}
                )
        except httpx.HTTPError as exc:
            # No cause: the FHIR server may answer while this endpoint does not (module doc).
            raise UpstreamError(
                Failure.TRANSIENT, f"token endpoint: no token ({type(exc).__name__})"
            ) from None
        if response.status_code in (408, 429) or response.status_code >= 500:
            # A Retry-After date counts from the answer's own Date, as for the FHIR server
            # (retry_after_seconds): a box whose clock lags would wait the lag on top.
            delay = retry_after_seconds(
                response.headers.get("Retry-After"),
                now=self._clock(),
                served=response.headers.get("Date"),
            )
            raise UpstreamError(
                Failure.TRANSIENT, f"token endpoint: {_oauth_error(response)}", delay
            )
        if response.status_code != 200:
            raise UpstreamError(
                Failure.AUTH, f"token endpoint refused the client: {_oauth_error(response)}"
            )
        return self._token_from(response, started)

    def _token_from(self, response: httpx.Response, started: float) -> _Token:
        body = _json_or_none(response)
        value = body.get("access_token") if isinstance(body, dict) else None
        kind = body.get("token_type", "bearer") if isinstance(body, dict) else None
        if not isinstance(value, str) or not value or str(kind).lower() != "bearer":
            raise UpstreamError(
                Failure.AUTH, "token endpoint answered 200 without a bearer access_token"
            )
        if not is_bearer_token(value):
            # Never quoted: it is a credential, whatever its shape.
            raise UpstreamError(
                Failure.AUTH,
                f"token endpoint {self._token_url} answered an access_token that cannot be "
                "sent (a line break, a space, a control or non-ASCII character); ask the EHR "
                "team to check the token endpoint",
            )
        assert isinstance(body, dict)
        lifetime = body.get("expires_in", DEFAULT_TOKEN_LIFETIME_S)
        if (
            isinstance(lifetime, bool)
            or not isinstance(lifetime, int | float)
            or not 0 < lifetime <= MAX_TOKEN_LIFETIME_S  # NaN, infinity, 400 digits: no
        ):
            lifetime = DEFAULT_TOKEN_LIFETIME_S
        self.tokens_fetched += 1
        logger.info("access token obtained for %s, valid %d s", self._client_id, lifetime)
        margin = min(REFRESH_MARGIN_S, lifetime / 2)
        return _Token(value, started + lifetime - margin)


def read_token_file(path: Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace removed).

    The token is usable against the EHR as it stands, so a file open to group or others is
    warned about in the journal (naming the file, never quoting it). It is not refused yet:
    earlier releases did not ask for it, and refusing would stop the sync on an upgrade.

    A token that cannot be sent (a line break inside, two tokens pasted, a space, any
    control or non-ASCII character) is a :class:`KeyFileError` naming the file,
    never quoting it, nor chained to an error that does: sent, it would fail before leaving
    the box, every time.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = 0  # reading it, below, says what is wrong
    if mode & 0o077:
        logger.warning(
            "%s: the bearer token is readable by group or others (mode %04o); run "
            "'chmod 600 %s' (a later release will refuse it)",
            path,
            mode,
            path,
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the bearer token ({exc.strerror})") from exc
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        token = None  # raised below: the decode error holds the file's bytes
    if token is None:
        raise KeyFileError(f"{path}: cannot read the bearer token (not UTF-8 text)")
    if not token:
        raise KeyFileError(f"{path}: the bearer token file is empty")
    if not is_bearer_token(token):
        raise KeyFileError(
            f"{path}: not one bearer token (a line break, a space, a control or non-ASCII "
            "character); the file must hold the token alone"
        )
    return token


class StaticBearerAuth(httpx.Auth):
    """A bearer token from a file; on a 401 the file is read again (rotation without restart).

    A 401 with the token still unchanged, or with the new one too, is ``UpstreamError(AUTH)``
    rather than the *permanent* class a bare 401 would get, which would dead-letter the items.
    """

    requires_request_body = True

    def __init__(self, token_file: Path) -> None:
        self._file = token_file
        self._token = read_token_file(token_file)

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        """Not supported: the sync agent is asynchronous."""
        raise RuntimeError("StaticBearerAuth works with httpx.AsyncClient only")

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Attach the token; on a 401, resend once if the file holds a different one."""
        if _is_public(request):
            yield request
            return
        token = self._token
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401:
            return
        try:
            fresh = await asyncio.to_thread(read_token_file, self._file)
        except KeyFileError as exc:
            raise UpstreamError(Failure.AUTH, str(exc)) from None
        if fresh != token:
            self._token = fresh
            request.headers["Authorization"] = f"Bearer {fresh}"
            response = yield request
            if response.status_code != 401:
                return
        raise UpstreamError(
            Failure.AUTH, f"the upstream refused the bearer token in {self._file} (HTTP 401)"
        )
