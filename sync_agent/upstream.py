"""An upstream FHIR server as the sync agent sees it: one HTTP client, errors put in classes.

The classes follow the Medplum agent's queue (STYLE.md): **transient** (connection refused or
reset, 5xx but 504, 429) → retry later with backoff; **ambiguous** (the request went out but
no answer came back, or a gateway answered 504: it gave up waiting on a request it may well
have forwarded) → resend, which is safe only because every write we send is idempotent;
**too large** (413, or a 400 whose OperationOutcome says the bundle has too many entries) →
send smaller bundles; **permanent** (another 4xx) → the server (or a filter in front of
it) refused the content; **endpoint** (a redirect, or a 404/405/406/410/415 to a request
at the server's base: a wrong ``base_url``, a login page in front of the EHR; or a request
that cannot even be formed, such as a ``base_url`` of another scheme) → the address
did not take the request at all, which says nothing about the items: they stay pending, as
for **auth**, and the exchange is retried with backoff. Before, a wrong ``base_url`` made
every item a dead letter, one at a time. (A bare 400 stays **permanent**: a filter in front
of the EHR may refuse one item's content, and the rest must flow.) **auth** → the two ends
did not accept each other: the token endpoint refused our client (an OAuth error), the
server answered 401 to a freshly obtained token, it refused our TLS client certificate, we
refused its certificate, or the TLS handshake failed for another reason than a lost
connection (https to a plain-http port, a protocol or key we do not accept). That is a
configuration problem for a person to fix, not a fault of the items: they stay pending and
the exchange is retried with backoff (sync_agent/auth.py has the details).

TLS handshake refusals and failures are recognised in the transport
(:class:`TlsAwareTransport`), so every request through :func:`build_client`'s client gets
them as ``UpstreamError(AUTH)`` with a message that says which side refused, or OpenSSL's
reason, instead of an anonymous ``ConnectError`` that reads as a dead link. The transport
also bounds what an answer may take in memory, compressed or not (:data:`MAX_ANSWER_BYTES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import ssl
import zlib
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from appliance.config import AuthKind, UpstreamConfig
from appliance.errors import ConfigError, KeyFileError
from sync_agent.own_address import followed

logger = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"


class Failure(StrEnum):
    """How a request failed, which decides what the agent does next."""

    TRANSIENT = "transient"
    AMBIGUOUS = "ambiguous"
    TOO_LARGE = "too_large"
    PERMANENT = "permanent"
    # Credentials or certificates refused, either way; the items are not at fault.
    AUTH = "auth"
    # The address did not take the request (not a FHIR endpoint, or not this operation).
    ENDPOINT = "endpoint"


# Not frozen: Python sets ``__traceback__`` on an exception that leaves a
# ``@contextmanager`` block (httpx wraps every send in one), and a frozen dataclass refuses
# every attribute, which turned the error into a TypeError. eq=False keeps exceptions
# compared (and hashed) by identity, as exceptions are.
@dataclass(slots=True, eq=False)
class UpstreamError(Exception):
    """A failed exchange with the upstream, classified; ``message`` is free of PHI.

    ``status`` is the HTTP status of an answer refusing the whole request (None when there
    was no such answer) and ``outcome`` whether its body was a FHIR OperationOutcome: the
    audit export holds a refusal against a record only when the FHIR server itself said so.
    """

    failure: Failure
    message: str
    retry_after_s: float | None = None
    status: int | None = None
    outcome: bool = False

    def __str__(self) -> str:
        return f"{self.failure}: {self.message}"


# -- reading what a server answered ---------------------------------------------------------
# Nothing in an answer is trusted to have the shape FHIR gives it: a server, a gateway or a
# proxy in between may send anything. These read what is usable and treat the rest as absent,
# so a malformed answer becomes a retry or a dead letter with a plain message, never an
# exception that ends the sync process (tests/sync_agent/test_answers.py, with hypothesis).


def as_dict(value: Any) -> dict[str, Any]:
    """``value`` when a server sent an object there, else ``{}``."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    """``value`` when a server sent an array there, else ``[]``."""
    return value if isinstance(value, list) else []


def is_outcome(body: Any) -> bool:
    """Whether a parsed answer is a FHIR OperationOutcome (the server speaking FHIR)."""
    return isinstance(body, dict) and body.get("resourceType") == "OperationOutcome"


def outcome_text(body: Any) -> str:
    """The diagnostics of an OperationOutcome, as one line (the server's words)."""
    if is_outcome(body):
        parts = []
        for item in as_list(body.get("issue")):
            issue = as_dict(item)
            details = issue.get("details")  # a CodeableConcept; some servers send a string
            text = (
                issue.get("diagnostics")
                or (details if isinstance(details, str) else as_dict(details).get("text"))
                or issue.get("code")
            )
            if text and isinstance(text, str | int | float):
                parts.append(str(text))
        return "; ".join(parts)[:500] or "OperationOutcome without diagnostics"
    return ""


def next_link(
    bundle: Any, client: httpx.AsyncClient, also_known_as: Iterable[str] = ()
) -> str | None:
    """The URL to ask for the ``next`` link of a search page (any shape: None when there is
    none), when it stays on ``client``'s upstream: at its base URL as it is, at one of the
    addresses it is ``also_known_as`` under the base URL
    (:func:`~sync_agent.own_address.followed`). Never one to another host: our credentials
    go with the request.
    """
    for link in as_list(as_dict(bundle).get("link")):
        url = as_dict(link).get("url")
        if as_dict(link).get("relation") == "next" and isinstance(url, str) and url:
            return followed(url, str(client.base_url), also_known_as)
    return None


def failure_class(error: str | None) -> str | None:
    """``transient``, ``auth``… of an error text (``str(UpstreamError)``): all of it that may
    be shown or logged, the rest being possibly the server's words, which may quote PHI."""
    return None if error is None else error.split(":", 1)[0]


def bundle_entries(body: Any) -> list[dict[str, Any]]:
    """A Bundle's entries in order, each a dict (``{}`` for one that is not one)."""
    return [as_dict(entry) for entry in as_list(as_dict(body).get("entry"))]


def search_matches(bundle: Any, rtype: str) -> list[dict[str, Any]]:
    """The matches of a searchset of ``rtype`` with an id (not included resources, not
    OperationOutcomes)."""
    found = []
    for entry in bundle_entries(bundle):
        resource = entry.get("resource")
        mode = as_dict(entry.get("search")).get("mode", "match")
        if (
            isinstance(resource, dict)
            and resource.get("resourceType") == rtype
            and isinstance(resource.get("id"), str)
            and mode == "match"
        ):
            found.append(resource)
    return found


def entry_answer(entry: Any) -> dict[str, Any]:
    """An entry's ``response`` (``{}`` when it has none that is an object)."""
    return as_dict(as_dict(entry).get("response"))


def entry_status(entry: Any) -> int:
    """The HTTP status an entry's ``response.status`` starts with ("201 Created"); 0 if none."""
    status = entry_answer(entry).get("status")
    if not isinstance(status, str):
        return 0
    head = status.strip()[:4]
    code = head[:3]
    if len(code) == 3 and code.isascii() and code.isdigit() and not head[3:].isdigit():
        return int(code)
    return 0


def entry_outcome(entry: Any, code: int) -> str:
    """What the server said about one refused entry, as one line: the OperationOutcome in its
    ``response.outcome``, else one in its ``resource`` (where some servers put it), else the
    status alone."""
    return (
        outcome_text(entry_answer(entry).get("outcome"))
        or outcome_text(as_dict(entry).get("resource"))
        or f"HTTP {code}"
    )


_TOO_LARGE_WORDS = ("too many", "too large", "entries", "payload too large")
# Whole-request answers that mean "later" (timeout, conflict, locked, too early, too many).
_RETRY_STATUSES = frozenset({408, 409, 423, 425, 429})
# Whole-request answers about the address or the protocol, never about a resource we sent
# (as is every redirect: the client follows none, see build_client):
# nothing here, this method not allowed here, cannot answer in FHIR JSON, gone for good,
# does not read FHIR JSON.
_ENDPOINT_STATUSES = frozenset({404, 405, 406, 410, 415})
# An entry's own 4xx that says nothing against the item itself: our credentials or access
# policy (401/403), or "later" as above. The item is sent again, never dead-lettered.
ENTRY_NOT_THE_ITEM = frozenset({401, 403}) | _RETRY_STATUSES
# Whole-request answers about how the request was made, never what it carries: an upgrade
# required (426), our request's header fields too large (431). From a proxy or the server,
# every request gets the same: records wait, a person mends the configuration.
_PROTOCOL_STATUSES = frozenset({426, 431})


# The longest Retry-After taken from a server (a day, as RETRY_HORIZON in the outbox).
MAX_RETRY_AFTER_S = 86_400.0


_DELAY_SECONDS = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,6})?")


def _http_date(value: str | None) -> datetime | None:
    """An HTTP-date (``Wed, 21 Oct 2026 07:28:00 GMT``; without a zone read as GMT, which
    HTTP dates are), else None."""
    text = (value or "").strip()
    if not text[:1].isalpha():
        return None  # every HTTP-date starts with its day name
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):  # 3.11 raises TypeError
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def retry_after_seconds(
    value: str | None, *, now: datetime | None = None, served: str | None = None
) -> float | None:
    """A ``Retry-After`` (RFC 9110 section 10.2.3) as seconds, capped at a day; else None.

    Either delay-seconds (ASCII digits; a decimal fraction is taken too, as some servers send
    one) or an HTTP-date, a date already past being 0. A date is counted from the answer's own
    ``Date`` (``served``) when it has one, as the server's clock set both: a box whose clock
    lags (no battery clock, NTP not yet answered) would otherwise wait a day for a minute's
    pause. Without one, from ``now`` (default: the current time). "1e400", "inf", "nan", "²"
    or any other text is no delay we act on: the usual backoff applies.
    """
    text = (value or "").strip()
    if _DELAY_SECONDS.fullmatch(text):
        return min(float(text), MAX_RETRY_AFTER_S)
    when = _http_date(text)
    if when is None:
        return None
    since = _http_date(served) or now or datetime.now(UTC)
    return min(max((when - since).total_seconds(), 0.0), MAX_RETRY_AFTER_S)


def classify_response(
    status: int, body: Any, retry_after: str | None, *, served: str | None = None
) -> UpstreamError:
    """Put a non-2xx answer to a whole request into its class (``served``: the answer's
    ``Date``, for a ``Retry-After`` given as a date)."""
    text = outcome_text(body) or f"HTTP {status}"
    if status == 413 or (status == 400 and any(w in text.lower() for w in _TOO_LARGE_WORDS)):
        return UpstreamError(Failure.TOO_LARGE, text)
    if status in (401, 403):
        # Credentials or permissions: fixed by a person at the EHR or in the site config,
        # never by dead-lettering the records (they stay pending; staff see the reason).
        return UpstreamError(Failure.AUTH, f"the upstream refused our credentials: {text}")
    if status == 407:
        return UpstreamError(
            Failure.AUTH,
            "a proxy in front of the upstream asks for its own credentials (HTTP 407); "
            "ask the site's network team",
        )
    if status in _PROTOCOL_STATUSES:
        return UpstreamError(
            Failure.ENDPOINT,
            f"the upstream did not take the request as it was made (HTTP {status}); "
            "check base_url and the upstream's settings in the site config",
        )
    if status == 504:
        # A gateway that gave up waiting: on a request it may have forwarded (the EHR may
        # be applying it still), and one perhaps too slow for the gateway, which an
        # ambiguous outcome sends again smaller. (502 and 503 say nothing of the request.)
        return UpstreamError(
            Failure.AMBIGUOUS, text, retry_after_seconds(retry_after, served=served)
        )
    if status in _RETRY_STATUSES or status >= 500:
        return UpstreamError(
            Failure.TRANSIENT, text, retry_after_seconds(retry_after, served=served)
        )
    if status < 400 or status in _ENDPOINT_STATUSES:
        said = text if text.startswith("HTTP ") else f"HTTP {status}: {text}"
        return UpstreamError(
            Failure.ENDPOINT,
            f"the upstream address did not take the request ({said}); "
            "check base_url in the site config",
        )
    return UpstreamError(Failure.PERMANENT, text)


def classify_for_resource(
    status: int, body: Any, retry_after: str | None, *, served: str | None = None
) -> UpstreamError:
    """As :func:`classify_response`, for a request about one resource or one search (an
    update, a read, a patient's readings): an address status (404, 405, 406, 410, 415)
    answered with the server's own OperationOutcome is about that resource or search
    (deleted, merged, not updatable, not searchable so), not the address: **permanent**.
    A redirect, or such a status from something that is not the FHIR server (a proxy's
    page), stays **endpoint**: the address is wrong, and what was asked waits."""
    refusal = classify_response(status, body, retry_after, served=served)
    if status in _ENDPOINT_STATUSES and is_outcome(body):
        return UpstreamError(Failure.PERMANENT, outcome_text(body) or f"HTTP {status}")
    return refusal


# OpenSSL's names for the alerts by which a server refuses our certificate or the handshake
# (RFC 8446 section 6.2; TLS 1.3 sends certificate_required when none was presented). An
# end-of-file or reset is deliberately not here: that is a lost connection, not a refusal.
_TLS_REFUSALS = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV1_ALERT_PROTOCOL_VERSION",
    }
)


def tls_refusal(exc: BaseException) -> str | None:
    """Why a TLS handshake failed for a configuration reason, or None if it did not.

    Walks the exception chain (httpx wraps httpcore, which wraps :mod:`ssl`).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return (
                f"we do not trust the server's certificate ({current.verify_message}); "
                "check ca_file and the server name"
            )
        if isinstance(current, ssl.SSLError) and current.reason in _TLS_REFUSALS:
            return (
                f"the server refused the TLS handshake ({current.reason}); check "
                "client_cert_file and that the upstream trusts its issuer"
            )
        current = current.__cause__ or current.__context__
    return None


# ssl's errors that are a connection lost in the handshake, not a handshake refused.
_TLS_LOST = (ssl.SSLEOFError, ssl.SSLSyscallError, ssl.SSLZeroReturnError)


def tls_failure(exc: BaseException) -> str | None:
    """Why a TLS handshake failed, when OpenSSL gave a reason (``exc`` being a
    ``ConnectError``: the handshake is part of connecting), or None.

    Any reason other than :func:`tls_refusal`'s: https to a port that speaks plain HTTP
    (``WRONG_VERSION_NUMBER``), a protocol version or a key we do not accept
    (``UNSUPPORTED_PROTOCOL``, ``DH_KEY_TOO_SMALL``)... It happens again on every try, so it
    is for a person to mend, not a dead link to wait out. An end-of-file or a reset is not
    one: that is a lost connection.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        # OpenSSL's reason is a name (WRONG_VERSION_NUMBER): no key material, no data.
        lost = isinstance(current, _TLS_LOST)
        if isinstance(current, ssl.SSLError) and not lost and current.reason:
            return (
                f"the TLS handshake failed ({current.reason}); check that the address "
                "is the server's https port (not an http one) and that the server's "
                "TLS version and keys are current ones"
            )
        current = current.__cause__ or current.__context__
    return None


# The largest answer taken from an upstream, as sent and once decoded: far above any page or
# bundle answer (a page of 1,000 Patients is a few MB), far below what would starve the box
# of memory. A server (or a proxy) streaming without end, or a small gzip of zeros that
# decodes to gigabytes, would otherwise be read into memory until the process died.
MAX_ANSWER_BYTES = 64 * 2**20

# The content codings asked for, and decoded by the transport itself (below), not by httpx:
# its decoders take whatever a chunk expands to. Named here so that httpx asking for more
# (br, zstd: when their packages are installed) changes nothing.
ACCEPT_ENCODING = "gzip, deflate"
# Decoded in pieces of at most this many bytes: deflate expands up to ~1,000 times, so one
# chunk off the wire could otherwise become tens of MB before the cap is checked.
_DECODE_STEP = 2**16


def _too_long() -> UpstreamError:
    return UpstreamError(
        Failure.TRANSIENT, f"answer over {MAX_ANSWER_BYTES // 2**20} MB, not read to its end"
    )


class _Inflater:
    """One gzip or deflate coding of a body, decoded chunk by chunk in bounded pieces.

    As httpx decodes them: ``deflate`` is the zlib format (RFC 9110), or raw deflate when it
    does not start as zlib, as some servers send it (told apart on the first two bytes, the
    zlib header, however the body is cut in chunks); data after the end is ignored, and so
    is a body cut short (what it held is given).
    """

    def __init__(self, coding: str) -> None:
        # deflate: the first bytes, until there are two to tell zlib from raw deflate.
        self._held: bytes | None = b"" if coding == "deflate" else None
        self._inflate = zlib.decompressobj(
            zlib.MAX_WBITS | 16 if coding == "gzip" else zlib.MAX_WBITS
        )

    def feed(self, data: bytes) -> Iterator[bytes]:
        """What ``data`` decodes to, in pieces of at most :data:`_DECODE_STEP` bytes."""
        if self._inflate.eof:
            return  # past the end of the data: ignored (zlib would keep it in unused_data)
        if self._held is None:
            piece = self._step(data)
        else:
            data, self._held = self._held + data, None
            if len(data) < 2:
                self._held = data
                return
            try:
                piece = self._inflate.decompress(data, _DECODE_STEP)
            except zlib.error:
                self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
                piece = self._step(data)
        while True:
            if piece:
                yield piece
            if self._inflate.eof:
                # The end of the data, and bytes after it in the same chunk (a proxy's
                # newline, a second gzip member): ignored, as httpx does. Asked again, zlib
                # gives nothing and keeps them as unconsumed: this loop never ended.
                return
            rest = self._inflate.unconsumed_tail
            if not rest and len(piece) < _DECODE_STEP:
                return  # all of data read, nothing held back
            piece = self._step(rest)

    def flush(self) -> bytes:
        """What is left at the end of the body (nothing, once :meth:`feed` was read out)."""
        if self._held is not None:
            return b""  # no body, or one byte: nothing in it
        try:
            return self._inflate.flush()
        except zlib.error:
            raise _undecodable() from None

    def _step(self, data: bytes) -> bytes:
        try:
            return self._inflate.decompress(data, _DECODE_STEP)
        except zlib.error:
            raise _undecodable() from None


def _undecodable() -> httpx.DecodingError:
    # httpx's own class for it, which exchange() classes as it did when httpx decoded.
    return httpx.DecodingError("the answer does not decode as its Content-Encoding says")


class _Decoder:
    """The content codings of an answer, undone in turn (the last applied first)."""

    def __init__(self, codings: list[str]) -> None:
        self._layers = [_Inflater(c) for c in reversed(codings)]

    def feed(self, data: bytes, layer: int = 0) -> Iterator[bytes]:
        """``data`` from layer ``layer`` on, decoded through the rest."""
        if layer == len(self._layers):
            if data:
                yield data
            return
        for piece in self._layers[layer].feed(data):
            yield from self.feed(piece, layer + 1)

    def finish(self) -> Iterator[bytes]:
        """What the layers held back at the end of the body."""
        for layer, inflater in enumerate(self._layers):
            yield from self.feed(inflater.flush(), layer + 1)


def _codings(headers: httpx.Headers) -> list[str]:
    """The answer's content codings that we decode, in the order applied; as httpx does, an
    ``identity`` or a coding it does not know is passed over."""
    values = (v.strip().lower() for v in headers.get_list("Content-Encoding", split_commas=True))
    return [v for v in values if v in ("gzip", "deflate")]


class _CappedStream(httpx.AsyncByteStream):
    """An answer's body, decoded from its content codings when it has any, cut off when it
    passes :data:`MAX_ANSWER_BYTES` as sent or as decoded."""

    def __init__(self, inner: httpx.AsyncByteStream, codings: list[str]) -> None:
        self._inner = inner
        self._decoder = _Decoder(codings) if codings else None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = decoded = 0
        async for chunk in self._inner:
            read += len(chunk)
            if read > MAX_ANSWER_BYTES:
                raise _too_long()
            if self._decoder is None:
                yield chunk
                continue
            for piece in self._decoder.feed(chunk):
                decoded += len(piece)
                if decoded > MAX_ANSWER_BYTES:
                    raise _too_long()
                yield piece
        if self._decoder is not None:
            for piece in self._decoder.finish():
                decoded += len(piece)
                if decoded > MAX_ANSWER_BYTES:
                    raise _too_long()
                yield piece

    async def aclose(self) -> None:
        await self._inner.aclose()


class TlsAwareTransport(httpx.AsyncBaseTransport):
    """httpx's own transport, except that a refused or failed TLS handshake raises
    ``UpstreamError(AUTH)``, and that an answer is held to :data:`MAX_ANSWER_BYTES`.

    Raised without a cause, so the sync loop backs off instead of probing: the link is up, the
    two ends just do not accept each other, and that needs a person.
    """

    def __init__(self, verify: ssl.SSLContext | bool = True) -> None:
        self._context = verify if isinstance(verify, ssl.SSLContext) else None
        self._verify = verify
        self._inner = httpx.AsyncHTTPTransport(verify=verify)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send one request through the wrapped transport; an answer over
        :data:`MAX_ANSWER_BYTES`, as sent or decoded, is refused (see :class:`_CappedStream`).

        A compressed answer is decoded here and handed on without its ``Content-Encoding``
        (and ``Content-Length``, which was the compressed one), so httpx does not decode it
        again without a limit."""
        request.headers["Accept-Encoding"] = ACCEPT_ENCODING
        try:
            response = await self._inner.handle_async_request(request)
        except httpx.TransportError as exc:
            reason = tls_refusal(exc)
            if reason is None and request.url.scheme == "https" and _was_reset(exc):
                reason = await self._handshake_refusal(request.url)
            if reason is None and isinstance(exc, httpx.ConnectError):
                reason = tls_failure(exc)
            if reason is None:
                raise
            where = f"{request.url.host}:{request.url.port or 443}"
            raise UpstreamError(Failure.AUTH, f"TLS with {where}: {reason}") from None
        length = response.headers.get("Content-Length", "")
        if length.isascii() and length.isdigit() and len(length) < 19:
            if int(length) > MAX_ANSWER_BYTES:
                await response.aclose()
                raise _too_long()
            if "Content-Encoding" not in response.headers:
                return response  # h11 holds the body to its stated length
        if not isinstance(response.stream, httpx.AsyncByteStream):
            return response
        headers = response.headers.copy()
        if "Content-Encoding" in headers:
            del headers["Content-Encoding"]
            headers.pop("Content-Length", None)
        return httpx.Response(
            response.status_code,
            headers=headers,
            stream=_CappedStream(response.stream, _codings(response.headers)),
            extensions=response.extensions,
            request=request,
        )

    async def aclose(self) -> None:
        """Close the wrapped transport's connections."""
        await self._inner.aclose()

    async def _handshake_refusal(self, url: httpx.URL) -> str | None:
        """Whether a bare handshake with our credentials is refused (see ``_was_reset``)."""
        if self._context is None:
            self._context = httpx.create_ssl_context(verify=self._verify)
        host, port = url.host, url.port or 443
        try:
            async with asyncio.timeout(_DIAGNOSIS_S):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=self._context, server_hostname=host
                )
                try:
                    # A server that accepts our certificate sends session tickets and waits
                    # for a request; one that refuses it sends an alert, or (asyncio servers
                    # such as Hypercorn) just closes the connection.
                    first = await reader.read(1)
                finally:
                    writer.close()
                    with contextlib.suppress(OSError, ssl.SSLError):
                        await writer.wait_closed()
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            return tls_refusal(exc)
        if first:
            return None
        return (
            "the server closed the connection right after the TLS handshake, before any "
            "request: it does not accept our client certificate (none, or one it does not "
            "trust); check client_cert_file and that the upstream trusts its issuer"
        )


# How long the diagnosis of a reset connection waits for the server's verdict.
_DIAGNOSIS_S = 1.0


def _was_reset(exc: BaseException) -> bool:
    """Whether the connection was reset: with TLS 1.3 the server checks our certificate only
    after the client considers the handshake done, and when our request is already in its
    buffer its refusal can arrive as a bare reset that hides the alert. Such a reset is worth
    one fresh handshake (without a request) to tell a refusal from a lost connection."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionResetError):
            return True
        current = current.__cause__ or current.__context__
    return False


def tls_context(upstream: UpstreamConfig) -> ssl.SSLContext | bool:
    """How the client verifies the server, and the certificate it presents (mtls, or any
    upstream with ``client_cert_file``).

    ``True`` (httpx's default CA bundle) unless the site gives ``ca_file`` or a client
    certificate. Any file that does not load is a :class:`KeyFileError` naming it.
    """
    # Presented whenever configured: with auth = "mtls", or alongside SMART or a bearer.
    mtls = upstream.auth is AuthKind.MTLS or upstream.client_cert_file is not None
    if upstream.ca_file is None and not mtls:
        return True
    if upstream.ca_file is None:
        context = httpx.create_ssl_context()
    else:
        try:
            context = ssl.create_default_context(cafile=str(upstream.ca_file))
        except ssl.SSLError as exc:  # before OSError, its base class
            raise KeyFileError(
                f"{upstream.ca_file}: not a PEM CA bundle ({exc.reason or 'unreadable'})"
            ) from exc
        except OSError as exc:
            raise KeyFileError(
                f"{upstream.ca_file}: cannot read the CA bundle ({exc.strerror or exc})"
            ) from exc
    if mtls:
        # Imported here: auth raises this module's errors, so it imports this module.
        from sync_agent.auth import check_private_file

        assert upstream.client_cert_file is not None  # the config parser requires both
        assert upstream.client_key_file is not None
        check_private_file(upstream.client_key_file, "TLS client key")
        try:
            context.load_cert_chain(str(upstream.client_cert_file), str(upstream.client_key_file))
        except ssl.SSLError as exc:  # before OSError, its base class
            # e.g. KEY_VALUES_MISMATCH: OpenSSL's reason names no key material.
            raise KeyFileError(
                f"{upstream.client_cert_file}, {upstream.client_key_file}: the client "
                f"certificate and key do not load together ({exc.reason or 'unreadable'})"
            ) from exc
        except OSError as exc:
            raise KeyFileError(
                f"{upstream.client_cert_file}: cannot read the client certificate "
                f"({exc.strerror or exc})"
            ) from exc
    return context


def _in_clear(value: str | None) -> bool:
    """An ``http://`` URL to a host other than this one (credentials would cross the LAN)."""
    parts = urlsplit(value or "")
    if parts.scheme != "http" or parts.hostname in (None, "localhost"):
        return False
    try:
        return not ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return True


def transport_problems(upstream: UpstreamConfig) -> list[str]:
    """What in an upstream's config would send credentials badly: checked where they are
    used (the sync process and the sync commands refuse to start), not by the config
    parser, so that the clinic's web UI keeps running on a config that loaded before.

    Over ``http://`` to another host a bearer token or a SMART assertion would cross the LAN
    in clear text, and a TLS client certificate (mtls, or one beside any ``auth``) would never
    be presented: the records would go unauthenticated and in clear text."""
    where = f"sync.upstream {upstream.name!r}"
    problems = []
    urls = {
        AuthKind.BEARER: ("base_url",),
        AuthKind.SMART: ("base_url", "token_url"),
    }
    certificate = upstream.auth is AuthKind.MTLS or upstream.client_cert_file is not None
    for key, url in (("base_url", upstream.base_url), ("token_url", upstream.token_url)):
        if not _in_clear(url):
            continue
        wrongs = []
        if key in urls.get(upstream.auth, ()):
            wrongs.append(f"sends the {upstream.auth.value} credentials in clear text")
        if certificate and key == "base_url":
            wrongs.append("presents no TLS client certificate (the records go in clear text)")
        if wrongs:
            problems.append(
                f"{where}.{key}: http {' and '.join(wrongs)}; use https (http only on "
                "loopback, for tests)"
            )
    # A client certificate is presented whenever it is configured (mTLS beside SMART or a
    # bearer token, as some EHRs ask): then it takes both halves.
    if (upstream.client_cert_file is None) != (upstream.client_key_file is None):
        missing = "client_key_file" if upstream.client_key_file is None else "client_cert_file"
        problems.append(f"{where}.{missing}: required with the other half of the certificate")
    return problems


def build_client(upstream: UpstreamConfig, *, auth: httpx.Auth | None = None) -> httpx.AsyncClient:
    """An HTTP client for one upstream, authenticated as the site config says.

    Key, token and certificate files are read here, so a bad one stops the process at start
    with a :class:`KeyFileError` naming the file, and credentials that would go in clear text
    (or a client certificate that would never be presented) with a :class:`ConfigError`
    (:func:`transport_problems`). ``auth`` replaces the configured method (tests pass a
    :class:`sync_agent.auth.SmartBackendAuth` with an injected clock).
    """
    from sync_agent.auth import SmartBackendAuth, StaticBearerAuth

    if problems := transport_problems(upstream):
        raise ConfigError(problems, source=f"upstream {upstream.name!r}")

    headers = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}
    timeout = httpx.Timeout(upstream.timeout_s, connect=min(10.0, upstream.timeout_s))
    verify = tls_context(upstream)
    if auth is None and upstream.auth is AuthKind.BEARER:
        assert upstream.token_file is not None  # the config parser requires it
        auth = StaticBearerAuth(upstream.token_file)
    elif auth is None and upstream.auth is AuthKind.SMART:
        auth = SmartBackendAuth.from_config(upstream, verify=verify, timeout=timeout)
    return httpx.AsyncClient(
        base_url=upstream.base_url,
        headers=headers,
        timeout=timeout,
        auth=auth,
        verify=verify,
        transport=TlsAwareTransport(verify),
    )


async def exchange(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    params: dict[str, str] | None = None,
    json: Any = None,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """One HTTP exchange; a failed connection or a lost answer raises :class:`UpstreamError`.

    Status codes are left to the caller (they mean different things to a search, a PUT and
    a bundle). Every request to the upstream goes through here, so the classes are one.

    A request that cannot be formed (a header value HTTP does not allow, an address of
    another scheme) is never sent, and never will be as configured: **endpoint**, for a
    person, not a dead link to probe. Raised with neither cause nor context, as httpx's
    text quotes the header (a credential).
    """
    try:
        return await client.request(
            method, url, params=params, json=json, content=content, headers=headers
        )
    except (httpx.LocalProtocolError, httpx.UnsupportedProtocol) as exc:
        unformed = type(exc).__name__  # raised below, out of this block: no __context__
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise UpstreamError(Failure.TRANSIENT, f"cannot connect: {type(exc).__name__}") from exc
    except (
        httpx.ReadTimeout,
        httpx.WriteTimeout,
        httpx.RemoteProtocolError,
        httpx.ReadError,
    ) as exc:
        # The request (or part of it) left the box and no answer came: it may have landed.
        raise UpstreamError(Failure.AMBIGUOUS, f"no response: {type(exc).__name__}") from exc
    except httpx.TransportError as exc:
        raise UpstreamError(Failure.TRANSIENT, f"transport error: {type(exc).__name__}") from exc
    except (httpx.InvalidURL, httpx.TooManyRedirects) as exc:
        raise UpstreamError(Failure.ENDPOINT, f"bad address: {type(exc).__name__}") from exc
    except httpx.HTTPError as exc:
        # The rest (an answer that cannot be decoded, say): the request left, the answer is
        # unusable. Never let one escape: the sync loop would exit and crash-loop.
        raise UpstreamError(Failure.AMBIGUOUS, f"no usable answer: {type(exc).__name__}") from exc
    raise UpstreamError(
        Failure.ENDPOINT,
        f"request not sent: it cannot be formed ({unformed}: a header value such as the "
        "credentials, or the address, is not valid HTTP); check the upstream in the site config",
    )


def response_json(response: httpx.Response) -> Any:
    """The body as JSON, or None (orjson: a bundle's answer is parsed on the event loop)."""
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None


async def post_bundle(client: httpx.AsyncClient, bundle: dict[str, Any]) -> dict[str, Any]:
    """POST a batch/transaction Bundle to the server base; returns the response Bundle.

    Encoded with orjson: a bundle of 100 readings costs ~3 ms in the standard library's
    encoder, ~0.3 ms here, and the drain is bound by the event loop's CPU.
    """
    response = await exchange(
        client, "POST", "", content=orjson.dumps(bundle), headers={"Content-Type": FHIR_JSON}
    )
    body = response_json(response)
    if response.status_code >= 300:
        refusal = classify_response(
            response.status_code,
            body,
            response.headers.get("Retry-After"),
            served=response.headers.get("Date"),
        )
        refusal.status, refusal.outcome = response.status_code, is_outcome(body)
        raise refusal
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise UpstreamError(
            Failure.TRANSIENT, f"HTTP {response.status_code} without a response Bundle"
        )
    return body
