"""A lossy, delaying UDP link between two aiortc peers on 127.0.0.1, for the loss tests.

``LossyLink.negotiate(offerer, answerer)`` runs the offer/answer exchange and rewrites the
ICE host candidates each side is given, so that every datagram between them goes through
a ``LossyProxy``: the offerer is told the proxy's ``a`` socket is the answerer, the answerer
is told its ``b`` socket is the offerer. One proxy per ICE transport (aiortc's default
``balanced`` bundle policy gives audio and video a transport each). Each direction drops
a fraction ``loss`` of datagrams, chosen by its own seeded ``random.Random``, and holds
each for ``delay`` seconds. Loss starts at 0 so the ICE and DTLS handshakes complete; set
``link.loss`` once connected. A direction may also drop chosen datagrams (``drop``): SRTP
leaves the RTP header in the clear, so ``rtp_header`` can pick a packet by payload type.

A direction can also be **rate-limited** (``rate_bps``): a bottleneck link with a FIFO
queue, as a WAN uplink is. Each datagram waits until the ones before it have been
serialised at that rate; one that would wait longer than ``queue_s`` is dropped (tail
drop). Delay-based bandwidth estimators (REMB) see the queue grow, as they would on a
real link. ``blackhole`` drops everything, both ways (the WAN leg gone). ``bytes``
counts what was forwarded.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from aiortc import RTCPeerConnection, RTCSessionDescription

Address = tuple[str, int]

CANDIDATE = re.compile(r"^(a=candidate:\S+ \d+ udp \d+ )(\S+) (\d+)( typ host.*)$", re.MULTILINE)


@dataclass
class Direction:
    """One way through the proxy: what was forwarded and dropped; ``drop`` picks datagrams."""

    rng: random.Random
    drop: Callable[[bytes], bool] | None = None
    rate_bps: float | None = None
    queue_s: float = 0.5
    forwarded: int = 0
    dropped: int = 0
    bytes: int = 0
    _free_at: float = 0.0  # when the bottleneck has sent everything queued so far

    def shaped_wait(self, size: int, now: float) -> float | None:
        """Seconds this datagram waits at the bottleneck, or None if the queue is full."""
        if self.rate_bps is None:
            return 0.0
        start = max(now, self._free_at)
        if start - now > self.queue_s:
            return None
        self._free_at = start + size * 8 / self.rate_bps
        return self._free_at - now


def rtp_header(data: bytes) -> tuple[int, int] | None:
    """(payload type, sequence number) of an RTP packet; None for STUN, DTLS and RTCP."""
    if len(data) < 12 or data[0] >> 6 != 2 or 192 <= data[1] <= 223:  # RFC 5761 §4
        return None
    return data[1] & 0x7F, int.from_bytes(data[2:4], "big")


class _Socket(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.handler: Callable[[bytes], None] | None = None

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self.handler is not None:
            self.handler(data)


class LossyProxy:
    """Relays datagrams between an offerer (behind ``a``) and an answerer (behind ``b``)."""

    def __init__(self, offerer: Address, seed: int, loss: float = 0.0, delay: float = 0.0):
        self.offerer = offerer
        self.answerer: Address | None = None
        self.loss = loss
        self.delay = delay
        self.to_answerer = Direction(random.Random(seed))
        self.to_offerer = Direction(random.Random(seed + 1))
        self.blackhole = False
        self._a = _Socket()
        self._b = _Socket()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for socket in (self._a, self._b):
            # connection_made runs a loop turn later; keep the transport at once.
            transport, _ = await loop.create_datagram_endpoint(
                lambda socket=socket: socket, local_addr=("127.0.0.1", 0)
            )
            socket.transport = transport
        self._a.handler = lambda data: self._forward(data, self.to_answerer, self._b, True)
        self._b.handler = lambda data: self._forward(data, self.to_offerer, self._a, False)

    @property
    def a(self) -> Address:
        """Where the offerer sends: stands for the answerer."""
        return self._address(self._a)

    @property
    def b(self) -> Address:
        """Where the answerer sends: stands for the offerer."""
        return self._address(self._b)

    def close(self) -> None:
        for socket in (self._a, self._b):
            if socket.transport is not None:
                socket.transport.close()

    @staticmethod
    def _address(socket: _Socket) -> Address:
        assert socket.transport is not None
        host, port = socket.transport.get_extra_info("sockname")[:2]
        return host, port

    def _forward(self, data: bytes, way: Direction, out: _Socket, to_answerer: bool) -> None:
        target = self.answerer if to_answerer else self.offerer
        if target is None or out.transport is None:
            return
        if (
            self.blackhole
            or (way.drop is not None and way.drop(data))
            or (self.loss and way.rng.random() < self.loss)
        ):
            way.dropped += 1
            return
        loop = asyncio.get_running_loop()
        wait = way.shaped_wait(len(data), loop.time())
        if wait is None:
            way.dropped += 1
            return
        way.forwarded += 1
        way.bytes += len(data)
        if self.delay or wait:
            loop.call_later(self.delay + wait, self._send, out, data, target)
        else:
            out.transport.sendto(data, target)

    @staticmethod
    def _send(out: _Socket, data: bytes, target: Address) -> None:
        if out.transport is not None and not out.transport.is_closing():
            out.transport.sendto(data, target)


def host_candidates(sdp: str) -> list[list[Address]]:
    """The host candidates of each media section, in order."""
    sections = sdp.split("\r\nm=")[1:]
    return [
        [(m.group(2), int(m.group(3))) for m in CANDIDATE.finditer(section.replace("\r\n", "\n"))]
        for section in sections
    ]


def rewrite_candidates(sdp: str, mapping: dict[Address, Address]) -> str:
    """``sdp`` with each host candidate's address replaced as ``mapping`` says."""

    def replace(match: re.Match[str]) -> str:
        host, port = mapping[(match.group(2), int(match.group(3)))]
        return f"{match.group(1)}{host} {port}{match.group(4)}"

    lines = sdp.split("\r\n")
    return "\r\n".join(CANDIDATE.sub(replace, line) for line in lines)


@dataclass
class LossyLink:
    """Every proxy between one offerer and one answerer; ``loss``/``delay`` set them all."""

    seed: int
    delay: float = 0.0
    proxies: list[LossyProxy] = field(default_factory=list)
    _by_offerer: dict[Address, LossyProxy] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return self.proxies[0].loss if self.proxies else 0.0

    @loss.setter
    def loss(self, fraction: float) -> None:
        for proxy in self.proxies:
            proxy.loss = fraction

    def drop_to_answerer(self, drop: Callable[[bytes], bool] | None) -> None:
        """Drop the offerer's datagrams that ``drop`` picks (on every proxy)."""
        for proxy in self.proxies:
            proxy.to_answerer.drop = drop

    def dropped(self) -> int:
        return sum(p.to_answerer.dropped + p.to_offerer.dropped for p in self.proxies)

    def forwarded(self) -> int:
        return sum(p.to_answerer.forwarded + p.to_offerer.forwarded for p in self.proxies)

    def rate_to_answerer(self, bps: float | None, queue_s: float = 0.5) -> None:
        """Put a bottleneck of ``bps`` on the way to the answerer (None: none)."""
        for proxy in self.proxies:
            proxy.to_answerer.rate_bps, proxy.to_answerer.queue_s = bps, queue_s

    def set_blackhole(self, on: bool) -> None:
        """Drop every datagram both ways (the path gone), or stop doing so."""
        for proxy in self.proxies:
            proxy.blackhole = on

    async def route_offer(self, offer_sdp: str) -> str:
        """The offer with the offerer's host candidates replaced by new proxies' ``b`` sockets."""
        self._by_offerer = {}
        for section in host_candidates(offer_sdp):
            for address in section:
                if address not in self._by_offerer:
                    proxy = LossyProxy(address, seed=self.seed + 2 * len(self.proxies))
                    proxy.delay = self.delay
                    await proxy.start()
                    self._by_offerer[address] = proxy
                    self.proxies.append(proxy)
        return rewrite_candidates(offer_sdp, {a: p.b for a, p in self._by_offerer.items()})

    def route_answer(self, offer_sdp: str, answer_sdp: str) -> str:
        """The answer with the answerer's host candidates replaced by the proxies' ``a``."""
        to_answerer: dict[Address, Address] = {}
        for offered, answered in zip(
            host_candidates(offer_sdp), host_candidates(answer_sdp), strict=True
        ):
            for offerer_address, answerer_address in zip(offered, answered, strict=True):
                proxy = self._by_offerer[offerer_address]
                proxy.answerer = answerer_address
                to_answerer[answerer_address] = proxy.a
        return rewrite_candidates(answer_sdp, to_answerer)

    async def negotiate(self, offerer: RTCPeerConnection, answerer: RTCPeerConnection) -> None:
        """Offer/answer between the two, with every host candidate routed through a proxy."""
        await offerer.setLocalDescription(await offerer.createOffer())
        offer = offerer.localDescription
        offer_sdp = await self.route_offer(offer.sdp)
        await answerer.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        await answerer.setLocalDescription(await answerer.createAnswer())
        answer_sdp = self.route_answer(offer.sdp, answerer.localDescription.sdp)
        await offerer.setRemoteDescription(RTCSessionDescription(answer_sdp, "answer"))

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()
