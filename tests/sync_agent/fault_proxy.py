"""A fault-injecting HTTP/1.1 proxy on loopback, between the sync agent and a FHIR server.

It parses each request (request line, headers, ``Content-Length`` body), forwards it to the
upstream with its own client and answers the agent, unless a fault says otherwise. Faults are
what a clinic's link and a busy EHR really do, each at the point where it matters for
exactly-once delivery:

``refuse``      the listener is closed (the agent's connect fails: ``ECONNREFUSED``) and open
                connections are reset; switching to any other mode listens again, same port.
``reset``       the request is read, then the connection is reset: it never reaches the server.
``drop``        the request is forwarded and *applied*, the answer is read, then the
                connection is reset without a byte of it (the ambiguous case).
``delay``       wait ``delay_s``, then forward and answer (past the agent's timeout: ambiguous).
``status``      answer ``status`` (500/503/429…) itself with an OperationOutcome (or
                ``body``, when given) and, when given, ``Retry-After``; nothing is forwarded.
``replace``     forward (applied), then answer ``status`` with ``body`` instead of the
                server's answer: a gateway or a server bug answering nonsense after the fact.
``too_large``   answer 413 when the body is larger than ``max_body`` bytes (0: always).
``truncate``    forward (applied), then send the headers and half the body and close; with
                ``fix_length`` the ``Content-Length`` is cut too, so the body is just bad JSON.

A fault is armed for the next ``count`` requests (``None``: until changed), or drawn per
request from weights with a seeded RNG (:meth:`FaultProxy.randomise`). ``counts`` says what
was done. :class:`ProxyThread` runs one on its own event loop for synchronous tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

T = TypeVar("T")

_HOP_HEADERS = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "host",
    "accept-encoding",
    "content-encoding",
}
_REASONS = {
    200: "OK",
    201: "Created",
    404: "Not Found",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class Fault(StrEnum):
    """What the proxy does to a request."""

    NONE = "none"
    REFUSE = "refuse"
    RESET = "reset"
    DROP = "drop"
    DELAY = "delay"
    STATUS = "status"
    TOO_LARGE = "too_large"
    TRUNCATE = "truncate"
    REPLACE = "replace"
    CORRUPT = "corrupt"  # the answer claims gzip and is not: the client cannot decode it


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """One armed fault and its parameters."""

    fault: Fault = Fault.NONE
    status: int = 503
    retry_after: str | None = None
    delay_s: float = 0.0
    max_body: int = 0
    fix_length: bool = False
    body: bytes | None = None
    count: int | None = None  # requests left; None = until changed


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


def _outcome(status: int, text: str) -> bytes:
    return json.dumps(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "transient", "diagnostics": text}],
        }
    ).encode()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a crashed middlebox or a dropped NAT entry does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """The proxy; ``await start()`` then point the agent at :attr:`base_url`."""

    def __init__(
        self,
        upstream: str,
        *,
        fhir_path: str = "/fhir/R4",
        rng: random.Random | None = None,
        port: int = 0,
    ) -> None:
        self._upstream = upstream.rstrip("/")
        self._fhir_path = fhir_path
        self._rng = rng or random.Random(0)
        self.port = port
        self._server: asyncio.Server | None = None
        self._client: httpx.AsyncClient | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._spec = FaultSpec()
        self._weights: list[tuple[FaultSpec, float]] = []
        self.counts: Counter[str] = Counter()
        self._armed = 0  # bumped by every set(): which arming a request arrived under
        self._posts: Counter[int] = Counter()  # POSTs not yet answered (or cut), by arming

    @property
    def base_url(self) -> str:
        """The FHIR base the agent uses, e.g. ``http://127.0.0.1:40123/fhir/R4``."""
        return f"http://127.0.0.1:{self.port}{self._fhir_path}"

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def start(self) -> Self:
        self._client = httpx.AsyncClient(base_url=self._upstream, timeout=120.0)
        await self._listen()
        return self

    async def close(self) -> None:
        await self._stop_listening()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._serve, "127.0.0.1", self.port, reuse_address=True
            )
            self.port = self._server.sockets[0].getsockname()[1]

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            _reset(writer)
        if server is not None:
            await server.wait_closed()

    # -- control ---------------------------------------------------------------------------

    async def set(self, fault: Fault | str, **params: Any) -> None:
        """Arm ``fault`` (see the module docstring for the parameters); clears randomness."""
        spec = FaultSpec(Fault(fault), **params)
        self._weights = []
        self._spec = spec
        self._armed += 1
        if spec.fault is Fault.REFUSE:
            self.counts["refuse_windows"] += 1
            await self._stop_listening()
        else:
            await self._listen()

    async def heal(self) -> None:
        """No faults: listen and pass everything through."""
        await self.set(Fault.NONE)

    async def randomise(self, weights: Mapping[Fault | FaultSpec, float]) -> None:
        """Draw each request's fault from ``weights`` (``refuse`` is a window: use :meth:`set`)."""
        await self.set(Fault.NONE)
        specs = []
        for key, weight in weights.items():
            spec = key if isinstance(key, FaultSpec) else FaultSpec(Fault(key))
            if spec.fault is Fault.REFUSE:
                raise ValueError("refuse is not per request; arm it with set() for a window")
            specs.append((spec, weight))
        self._weights = specs

    def _take(self) -> FaultSpec:
        if self._weights:
            specs, weights = zip(*self._weights, strict=True)
            return self._rng.choices(specs, weights)[0]
        spec = self._spec
        if spec.count is not None:
            if spec.count <= 0:
                return FaultSpec()
            self._spec = replace(spec, count=spec.count - 1)
        return spec

    # -- serving ---------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counts["connections"] += 1
        self._writers.add(writer)
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    break
                if not await self._handle(request, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers.append((name.strip(), value.strip()))
        length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
        body = await reader.readexactly(length) if length else b""
        return _Request(method, target, headers, body)

    @property
    def posts_in_flight(self) -> int:
        """POSTs received since the fault was last armed and not yet answered (or cut).

        A POST that arrived before (a killed agent's, still held by an earlier delay or still
        with the server) is not counted: it is about to finish, and is not the one armed for.
        """
        return self._posts[self._armed]

    async def _handle(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection is gone."""
        posting = request.method == "POST"
        armed = self._armed
        self._posts[armed] += posting
        try:
            return await self._answer(request, writer)
        finally:
            self._posts[armed] -= posting
            if not self._posts[armed]:
                del self._posts[armed]

    async def _answer(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        self.counts["requests"] += 1
        spec = self._take()
        fault = spec.fault
        if fault is Fault.TOO_LARGE and len(request.body) <= spec.max_body:
            fault = Fault.NONE
        if fault is not Fault.NONE:
            self.counts[fault.value] += 1
        if fault is Fault.RESET:
            _reset(writer)
            return False
        if fault is Fault.STATUS or fault is Fault.TOO_LARGE:
            status = 413 if fault is Fault.TOO_LARGE else spec.status
            extra = [] if spec.retry_after is None else [("Retry-After", spec.retry_after)]
            body = spec.body or _outcome(status, f"injected by the fault proxy: {status}")
            await self._respond(writer, request, status, extra, body)
            return True
        if fault is Fault.DELAY:
            await asyncio.sleep(spec.delay_s)
        try:
            status, headers, body = await self._forward(request)
        except httpx.HTTPError as exc:
            self.counts["upstream_errors"] += 1
            body = _outcome(502, f"fault proxy: upstream failed ({type(exc).__name__})")
            await self._respond(writer, request, 502, [], body)
            return True
        self.counts["forwarded"] += 1
        if fault is Fault.DROP:
            _reset(writer)
            return False
        if fault is Fault.REPLACE:
            await self._respond(writer, request, spec.status, [], spec.body or b"")
            return True
        if fault is Fault.CORRUPT:
            kept = [(k, v) for k, v in headers if k.lower() != "content-encoding"]
            await self._respond(
                writer, request, status, [*kept, ("Content-Encoding", "gzip")], body
            )
            return True
        if fault is Fault.TRUNCATE:
            cut = body[: len(body) // 2]
            await self._respond(
                writer, request, status, headers, cut, length=None if spec.fix_length else len(body)
            )
            _reset(writer)
            return False
        await self._respond(writer, request, status, headers, body)
        return True

    async def _forward(self, request: _Request) -> tuple[int, list[tuple[str, str]], bytes]:
        assert self._client is not None
        headers = [(k, v) for k, v in request.headers if k.lower() not in _HOP_HEADERS]
        response = await self._client.request(
            request.method, request.target, headers=headers, content=request.body
        )
        kept = [(k, v) for k, v in response.headers.items() if k.lower() not in _HOP_HEADERS]
        return response.status_code, kept, response.content

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        request: _Request,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        length: int | None = None,
    ) -> None:
        if not any(k.lower() == "content-type" for k, _ in headers):
            headers = [*headers, ("Content-Type", "application/fhir+json")]
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append(f"Content-Length: {len(body) if length is None else length}")
        payload = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        writer.write(payload if request.method == "HEAD" else payload + body)
        await writer.drain()


class ProxyThread:
    """A :class:`FaultProxy` on its own event loop in a thread (for synchronous tests)."""

    def __init__(self, upstream: str, *, rng: random.Random | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy")
        self.proxy = FaultProxy(upstream, rng=rng)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def __enter__(self) -> Self:
        self._thread.start()
        self._call(self.proxy.start())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._call(self.proxy.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @property
    def base_url(self) -> str:
        return self.proxy.base_url

    def set(self, fault: Fault | str, **params: Any) -> None:
        self._call(self.proxy.set(fault, **params))

    def heal(self) -> None:
        self._call(self.proxy.heal())

    def randomise(self, weights: Mapping[Fault | FaultSpec, float]) -> None:
        self._call(self.proxy.randomise(weights))

    def counts(self) -> dict[str, int]:
        async def snapshot() -> dict[str, int]:
            return dict(self.proxy.counts)

        return self._call(snapshot())

    def posts_in_flight(self) -> int:
        """POSTs the proxy holds now that arrived since the fault was last armed."""

        async def snapshot() -> int:
            return self.proxy.posts_in_flight

        return self._call(snapshot())
