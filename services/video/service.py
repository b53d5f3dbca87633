"""The video service: rooms, the box's peer connections and the forwarding relays, glued.

Transport-independent: the web layer opens one :class:`Session` per client connection with
a ``send(bytes)`` callback, and hands it every parsed client message
(``signalling.Inbound.receive``); the session answers through ``send`` only. See
docs/video.md ("The video service").

No SFU renegotiation. Each admitted participant has:

* one **publish** connection: the client offers its audio and video (``pc`` absent), the box
  answers; each received track feeds a :class:`ForwardingRelay` (one per kind);
* one **subscribe** connection per other admitted participant it is routed to
  (``Room.routes``): the box offers that publisher's relayed tracks (``pc`` =
  ``<publisher>-<n>``), the client answers.

A subscribe connection carries every kind its publisher publishes; muting a kind pauses that
viewer on the publisher's relay and unmuting resumes it (frames stop and start at once,
nothing is renegotiated, the other kind never stops). Leaving or ending closes the
connections; a connection that drops without a ``leave`` keeps its seat and media for
``resume_grace_s``, for a new connection presenting the seat's resume token (docs/video.md,
"Resuming after the signalling connection drops"). Every room has its own lock, so one
room's messages (or a slow ICE gathering) never wait on another's. Participants' ids and
the clock are parameters.

The WAN leg (``services/video/bandwidth.py`` decides): every subscribe connection carrying
video to a remote provider is a ``RemoteStream``; a watcher task reads the relays' counters
four times a second, caps each publisher at what its remote viewers can take (the relay
sends it as REMB), pauses a remote viewer's video below the threshold (telling the room
``video_paused``) and probes and restores it. A remote viewer's own ``b=AS`` / ``b=TIAS``
bounds what it gives the cap.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.sdp import candidate_from_sdp

from services.video import signalling
from services.video.bandwidth import (
    Change,
    LinkState,
    RemoteStream,
    WanPolicy,
    budget_share,
    publisher_cap,
    sdp_bandwidth,
)
from services.video.forwarding import ForwardingRelay, negotiated_codec, publisher_receiver
from services.video.rooms import (
    Event,
    MediaKind,
    Presence,
    Role,
    Room,
    RoomError,
    RoomErrorCode,
)
from services.video.rooms import Rooms as RoomRules
from services.video.signalling import (
    Admit,
    Candidate,
    ClientMessage,
    Description,
    End,
    ErrorCode,
    Join,
    Leave,
    Mute,
    Reconnect,
    Resume,
)
from services.video.transcode import TranscodeBudget
from services.video.turn import IceServer

logger = logging.getLogger(__name__)

Send = Callable[[bytes], None]

WAN_TICK_S = 0.25  # how often the WAN leg's counters are read and its decisions made
# Each reconnect gathers ICE for every new connection: a client may not ask more often.
RECONNECT_MIN_INTERVAL_S = 5.0
# A participant whose signalling connection drops without a ``leave`` keeps its seat (and
# its media connections) this long, for a new connection presenting its resume token.
RESUME_GRACE_S = 60.0
# Told to a viewer refused a transcoded copy (``ErrorCode.TRANSCODING_UNAVAILABLE``).
TRANSCODE_BUSY = (
    "your browser cannot play this video format and the box is already converting video "
    "for another participant; it will show here when that ends"
)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return secrets.token_hex(6)  # hex: a subscribe id "<publisher>-<n>" splits on "-"


def _new_token() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class CameraRefused(Exception):
    """An exam camera cannot be added to the visit (nobody there, full, unusable offer)."""


class _Refused(Exception):
    """A message this session may not send now; the code goes back in an ``error``."""

    def __init__(self, code: ErrorCode | RoomErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(slots=True)
class _Member:
    """One joined participant's connection and media on the box."""

    session: Session
    publish: RTCPeerConnection | None = None
    relays: dict[MediaKind, ForwardingRelay] = field(default_factory=dict)
    reconnected_at: float | None = None  # monotonic
    # Resuming the seat on a new connection: who the transport said the caller is (the
    # new connection must say the same), the current token's hash, the hashes of the
    # tokens already used (so a second use is told so), and, while the connection is
    # down, the task that gives the seat up when the grace period ends.
    principal: str | None = None
    resume_hash: bytes = b""
    used_hashes: list[bytes] = field(default_factory=list)
    expiry: asyncio.Task[None] | None = None

    @property
    def reconnecting(self) -> bool:
        """The member's signalling connection dropped; the seat waits for a resume."""
        return self.expiry is not None


@dataclass(slots=True)
class _Subscription:
    """The box's connection carrying one publisher's media to one viewer."""

    pc_id: str
    pc: RTCPeerConnection
    kinds: frozenset[MediaKind]  # forwarded now; the others negotiated are paused (muted)
    remote: RemoteStream | None = None  # video to a remote viewer: the WAN leg watches it
    negotiated: frozenset[MediaKind] = frozenset()  # every kind the publisher publishes
    video_sender: RTCRtpSender | None = None
    last_report: datetime | None = None  # the newest receiver report read from it
    ceiling: int | None = None  # a remote viewer's own b=AS / b=TIAS (bit/s), from its answer


@dataclass(slots=True)
class _RoomMedia:
    """The box's side of one room: members, subscribe connections, and the room's lock."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    members: dict[str, _Member] = field(default_factory=dict)
    subscriptions: dict[tuple[str, str], _Subscription] = field(default_factory=dict)
    generations: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


class VideoService:
    """The box's video rooms. ``async_close`` on shutdown closes every peer connection."""

    def __init__(
        self,
        rooms: RoomRules | None = None,
        *,
        ice_servers: Sequence[IceServer] = (),
        clock: Callable[[], datetime] = _utcnow,
        new_id: Callable[[], str] = _new_id,
        wan: WanPolicy | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        resume_grace_s: float = RESUME_GRACE_S,
        new_token: Callable[[], str] = _new_token,
        transcode_encoders: int = 1,
    ) -> None:
        self.rooms = rooms or RoomRules()
        # The box's cap on decode + re-encode copies (docs/video.md, "Codecs"): each costs
        # 13-63 % of a core, so every room's relays share this one budget.
        self.transcode_budget = TranscodeBudget(transcode_encoders)
        self.wan = wan or WanPolicy()
        self._monotonic = monotonic
        self._wan_task: asyncio.Task[None] | None = None
        # An explicit empty list: aiortc's default configuration asks a public STUN server.
        self._ice_servers = list(ice_servers)
        self._clock = clock
        self._new_id = new_id
        self._new_token = new_token
        self.resume_grace_s = resume_grace_s
        self._media: dict[str, _RoomMedia] = {}
        self._running: set[asyncio.Task[None]] = set()

    def session(self, send: Send, principal: str | None = None) -> Session:
        """A new client connection; ``send`` must not block (queue, then write).

        ``principal`` is who the transport authenticated (the web route's actor): a seat
        joined by one principal can be resumed only by a connection of the same one.
        """
        return Session(self, send, principal)

    def relays(self, visit_id: str, participant_id: str) -> Mapping[MediaKind, ForwardingRelay]:
        """The relays of a participant's published tracks (for figures and tests)."""
        member = self._media.get(visit_id, _RoomMedia()).members.get(participant_id)
        return dict(member.relays) if member else {}

    def connections(self, visit_id: str) -> int:
        """How many peer connections the box holds for a visit."""
        media = self._media.get(visit_id)
        if media is None:
            return 0
        publish = sum(m.publish is not None for m in media.members.values())
        return publish + len(media.subscriptions)

    def remote_stream(self, visit_id: str, publisher: str, viewer: str) -> RemoteStream | None:
        """The WAN leg's view of one publisher's video to one remote viewer (for tests)."""
        media = self._media.get(visit_id)
        subscription = media.subscriptions.get((publisher, viewer)) if media else None
        return subscription.remote if subscription else None

    def is_admitted(self, visit_id: str, principal: str) -> bool:
        """Whether a seat joined by ``principal`` (the transport's actor, as given to
        :meth:`session`) is admitted in the visit's room now: not waiting, not left, the
        visit not ended.

        A seat whose signalling connection dropped counts while it waits for a resume: it
        keeps its admission and its media (docs/video.md, "Resuming after the signalling
        connection drops").
        """
        media = self._media.get(visit_id)
        if media is None or visit_id not in self.rooms:
            return False
        admitted = {p.id for p in self.rooms.get(visit_id) if p.presence is Presence.ADMITTED}
        return any(
            member.principal == principal and participant_id in admitted
            for participant_id, member in media.members.items()
        )

    # -- exam cameras (services/video/camera_streams.py) ---------------------------------

    async def add_camera(self, visit_id: str, label: str, offer: str) -> tuple[str, str]:
        """Add an exam camera to a visit: a participant publishing ``offer``'s one video track.

        Returns the camera's participant id and the box's answer. The camera has no client
        connection: it sends no messages (so it cannot admit, mute or end), and it views
        nothing (``Room.routes``). ``CameraRefused`` when nobody is in the visit, the room is
        full, or the offer is not one usable video track.
        """
        kinds = [line.split(" ", 1)[0][2:] for line in offer.splitlines() if line.startswith("m=")]
        if kinds != ["video"]:
            raise CameraRefused("a camera publishes one video track and nothing else")
        try:
            signalling.validate_sdp(offer)
        except signalling.SignallingError as error:
            raise CameraRefused(f"the camera's offer: {error.detail}") from None
        result: list[tuple[str, str] | CameraRefused] = []
        await self._run(self._add_camera(visit_id, label, offer, result))
        if not result:
            raise CameraRefused("the camera could not be added")
        if isinstance(result[0], CameraRefused):
            raise result[0]
        return result[0]

    async def _add_camera(
        self, visit_id: str, label: str, offer: str, result: list[tuple[str, str] | CameraRefused]
    ) -> None:
        try:
            result.append(await self._camera_joins(visit_id, label, offer))
        except CameraRefused as refused:  # an answer for the caller, not a failure to log
            result.append(refused)

    async def _camera_joins(self, visit_id: str, label: str, offer: str) -> tuple[str, str]:
        media = self._media.get(visit_id)
        if media is None or not _people(self, visit_id, media):
            raise CameraRefused("nobody is in the visit")
        session = self.session(lambda _data: None)  # nobody reads a camera's messages
        async with media.lock:
            if self._media.get(visit_id) is not media:
                raise CameraRefused("the visit has ended")
            participant_id = self._new_id()
            try:
                room = self.rooms.get(visit_id)
                events = room.join(participant_id, Role.CAMERA, self._clock(), label)
            except RoomError as error:
                raise CameraRefused(str(error)) from None
            media.members[participant_id] = member = _Member(session)
            session.visit_id, session.participant_id = visit_id, participant_id
            _tell(media, events, skip=participant_id)
            try:
                await self._publish(media, participant_id, offer)
            except _Refused as refused:
                await self._leave(session, media, visit_id, participant_id)
                raise CameraRefused(refused.detail) from None
            assert member.publish is not None
            answer = member.publish.localDescription.sdp
            await self._reconcile(media, visit_id)
        logger.info("video: an exam camera joined a visit as %s", participant_id)
        return participant_id, answer

    async def remove_camera(self, visit_id: str, participant_id: str) -> None:
        """Take an exam camera out of a visit (the room is told ``left``); no-op if gone."""
        await self._run(self._remove_camera(visit_id, participant_id))

    async def _remove_camera(self, visit_id: str, participant_id: str) -> None:
        media = self._media.get(visit_id)
        if media is None:
            return
        async with media.lock:
            member = media.members.get(participant_id)
            if member is None or not _is_camera(self, visit_id, participant_id):
                return
            await self._leave(member.session, media, visit_id, participant_id)
        logger.info("video: exam camera %s left a visit", participant_id)

    def camera_in_visit(self, visit_id: str, participant_id: str) -> bool:
        """Whether the camera is still in the visit with someone to see it (not ended, not
        alone, not removed)."""
        media = self._media.get(visit_id)
        if media is None or participant_id not in media.members:
            return False
        return _is_camera(self, visit_id, participant_id) and bool(_people(self, visit_id, media))

    async def async_close(self) -> None:
        """Close every room's connections (the rooms' rules stay as they are)."""
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        if self._wan_task is not None:
            self._wan_task.cancel()
            self._wan_task = None
        for visit_id in list(self._media):
            media = self._media.pop(visit_id)
            async with media.lock:
                await _close_all(media)

    # -- for Session ---------------------------------------------------------------------

    async def _run(self, operation: Coroutine[Any, Any, None]) -> None:
        """Run one message's work to its end, even if the connection that sent it drops.

        A WebSocket handler is cancelled when its client goes; an ``end`` half done (some
        peer connections closed, the rest left open) must not be the result.
        """
        task = asyncio.ensure_future(operation)
        self._running.add(task)
        task.add_done_callback(self._finished)
        await asyncio.shield(task)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("video message failed (%s)", type(error).__name__)

    def _browser_ice(self, participant_id: str) -> list[dict[str, Any]]:
        """The ICE servers for one participant's browser (its own TURN credential when the
        site shares a secret with its TURN server; services/video/turn.py)."""
        return [server.for_browser(participant_id) for server in self._ice_servers]

    def _new_pc(self) -> RTCPeerConnection:
        return RTCPeerConnection(
            RTCConfiguration(iceServers=[server.for_box() for server in self._ice_servers])
        )

    async def _join(self, session: Session, message: Join) -> None:
        media = self._media.setdefault(message.visit, _RoomMedia())
        async with media.lock:
            if self._media.get(message.visit) is not media:
                # The last member left while this join waited for the lock (its leave
                # awaits connections closing): this room's media is dropped; start afresh.
                await self._join(session, message)
                return
            if session.principal is not None:
                await self._replace_seats_of(session.principal, media, message.visit)
            participant_id = self._new_id()
            try:
                events = self.rooms.join(message.visit, participant_id, message.role, self._clock())
            except RoomError:
                if not media.members:
                    self._media.pop(message.visit, None)
                raise
            token = self._new_token()
            member = _Member(session, principal=session.principal, resume_hash=_token_hash(token))
            media.members[participant_id] = member
            session.visit_id, session.participant_id = message.visit, participant_id
            room = self.rooms.get(message.visit)
            joined = signalling.encode_joined(
                room.participant(participant_id), self._browser_ice(participant_id), token
            )
            session.send(joined)
            _send_room_state(media, room, session)
            _tell(media, events, skip=participant_id)

    async def _replace_seats_of(self, principal: str, media: _RoomMedia, visit_id: str) -> None:
        """A join by a credential that holds a seat in the visit already (another window or
        device, a page reloaded without its resume token): the earlier seat is told
        ``joined_elsewhere`` and leaves, so one credential holds one seat and cannot fill the
        room. The new seat is a new join (a provider waits to be admitted again). The caller
        holds the room's lock."""
        for participant_id, member in list(media.members.items()):
            if member.principal != principal:
                continue
            if member.expiry is not None:
                member.expiry.cancel()
                member.expiry = None
            member.session.send(
                signalling.encode_error(
                    ErrorCode.JOINED_ELSEWHERE,
                    "the visit was joined again with the same sign-in or link, from another "
                    "window or device: this one has left",
                )
            )
            await self._leave(member.session, media, visit_id, participant_id)
            logger.info("video: a participant joined again; its earlier seat left")
        if self._media.get(visit_id) is not media:
            # It was the room's only seat: leaving dropped the room's media. The join goes on
            # in this one (no await since the drop: nothing else saw the room missing).
            self._media[visit_id] = media

    async def _resume(self, session: Session, message: Resume) -> None:
        """Seat a new connection in the place of one that dropped (docs/video.md, "Resuming
        after the signalling connection drops"): no admission; a fresh token."""
        gone = _Refused(
            ErrorCode.RESUME_REFUSED,
            "that seat is gone (left, ended, or no connection for too long): join again",
        )
        media = self._media.get(message.visit)
        if media is None or message.participant not in media.members:
            raise gone
        async with media.lock:
            member = media.members.get(message.participant)
            if self._media.get(message.visit) is not media or member is None:
                raise gone
            if member.principal != session.principal:
                raise _Refused(
                    ErrorCode.RESUME_REFUSED, "that seat was joined with another credential"
                )
            presented = _token_hash(message.token)
            if not hmac.compare_digest(presented, member.resume_hash):
                used = any(hmac.compare_digest(presented, old) for old in member.used_hashes)
                detail = "that resume token was used already" if used else "not that seat's token"
                raise _Refused(ErrorCode.RESUME_REFUSED, detail)
            token = self._new_token()
            member.used_hashes = [*member.used_hashes[-15:], member.resume_hash]
            member.resume_hash = _token_hash(token)
            was_reconnecting = member.reconnecting
            if member.expiry is not None:
                member.expiry.cancel()
                member.expiry = None
            # A connection the box still thinks open (a half-open TCP after a NAT rebinding)
            # loses the seat: only the newest holder of the token speaks for it.
            member.session.forget()
            member.session = session
            participant_id = message.participant
            session.visit_id, session.participant_id = message.visit, participant_id
            room = self.rooms.get(message.visit)
            ice = self._browser_ice(participant_id)
            me = room.participant(participant_id)
            session.send(signalling.encode_joined(me, ice, token, resumed=True))
            _send_room_state(media, room, session)
            # The box's offers made while the connection was down went nowhere: again, on
            # the same connections (still waiting for their answers).
            for (_publisher, viewer), subscription in media.subscriptions.items():
                pc = subscription.pc
                if viewer == participant_id and pc.remoteDescription is None:
                    offer = Description("offer", pc.localDescription.sdp, subscription.pc_id)
                    session.send(signalling.encode_description(offer))
            if was_reconnecting:
                back = signalling.encode_reconnecting(participant_id, False)
                for other_id, other in media.members.items():
                    if other_id != participant_id:
                        other.session.send(back)
        logger.info("video: a participant resumed its seat on a new connection")

    async def _disconnected(self, session: Session) -> None:
        """The connection dropped without a ``leave``: keep the seat and its media for the
        grace period, then leave."""
        visit_id, participant_id = session.visit_id, session.participant_id
        media = self._media.get(visit_id) if visit_id is not None else None
        if media is None or visit_id is None or participant_id is None:
            session.forget()
            return
        async with media.lock:
            member = media.members.get(participant_id)
            if member is None or member.session is not session:
                return  # left, ended or resumed on another connection meanwhile
            if self.resume_grace_s <= 0:
                await self._leave(session, media, visit_id, participant_id)
                return
            session.forget()
            # Nobody reads it: what the room tells the seat meanwhile is dropped, and the
            # offers among it are sent again on resume.
            member.session = Session(self, _discard, member.principal)
            member.session.visit_id, member.session.participant_id = visit_id, participant_id
            member.expiry = asyncio.ensure_future(
                self._expire(media, visit_id, participant_id, member)
            )
            _tell_raw(media, signalling.encode_reconnecting(participant_id, True))
        logger.info(
            "video: a participant's signalling connection dropped; seat kept %g s",
            self.resume_grace_s,
        )

    async def _expire(
        self, media: _RoomMedia, visit_id: str, participant_id: str, member: _Member
    ) -> None:
        await asyncio.sleep(self.resume_grace_s)
        await self._run(self._give_up(media, visit_id, participant_id, member))

    async def _give_up(
        self, media: _RoomMedia, visit_id: str, participant_id: str, member: _Member
    ) -> None:
        async with media.lock:
            current = media.members.get(participant_id)
            if self._media.get(visit_id) is not media or current is not member:
                return
            if not member.reconnecting:
                return  # resumed meanwhile
            member.expiry = None
            await self._leave(member.session, media, visit_id, participant_id)
        logger.info("video: a seat given up after %g s without a connection", self.resume_grace_s)

    async def _in_room(self, session: Session, message: ClientMessage) -> None:
        visit_id, participant_id = session.visit_id, session.participant_id
        if visit_id is None or participant_id is None:
            raise _Refused(RoomErrorCode.NOT_ALLOWED, "join a visit first")
        media = self._media.get(visit_id)
        if media is None:  # the service closed (shutting down)
            session.forget()
            raise _Refused(RoomErrorCode.ROOM_ENDED, "the video service has stopped")
        async with media.lock:
            if session.participant_id is None:  # the room ended while this waited
                raise _Refused(RoomErrorCode.ROOM_ENDED, "the visit has ended")
            room = self.rooms.get(visit_id)
            match message:
                case Admit(target):
                    _tell(media, room.admit(participant_id, target))
                case Mute(target, kind, muted):
                    _tell(media, room.set_muted(participant_id, target, kind, muted))
                case End():
                    events = self.rooms.end(visit_id, participant_id)
                    _tell(media, events)
                    await _close_all(media)
                    for member in media.members.values():
                        member.session.forget()
                    media.members.clear()
                    self._media.pop(visit_id, None)
                    return
                case Leave():
                    await self._leave(session, media, visit_id, participant_id)
                    return
                case Reconnect():
                    # Only this participant's subscribe connections; ``_reconcile`` below
                    # offers new ones (a new ``n`` each).
                    member = media.members[participant_id]
                    now = self._monotonic()
                    last = member.reconnected_at
                    if last is not None and now - last < RECONNECT_MIN_INTERVAL_S:
                        raise _Refused(ErrorCode.RATE_LIMITED, "reconnect at most every 5 s")
                    member.reconnected_at = now
                    for key in [k for k in media.subscriptions if k[1] == participant_id]:
                        publisher = media.members.get(key[0])
                        await _close_subscription(media, key, publisher.relays if publisher else {})
                    logger.info("video: a participant's subscribe connections rebuilt")
                case Description(kind="offer", pc=None):
                    if room.participant(participant_id).presence is not Presence.ADMITTED:
                        raise _Refused(RoomErrorCode.NOT_ALLOWED, "wait to be admitted")
                    await self._publish(media, participant_id, message.sdp)
                case Description(kind="answer", pc=str(pc_id)):
                    subscription = _subscription(media, participant_id, pc_id)
                    await _remote_description(subscription.pc, message.sdp, "answer")
                    if self._is_remote(media, participant_id):
                        _take_ceiling(subscription, message.sdp)
                case Description():
                    raise _Refused(ErrorCode.INVALID_FIELD, "offer on publish, answer on pc")
                case Candidate():
                    await _add_candidate(_pc_of(media, participant_id, message.pc), message)
                case Join() | Resume():
                    raise _Refused(RoomErrorCode.ALREADY_JOINED, "this connection has joined")
            await self._reconcile(media, visit_id)

    async def _leave(
        self, session: Session, media: _RoomMedia, visit_id: str, participant_id: str
    ) -> None:
        """Leave (caller holds the lock): tell everyone, close this member's connections."""
        events = self.rooms.leave(visit_id, participant_id)
        _tell(media, events)
        member = media.members.pop(participant_id)
        session.forget()
        for key in [k for k in media.subscriptions if participant_id in k]:
            # As a viewer, its copy leaves the publisher's relays (which frees a shared
            # transcoding encoder it was the last viewer of).
            publisher = member if key[0] == participant_id else media.members.get(key[0])
            await _close_subscription(media, key, publisher.relays if publisher else {})
        for relay in member.relays.values():
            relay.stop()
        if member.publish is not None:
            await member.publish.close()
        if not media.members:
            self._media.pop(visit_id, None)
        else:
            await self._reconcile(media, visit_id)

    async def _publish(self, media: _RoomMedia, participant_id: str, sdp: str) -> None:
        kinds = [line.split(" ", 1)[0][2:] for line in sdp.splitlines() if line.startswith("m=")]
        if kinds.count("audio") > 1 or kinds.count("video") > 1:
            raise _Refused(ErrorCode.INVALID_SDP, "publish at most one audio and one video track")
        member = media.members[participant_id]
        media_kinds = sorted(k for k in kinds if k in ("audio", "video"))
        if member.relays and media_kinds == sorted(member.relays):
            # Published again with the same kinds (reconnected after a network flap): the
            # relays and every viewer's connection stay; the relays take the new stream.
            await self._republish(media, participant_id, sdp)
            return
        if member.publish is not None or member.relays:  # other media: start over
            for key in [k for k in media.subscriptions if k[0] == participant_id]:
                await _close_subscription(media, key, member.relays)
            for relay in member.relays.values():
                relay.stop()
            member.relays.clear()
            old, member.publish = member.publish, None
            if old is not None:
                await old.close()
        pc = self._new_pc()
        relays: dict[MediaKind, ForwardingRelay] = {}

        def on_remb(viewer: str, bps: int) -> None:
            subscription = media.subscriptions.get((participant_id, viewer))
            if subscription is not None and subscription.remote is not None:
                subscription.remote.remb(bps, self._monotonic())

        def on_transcode_refused(viewer: str) -> None:
            member = media.members.get(viewer)
            if member is not None:
                error = signalling.encode_error(ErrorCode.TRANSCODING_UNAVAILABLE, TRANSCODE_BUSY)
                member.session.send(error)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            kind = MediaKind(track.kind)
            if kind not in relays:  # the offer was checked: one track per kind
                relays[kind] = ForwardingRelay(
                    kind,
                    on_remb=on_remb,
                    name=participant_id,
                    transcode_budget=self.transcode_budget,
                    on_transcode_refused=on_transcode_refused,
                )
                relays[kind].attach(publisher_receiver(pc, track))

        await _answer_publish_offer(pc, sdp)
        _use_negotiated_codec(pc, relays)
        member.publish, member.relays = pc, relays
        answer = Description("answer", pc.localDescription.sdp)
        member.session.send(signalling.encode_description(answer))

    async def _republish(self, media: _RoomMedia, participant_id: str, sdp: str) -> None:
        member = media.members[participant_id]
        relays = member.relays
        old, member.publish = member.publish, None
        if old is not None:
            await old.close()
        pc = self._new_pc()
        attached: set[MediaKind] = set()

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            kind = MediaKind(track.kind)
            if kind in relays and kind not in attached:
                attached.add(kind)
                relays[kind].attach(publisher_receiver(pc, track))

        await _answer_publish_offer(pc, sdp)
        member.publish = pc
        if _use_negotiated_codec(pc, relays):
            # Its video codec changed: the viewers' legs negotiated the old one; new
            # connections are offered (``_reconcile``).
            for key in [k for k in media.subscriptions if k[0] == participant_id]:
                await _close_subscription(media, key, relays)
            logger.info("video: a publisher reconnected with another video codec")
        else:
            logger.info("video: a publisher reconnected; its viewers' connections kept")
        answer = Description("answer", pc.localDescription.sdp)
        member.session.send(signalling.encode_description(answer))

    async def _reconcile(self, media: _RoomMedia, visit_id: str) -> None:
        """Make the subscribe connections match the room's routes (caller holds the lock)."""
        room = self.rooms.get(visit_id)
        wanted: dict[tuple[str, str], set[MediaKind]] = {}
        for kind in MediaKind:
            for publisher, viewer in room.routes(kind):
                member = media.members.get(publisher)
                if member is not None and kind in member.relays and viewer in media.members:
                    wanted.setdefault((publisher, viewer), set()).add(kind)
        for key, subscription in list(media.subscriptions.items()):
            kinds = frozenset(wanted.get(key, ()))
            relays = media.members[key[0]].relays if key[0] in media.members else {}
            if kinds and kinds <= subscription.negotiated:
                # A mute pauses that kind on the relay and an unmute resumes it (from a
                # keyframe): no SDP, so the other kind never stops.
                for kind in subscription.kinds - kinds:
                    relays[kind].pause_viewer(key[1])
                for kind in kinds - subscription.kinds:
                    relays[kind].resume_viewer(key[1])
                added_video = MediaKind.VIDEO in kinds - subscription.kinds
                subscription.kinds = kinds
                if MediaKind.VIDEO not in kinds:
                    _stop_watching(media, key, subscription)
                elif added_video and self._is_remote(media, key[1]):
                    subscription.remote = RemoteStream(self.wan, self._monotonic())
                    subscription.remote.set_ceiling(subscription.ceiling)
                    self._watch_wan()
            else:
                await _close_subscription(media, key, relays)
        for (publisher, viewer), wanted_kinds in wanted.items():
            if (publisher, viewer) not in media.subscriptions:
                await self._subscribe(media, publisher, viewer, frozenset(wanted_kinds))

    async def _subscribe(
        self, media: _RoomMedia, publisher: str, viewer: str, kinds: frozenset[MediaKind]
    ) -> None:
        pc = self._new_pc()
        pc_id = f"{publisher}-{next(media.generations)}"
        relays = media.members[publisher].relays
        # Every kind the publisher publishes is negotiated, the muted ones paused at once, so
        # that an unmute later needs no new connection.
        senders = {kind: relays[kind].add_viewer(pc, viewer) for kind in sorted(relays)}
        for kind in set(relays) - kinds:
            relays[kind].pause_viewer(viewer)
        subscription = _Subscription(pc_id, pc, kinds, negotiated=frozenset(relays))
        subscription.video_sender = senders.get(MediaKind.VIDEO)
        if MediaKind.VIDEO in kinds and self._is_remote(media, viewer):
            subscription.remote = RemoteStream(self.wan, self._monotonic())
            self._watch_wan()
        media.subscriptions[(publisher, viewer)] = subscription
        await pc.setLocalDescription(await pc.createOffer())
        offer = Description("offer", pc.localDescription.sdp, pc_id)
        media.members[viewer].session.send(signalling.encode_description(offer))

    # -- the WAN leg ----------------------------------------------------------------------

    def _is_remote(self, media: _RoomMedia, participant_id: str) -> bool:
        session = media.members[participant_id].session
        if session.visit_id is None:
            return False
        room = self.rooms.get(session.visit_id)
        return room.participant(participant_id).role is Role.PROVIDER

    def _watch_wan(self) -> None:
        if self._wan_task is None or self._wan_task.done():
            self._wan_task = asyncio.ensure_future(self._run_wan())

    async def _run_wan(self) -> None:
        while True:
            await asyncio.sleep(WAN_TICK_S)
            try:
                await self._read_reports()
                self.wan_tick()
            except Exception:  # one bad tick must not end the watcher for every room
                logger.exception("video WAN tick failed")

    async def _read_reports(self) -> None:
        """Hand each remote stream the loss and round trip of its viewer's newest report."""
        watched = [
            s
            for media in list(self._media.values())
            for s in list(media.subscriptions.values())
            if s.remote is not None and s.video_sender is not None
        ]
        for subscription in watched:
            assert subscription.video_sender is not None
            assert subscription.remote is not None
            try:
                stats = await subscription.video_sender.getStats()
            except Exception as exc:  # closed meanwhile
                logger.debug("video sender stats unavailable (%s)", type(exc).__name__)
                continue
            for report in stats.values():
                if report.type != "remote-inbound-rtp" or report.timestamp == (
                    subscription.last_report
                ):
                    continue
                subscription.last_report = report.timestamp
                # RTCP carries the fraction lost in 1/256ths (RFC 3550 6.4.1).
                subscription.remote.report(
                    report.fractionLost / 256, report.roundTripTime, self._monotonic()
                )

    def _wan_streams(self) -> tuple[list[tuple[_RoomMedia, str, str, RemoteStream]], int]:
        """Every remote video stream of the box (room, publisher, viewer, its state) and the
        number of remote audio streams."""
        streams: list[tuple[_RoomMedia, str, str, RemoteStream]] = []
        audio_streams = 0
        for media in self._media.values():
            for (publisher, viewer), subscription in media.subscriptions.items():
                member = media.members.get(publisher)
                if member is None:
                    continue
                if subscription.remote is not None:
                    streams.append((media, publisher, viewer, subscription.remote))
                if (
                    MediaKind.AUDIO in subscription.kinds
                    and viewer in media.members
                    and self._is_remote(media, viewer)
                ):
                    audio_streams += 1  # remote audio takes its allowance, video or not
        return streams, audio_streams

    def wan_tick(self) -> None:
        """Read the relays' counters, then pause, probe, restore and cap (no awaiting).

        The budget is the box's: every room's remote streams share it.
        """
        now = self._monotonic()
        streams, audio_streams = self._wan_streams()
        for media, publisher, viewer, remote in streams:
            relay = media.members[publisher].relays[MediaKind.VIDEO]
            viewer_stats = relay.stats.viewers.get(viewer)
            if viewer_stats is not None:
                remote.sent(viewer_stats.bytes_out, now)
            change = remote.step(now)
            if change in (Change.PAUSE, Change.PROBE_FAILED):
                relay.pause_viewer(viewer)
            elif change is Change.PROBE:
                relay.resume_viewer(viewer)
            if change is Change.PROBE_FAILED:
                logger.info("video probe to a remote viewer failed (%s)", remote.congestion)
            if change in (Change.PAUSE, Change.RESTORE):
                paused = change is Change.PAUSE
                logger.info(
                    "video to a remote viewer %s (estimate %s bit/s%s)",
                    "paused" if paused else "restored",
                    remote.estimate(now),
                    f"; {remote.congestion}" if paused else "",
                )
                _tell_raw(media, signalling.encode_video_paused(publisher, viewer, paused))
        carrying = [entry for entry in streams if entry[3].carries_video]
        share = budget_share(self.wan, len(carrying), audio_streams)
        for media in self._media.values():
            for publisher, member in media.members.items():
                video = member.relays.get(MediaKind.VIDEO)
                if video is None:
                    continue
                mine = [remote for m, p, _v, remote in carrying if m is media and p == publisher]
                # A probing stream's estimate is what the probe is finding out: it does not
                # hold the publisher back meanwhile (only the budget share and the viewer's
                # own b=AS do).
                estimates = [r.cap_estimate(now) for r in mine]
                cap = publisher_cap(share, estimates) if mine else None
                video.cap_publisher(cap)
                # A remote viewer's transcoded copy crosses the uplink instead of the
                # publisher's stream: its encoder is held to the same cap.
                remote_viewers = {v for m, p, v, _r in carrying if m is media and p == publisher}
                video.cap_transcoded(cap, remote_viewers)


class Session:
    """One client connection: it joins one visit, then sends messages about it."""

    def __init__(self, service: VideoService, send: Send, principal: str | None = None) -> None:
        self._service = service
        self._send = send
        self.principal = principal  # who the transport authenticated (resume binds to it)
        self.visit_id: str | None = None
        self.participant_id: str | None = None

    @property
    def joined(self) -> bool:
        """Whether this connection is in a room now."""
        return self.participant_id is not None

    def send(self, data: bytes) -> None:
        """Send one server message to this client; a failing transport is its own problem."""
        try:
            self._send(data)
        except Exception as exc:  # one dead client must not break the room's loop
            logger.warning("video send failed (%s)", type(exc).__name__)

    def forget(self) -> None:
        """The room is gone for this connection (left or ended)."""
        self.visit_id = self.participant_id = None

    async def handle(self, message: ClientMessage) -> None:
        """Act on one parsed message; refusals are answered with an ``error`` message.

        A ``Join`` is trusted: the transport checks the credential against it first.
        """
        await self._service._run(self._handle(message))

    async def _handle(self, message: ClientMessage) -> None:
        try:
            if isinstance(message, Join) and not self.joined:
                await self._service._join(self, message)
            elif isinstance(message, Resume) and not self.joined:
                await self._service._resume(self, message)
            else:
                await self._service._in_room(self, message)
        except RoomError as error:
            self.send(signalling.encode_error(error.code, str(error)))
        except _Refused as refused:
            self.send(signalling.encode_error(refused.code, refused.detail))

    async def async_close(self) -> None:
        """The connection is gone: leave the room if still in one."""
        if self.joined:
            await self.handle(Leave())

    async def async_disconnected(self) -> None:
        """The connection dropped without a ``leave``: the seat waits for a ``resume``
        (``VideoService.resume_grace_s``), then leaves; the room is told ``reconnecting``."""
        if self.joined:
            await self._service._run(self._service._disconnected(self))


def _is_camera(service: VideoService, visit_id: str, participant_id: str) -> bool:
    try:
        return service.rooms.get(visit_id).participant(participant_id).role is Role.CAMERA
    except (KeyError, RoomError):
        return False


def _people(service: VideoService, visit_id: str, media: _RoomMedia) -> list[str]:
    """The members of a room who are not cameras."""
    return [p for p in media.members if not _is_camera(service, visit_id, p)]


def _tell(media: _RoomMedia, events: Iterable[Event], skip: str | None = None) -> None:
    for event in events:
        data = signalling.encode_event(event)
        for participant_id, member in media.members.items():
            if participant_id != skip:
                member.session.send(data)


def _tell_raw(media: _RoomMedia, data: bytes) -> None:
    for member in media.members.values():
        member.session.send(data)


def _stop_watching(media: _RoomMedia, key: tuple[str, str], subscription: _Subscription) -> None:
    """The video to a viewer was muted: the WAN leg lets it be (and lifts a pause it told)."""
    if subscription.remote is not None and subscription.remote.state is not LinkState.VIDEO:
        _tell_raw(media, signalling.encode_video_paused(key[0], key[1], False))
    subscription.remote = None


def _take_ceiling(subscription: _Subscription, sdp: str) -> None:
    """A remote viewer's answer: its b=TIAS or b=AS for video, if any, bounds its cap."""
    bandwidth = sdp_bandwidth(sdp, "video")
    for reason in bandwidth.ignored:
        logger.info("video: a bandwidth line in a viewer's answer ignored (%s)", reason)
    subscription.ceiling = bandwidth.bps
    if subscription.remote is not None:
        subscription.remote.set_ceiling(bandwidth.bps)
    if bandwidth.bps is not None:
        logger.info("video: a remote viewer's answer limits it to %d bit/s", bandwidth.bps)


def _discard(_data: bytes) -> None:
    """Where a dropped connection's messages go until its seat is resumed."""


def _send_room_state(media: _RoomMedia, room: Room, session: Session) -> None:
    """Tell a newcomer (or a participant resuming) who else is in the room and in what
    state: presence, mutes, a dropped connection, and video the WAN leg paused."""
    for other in room:
        if other.id != session.participant_id:
            member = media.members.get(other.id)
            reconnecting = member is not None and member.reconnecting
            session.send(signalling.encode_participant(other, reconnecting))
    for (publisher, viewer), subscription in media.subscriptions.items():
        if subscription.remote is not None and subscription.remote.state is not LinkState.VIDEO:
            session.send(signalling.encode_video_paused(publisher, viewer, True))


def _pc_of(media: _RoomMedia, participant_id: str, pc_id: str | None) -> RTCPeerConnection:
    if pc_id is None:
        publish = media.members[participant_id].publish
        if publish is None:
            raise _Refused(ErrorCode.INVALID_FIELD, "no publish connection yet")
        return publish
    return _subscription(media, participant_id, pc_id).pc


def _subscription(media: _RoomMedia, viewer: str, pc_id: str) -> _Subscription:
    for (_publisher, subscriber), subscription in media.subscriptions.items():
        if subscriber == viewer and subscription.pc_id == pc_id:
            return subscription
    raise _Refused(ErrorCode.INVALID_FIELD, "no such connection (closed or replaced)")


async def _remote_description(pc: RTCPeerConnection, sdp: str, kind: str) -> None:
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
    except Exception as exc:  # a well-formed SDP aiortc still cannot use
        logger.info("remote %s refused by aiortc (%s)", kind, type(exc).__name__)
        raise _Refused(ErrorCode.INVALID_SDP, f"the {kind} cannot be used") from None


async def _answer_publish_offer(pc: RTCPeerConnection, sdp: str) -> None:
    """Apply a publisher's offer and make the answer; a connection that cannot is closed."""
    try:
        await _remote_description(pc, sdp, "offer")
        await pc.setLocalDescription(await pc.createAnswer())
    except _Refused:
        await pc.close()
        raise
    except Exception as exc:  # aiortc raises many types for SDP it cannot use
        await pc.close()
        logger.info("publish answer failed (%s)", type(exc).__name__)
        raise _Refused(ErrorCode.INVALID_SDP, "the offer cannot be answered") from None


def _use_negotiated_codec(
    pc: RTCPeerConnection, relays: Mapping[MediaKind, ForwardingRelay]
) -> bool:
    """Tell the video relay the codec the publisher's offer chose (VP8 or H.264); True if
    it changed. A codec the relay cannot forward was never in the box's answer."""
    relay = relays.get(MediaKind.VIDEO)
    codec = negotiated_codec(pc, "video") if relay is not None else None
    if relay is None or codec is None:
        return False
    return relay.set_codec(codec)


async def _add_candidate(pc: RTCPeerConnection, message: Candidate) -> None:
    if not message.candidate:
        await pc.addIceCandidate(None)
        return
    try:
        candidate = candidate_from_sdp(message.candidate.removeprefix("candidate:"))
        candidate.sdpMid, candidate.sdpMLineIndex = message.sdp_mid, message.sdp_mline_index
        await pc.addIceCandidate(candidate)
    except Exception as exc:  # checked already; aiortc may still refuse (e.g. no transport)
        logger.info("candidate refused by aiortc (%s)", type(exc).__name__)
        raise _Refused(ErrorCode.INVALID_CANDIDATE, "the candidate cannot be used") from None


async def _close_subscription(
    media: _RoomMedia, key: tuple[str, str], relays: Mapping[MediaKind, ForwardingRelay]
) -> None:
    subscription = media.subscriptions.pop(key)
    if subscription.remote is not None and subscription.remote.state is not LinkState.VIDEO:
        # The viewer was told its video paused; whatever replaces this connection starts
        # with video again.
        _tell_raw(media, signalling.encode_video_paused(key[0], key[1], False))
    for relay in relays.values():
        relay.remove_viewer(key[1])
    await subscription.pc.close()


async def _close_all(media: _RoomMedia) -> None:
    for member in media.members.values():
        if member.expiry is not None:  # a seat waiting for a resume: the room is closing
            member.expiry.cancel()
            member.expiry = None
    for key in list(media.subscriptions):
        publisher = media.members.get(key[0])
        await _close_subscription(media, key, publisher.relays if publisher else {})
    for member in media.members.values():
        for relay in member.relays.values():
            relay.stop()
        if member.publish is not None:
            await member.publish.close()
            member.publish = None
