"""The HTTP transport to an upstream: the client for it, and what that client takes.

TLS handshake refusals and failures are recognised in the transport
(:class:`TlsAwareTransport`), so every request through :func:`build_client`'s client gets
them as ``UpstreamError(AUTH)`` with a message that says which side refused, or OpenSSL's
reason (:mod:`sync_agent.upstream_tls`), instead of an anonymous ``ConnectError`` that reads
as a dead link. The transport also bounds what an answer may take in memory, compressed or
not (:data:`MAX_ANSWER_BYTES`). The claims submission and the SMART token requests
(sync_agent/claims_submit.py, sync_agent/auth.py) go through this transport too; the classes
of its errors are :mod:`sync_agent.upstream`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
import zlib
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import httpx

from appliance.config import AuthKind, UpstreamConfig
from appliance.errors import ConfigError
from sync_agent.upstream import FHIR_JSON, Failure, UpstreamError
from sync_agent.upstream_tls import tls_context, tls_failure, tls_refusal

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
