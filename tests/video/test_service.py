"""The video service: rooms, publish and subscribe connections, real aiortc clients on loopback.

Each client speaks the documented wire messages (parsed by ``signalling``, as the WebSocket
route will), publishes numbered video and audio from an aiortc peer, and counts the frames
it decodes per publisher. No network for the rules-only tests; the others are ``slow``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiortc import AudioStreamTrack, MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from appliance.config import IceServerConfig
from appliance.errors import ConfigError
from services.video.rooms import MediaKind
from services.video.service import VideoService
from services.video.signalling import End, Inbound, Leave, SignallingError, encode_error
from services.video.turn import ice_servers
from tests.video.media import NumberedVideoTrack, read_frame_id
from tests.video.peers import loopback_pc, wait_for

VISIT, OTHER_VISIT = "enc-1", "enc-2"


class Client:
    """A participant as a browser would be one: wire messages in and out, aiortc media."""

    def __init__(self, service: VideoService, name: str) -> None:
        self.name = name
        self.session = service.session(self._deliver)
        self.inbound = Inbound()
        self.received: list[dict[str, Any]] = []
        self.publish_pc: RTCPeerConnection | None = None
        self.subscriptions: dict[str, RTCPeerConnection] = {}  # pc id → connection
        self.video = Counter[str]()  # publisher id → frames decoded
        self.video_times: dict[str, list[float]] = {}  # publisher id → when each was decoded
        self.audio = Counter[str]()
        self.unreadable = 0
        self._publish_offer = ""
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = [asyncio.create_task(self._pump())]

    @property
    def id(self) -> str:
        assert self.session.participant_id is not None
        return self.session.participant_id

    def _deliver(self, data: bytes) -> None:
        message = orjson.loads(data)
        self.received.append(message)
        self._queue.put_nowait(message)

    async def send_raw(self, raw: str | bytes) -> None:
        """What the WebSocket route does with a frame: parse, then handle or answer."""
        try:
            message = self.inbound.receive(raw, time.monotonic())
        except SignallingError as error:
            if error.reply:
                self._deliver(encode_error(error.code, error.detail))
            return
        await self.session.handle(message)

    async def send(self, **fields: object) -> None:
        await self.send_raw(orjson.dumps(fields))

    async def join(self, role: str, visit: str = VISIT) -> dict[str, Any]:
        await self.send(type="join", visit=visit, role=role, token="tok")
        return self.last("joined")

    async def publish(self, camera: MediaStreamTrack | None = None) -> None:
        pc = self.publish_pc = loopback_pc()
        pc.addTrack(camera or NumberedVideoTrack())
        pc.addTrack(AudioStreamTrack())
        await pc.setLocalDescription(await pc.createOffer())
        self._publish_offer = pc.localDescription.sdp
        await self.send(type="offer", sdp=await self.route_offer(self._publish_offer))

    def last(self, type_: str, **fields: object) -> dict[str, Any]:
        for message in reversed(self.received):
            if message["type"] == type_ and all(message.get(k) == v for k, v in fields.items()):
                return message
        raise AssertionError(f"{self.name}: no {type_} {fields} in {self.received}")

    def errors(self) -> list[str]:
        return [m["code"] for m in self.received if m["type"] == "error"]

    async def _pump(self) -> None:
        while True:
            message = await self._queue.get()
            if message["type"] == "offer":
                await self._answer(message["pc"], message["sdp"])
            elif message["type"] == "answer" and self.publish_pc is not None:
                answer = self.route_answer(self._publish_offer, message["sdp"])
                await self.publish_pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))

    async def _answer(self, pc_id: str, sdp: str) -> None:
        publisher = pc_id.split("-")[0]
        for old_id in [i for i in self.subscriptions if i.split("-")[0] == publisher]:
            await self.subscriptions.pop(old_id).close()  # replaced by the new one
        pc = self.subscriptions[pc_id] = loopback_pc()

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._tasks.append(asyncio.create_task(self._consume(track, publisher)))

        await pc.setRemoteDescription(RTCSessionDescription(await self.route_offer(sdp), "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        answer = self.route_answer(sdp, pc.localDescription.sdp)
        await self.send(type="answer", sdp=answer, pc=pc_id)

    async def route_offer(self, sdp: str) -> str:
        """An offer (the box's, or this client's publish one) as the path between them lets
        it through (here: as it is)."""
        return sdp

    def route_answer(self, offer: str, answer: str) -> str:
        """The answer to ``offer`` as the path lets it through (here: as it is)."""
        return answer

    async def _consume(self, track: MediaStreamTrack, publisher: str) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                if isinstance(frame, VideoFrame):
                    self.video[publisher] += 1
                    self.video_times.setdefault(publisher, []).append(time.monotonic())
                    self.unreadable += read_frame_id(frame) is None
                else:
                    self.audio[publisher] += 1

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        pcs = [*self.subscriptions.values(), *([self.publish_pc] if self.publish_pc else [])]
        await asyncio.gather(*(pc.close() for pc in pcs))


@contextlib.asynccontextmanager
async def video_service(
    service: VideoService | None = None,
) -> AsyncIterator[tuple[VideoService, Callable[..., Client]]]:
    service = service or VideoService()
    clients: list[Client] = []

    def client(name: str, kind: type[Client] = Client) -> Client:
        clients.append(kind(service, name))
        return clients[-1]

    try:
        yield service, client
    finally:
        await service.async_close()
        for each in clients:
            await each.close()


async def flowing(counter: Counter[str], key: str, more: int = 10, seconds: float = 15) -> None:
    start = counter[key]
    await wait_for(lambda: counter[key] >= start + more, seconds, f"{more} frames from {key}")


# -- the rules through the service (no media) --------------------------------------------------


async def test_the_room_hears_of_joins_and_admits_and_newcomers_learn_who_is_there() -> None:
    async with video_service() as (_service, client):
        nurse, patient, provider = client("nurse"), client("patient"), client("provider")
        assert (await nurse.join("nurse"))["presence"] == "admitted"
        assert (await patient.join("patient"))["presence"] == "waiting"
        nurse.last("participant", participant=patient.id, role="patient", presence="waiting")
        await provider.join("provider")
        provider.last("participant", participant=nurse.id, presence="admitted")
        provider.last("participant", participant=patient.id, presence="waiting")

        await nurse.send(type="admit", participant=provider.id)
        for each in (nurse, patient, provider):
            each.last("admitted", participant=provider.id, by=nurse.id)


async def test_a_join_while_the_last_member_is_leaving_gets_a_room_that_works() -> None:
    """The leave of a room's last member awaits its connections closing while it holds the
    room's lock; a join waiting for that lock then finds the room's media dropped. It must
    take a seat in a new room the service knows of, not in the dropped one (a ghost seat:
    refused at its next message, and never freed)."""
    async with video_service() as (service, client):
        leaver, joiner = client("leaver"), client("joiner")
        await leaver.join("nurse")
        await leaver.publish()
        await wait_for(lambda: service.connections(VISIT) == 1, 10, "the leaver's publish")
        [member] = service._media[VISIT].members.values()
        assert member.publish is not None
        close = member.publish.close

        async def slow_close() -> None:
            await asyncio.sleep(0.3)
            await close()

        member.publish.close = slow_close  # type: ignore[method-assign]
        leaving = asyncio.create_task(leaver.send(type="leave"))
        await asyncio.sleep(0.05)  # the leave holds the lock, awaiting the close
        await joiner.join("nurse")
        await leaving
        assert service.rooms.get(VISIT).participant(joiner.id).role == "nurse"
        assert list(service._media[VISIT].members) == [joiner.id]
        await joiner.publish()
        assert "not_allowed" not in joiner.errors(), joiner.errors()
        await wait_for(lambda: service.connections(VISIT) == 1, 10, "the joiner's publish")


async def test_waiting_or_unjoined_participants_cannot_publish_or_run_the_room() -> None:
    async with video_service() as (_service, client):
        stranger, nurse, patient = client("stranger"), client("nurse"), client("patient")
        await stranger.send(type="admit", participant="abc")
        assert stranger.errors() == ["not_allowed"]

        await nurse.join("nurse")
        await patient.join("patient")
        await patient.send(type="offer", sdp=_sdp_with_one_video())
        await patient.send(type="admit", participant=patient.id)
        await patient.send(type="end")
        await patient.send(type="join", visit=VISIT, role="patient", token="tok")
        assert patient.errors() == ["not_allowed", "not_allowed", "not_allowed", "already_joined"]
        await nurse.send(type="admit", participant=nurse.id)
        assert nurse.errors() == ["not_waiting"]


async def test_is_admitted_asks_for_an_admitted_seat_of_that_principal_in_that_visit() -> None:
    """What web/video.py asks before a remote provider's still or camera."""
    link, colleague = "provider-link:7", "provider-link:8"
    async with video_service() as (service, client):
        nurse, provider, other = client("nurse"), client("provider"), client("colleague")
        provider.session = service.session(provider._deliver, link)
        other.session = service.session(other._deliver, colleague)
        assert not service.is_admitted(VISIT, link)  # nobody in the visit
        await nurse.join("nurse")
        await provider.join("provider")
        await other.join("provider")
        assert not service.is_admitted(VISIT, link)  # in the waiting room
        await nurse.send(type="admit", participant=other.id)
        assert service.is_admitted(VISIT, colleague)
        assert not service.is_admitted(VISIT, link)  # another link's seat was admitted

        await nurse.send(type="admit", participant=provider.id)
        assert service.is_admitted(VISIT, link)
        assert not service.is_admitted(OTHER_VISIT, link)
        # A dropped connection keeps its seat, admitted, for a resume.
        await provider.session.async_disconnected()
        assert service.is_admitted(VISIT, link)
        await other.send(type="leave")
        assert not service.is_admitted(VISIT, colleague)
        await nurse.send(type="end")
        assert not service.is_admitted(VISIT, link)


async def test_one_credential_holds_one_seat_a_second_join_takes_it_over() -> None:
    """A join by a credential already in the visit (another window, a reload without its
    token): the earlier seat is told ``joined_elsewhere`` and leaves; the new one waits to be
    admitted. One visit link cannot fill the room and keep the nurse out."""
    link = "provider-link:7"
    async with video_service() as (service, client):
        nurse = client("nurse")
        nurse.session = service.session(nurse._deliver, "user:nurse-1")
        await nurse.join("nurse")
        windows = []
        for n in range(service.rooms.capacity + 2):  # more windows than the room has seats
            window = client(f"window-{n}")
            window.session = service.session(window._deliver, link)
            await window.join("provider")
            windows.append(window)
        *earlier, newest = windows
        for window in earlier:
            assert window.last("error")["code"] == "joined_elsewhere"
            assert window.last("left", participant=window.received[0]["participant"])
            assert not window.session.joined
        room = service.rooms.get(VISIT)
        assert sorted(p.id for p in room) == sorted([nurse.id, newest.id])
        assert room.participant(newest.id).presence == "waiting"
        assert "room_full" not in newest.errors()
        # Another credential is another seat; the nurse can still come in.
        colleague = client("colleague")
        colleague.session = service.session(colleague._deliver, "provider-link:8")
        await colleague.join("provider")
        second_nurse = client("nurse-2")
        second_nurse.session = service.session(second_nurse._deliver, "user:nurse-2")
        await second_nurse.join("nurse")
        assert len(service.rooms.get(VISIT)) == 4
        assert nurse.errors() == []
        assert second_nurse.errors() == []
        # A seat whose connection dropped (waiting for a resume) is taken over too.
        await nurse.send(type="admit", participant=newest.id)
        dropped = newest.id
        await newest.session.async_disconnected()
        again = client("again")
        again.session = service.session(again._deliver, link)
        await again.join("provider")
        assert dropped not in service._media[VISIT].members
        assert dropped not in {p.id for p in service.rooms.get(VISIT)}
        assert service.rooms.get(VISIT).participant(again.id).presence == "waiting"
        assert not service.is_admitted(VISIT, link)


async def test_the_only_seat_taken_over_leaves_a_room_that_works() -> None:
    """The earlier seat was the room's only one: its leave drops the room's media, and the
    new seat must land in media the service knows (no ghost seat)."""
    async with video_service() as (service, client):
        first, second = client("first"), client("second")
        for each in (first, second):
            each.session = service.session(each._deliver, "user:nurse-1")
        await first.join("nurse")
        await first.publish()
        await wait_for(lambda: service.connections(VISIT) == 1, 10, "the first window's publish")
        await second.join("nurse")
        assert first.last("error")["code"] == "joined_elsewhere"
        assert list(service._media[VISIT].members) == [second.id]
        assert service.connections(VISIT) == 0  # the first window's connection closed
        await second.publish()
        assert second.errors() == [], second.errors()
        await wait_for(lambda: service.connections(VISIT) == 1, 10, "the second window's publish")


async def test_leaving_tells_the_room_and_an_ended_visit_cannot_be_joined_again() -> None:
    async with video_service() as (service, client):
        nurse, patient = client("nurse"), client("patient")
        await nurse.join("nurse")
        await patient.join("patient")
        await patient.send(type="leave")
        nurse.last("left", participant=patient.last("joined")["participant"])
        assert not patient.session.joined

        await nurse.send(type="end")
        nurse.last("ended", by=nurse.last("joined")["participant"])
        late = client("late")
        await late.send(type="join", visit=VISIT, role="patient", token="tok")
        assert late.errors() == ["room_ended"]
        assert service.connections(VISIT) == 0


async def test_an_end_runs_to_completion_even_if_its_connection_drops_meanwhile() -> None:
    async with video_service() as (service, client):
        nurse, patient = client("nurse"), client("patient")
        await nurse.join("nurse")
        await patient.join("patient")
        handling = asyncio.create_task(nurse.session.handle(End()))
        await asyncio.sleep(0)
        handling.cancel()  # what the WebSocket route's task gets when the client goes
        with contextlib.suppress(asyncio.CancelledError):
            await handling
        await wait_for(lambda: service.rooms.get(VISIT).ended, 5, "the visit ended")
        patient.last("ended")


async def test_after_the_service_closes_a_message_is_told_the_visit_is_over() -> None:
    async with video_service() as (service, client):
        nurse = client("nurse")
        await nurse.join("nurse")
        await service.async_close()
        await nurse.send(type="leave")
        assert nurse.errors() == ["room_ended"]
        assert not nurse.session.joined


def _sdp_with_one_video() -> str:
    return "\r\n".join(
        [
            "v=0",
            "o=- 1 2 IN IP4 127.0.0.1",
            "s=-",
            "t=0 0",
            "m=video 9 UDP/TLS/RTP/SAVPF 96",
            "c=IN IP4 0.0.0.0",
            "a=fingerprint:sha-256 7B:8B",
            "a=mid:0",
            "",
        ]
    )


# -- media on loopback ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("loopback")
async def test_patient_and_provider_see_and_hear_each_other_after_the_nurse_admits_them() -> None:
    async with video_service() as (service, client):
        nurse, patient, provider = client("nurse"), client("patient"), client("provider")
        await nurse.join("nurse")
        await patient.join("patient")
        await provider.join("provider")
        for each in (patient, provider):
            await nurse.send(type="admit", participant=each.id)
            await each.publish()

        await flowing(provider.video, patient.id, 30)
        await flowing(patient.video, provider.id, 30)
        await flowing(nurse.video, patient.id, 10)
        await flowing(provider.audio, patient.id, 50)
        await flowing(patient.audio, provider.id, 50)
        assert patient.unreadable == provider.unreadable == 0
        # Two publish connections and four subscribe ones (the nurse publishes nothing).
        assert service.connections(VISIT) == 6
        assert nurse.errors() + patient.errors() + provider.errors() == []

        await provider.send(type="leave")
        patient.last("left", participant=provider.last("joined")["participant"])
        assert service.connections(VISIT) == 2  # the patient's publish, patient → nurse
        # The box closed its side (DTLS close_notify): the provider's end sees it closed.
        subscriptions = list(provider.subscriptions.values())
        assert len(subscriptions) == 1  # the patient's media; the nurse publishes nothing
        await wait_for(
            lambda: subscriptions[0].connectionState == "closed", 10, "the subscription closed"
        )


@pytest.mark.slow
@pytest.mark.usefixtures("loopback")
async def test_mute_stops_forwarding_that_kind_and_unmute_brings_it_back() -> None:
    async with video_service() as (service, client):
        nurse, patient, provider = client("nurse"), client("patient"), client("provider")
        await nurse.join("nurse")
        await patient.join("patient")
        await provider.join("provider")
        await nurse.send(type="admit", participant=patient.id)
        await nurse.send(type="admit", participant=provider.id)
        await patient.publish()
        await flowing(provider.video, patient.id, 20)
        video = service.relays(VISIT, patient.id)[MediaKind.VIDEO]

        await nurse.send(type="mute", participant=patient.id, kind="video", muted=True)
        provider.last("muted", participant=patient.id, kind="video", muted=True, by=nurse.id)
        await asyncio.sleep(0.3)  # frames already on the wire
        frames_out = video.stats.viewers[provider.id].frames_out
        decoded = provider.video[patient.id]
        await flowing(provider.audio, patient.id, 25)  # a second of audio still flows
        assert video.stats.viewers[provider.id].frames_out == frames_out
        assert provider.video[patient.id] <= decoded + 1
        assert video.stats.frames_in > 0  # the patient still sends; the box drops it

        await patient.send(type="mute", participant=patient.id, kind="video", muted=False)
        assert patient.errors() == ["not_allowed"]  # a nurse muted it: a nurse unmutes it
        connections = dict(provider.subscriptions)
        audio = provider.audio[patient.id]
        await nurse.send(type="mute", participant=patient.id, kind="video", muted=False)
        await flowing(provider.video, patient.id, 20)  # on the same subscribe connection
        assert provider.subscriptions == connections
        assert provider.audio[patient.id] > audio  # the audio never stopped meanwhile
        await patient.send(type="mute", participant=patient.id, kind="audio", muted=True)
        await patient.send(type="mute", participant=patient.id, kind="audio", muted=False)
        await flowing(provider.video, patient.id, 20)
        await flowing(provider.audio, patient.id, 25)
        assert provider.subscriptions == connections


@pytest.mark.slow
@pytest.mark.usefixtures("loopback")
async def test_bad_and_flooding_messages_in_one_room_leave_another_room_streaming() -> None:
    async with video_service() as (service, client):
        nurse, patient = client("nurse"), client("patient")
        await nurse.join("nurse")
        await patient.join("patient")
        await nurse.send(type="admit", participant=patient.id)
        await patient.publish()
        await flowing(nurse.video, patient.id, 20)

        bad_nurse, bad = client("bad-nurse"), client("bad")
        await bad_nurse.join("nurse", visit=OTHER_VISIT)
        await bad.join("patient", visit=OTHER_VISIT)
        await bad_nurse.send(type="admit", participant=bad.id)
        await bad.send_raw(b"{not json")
        await bad.send_raw(b'{"type": "offer", "sdp": "' + b"a" * 70_000 + b'"}')
        await bad.send(type="offer", sdp="v=0\r\nm=video 9 RTP/AVP 96\r\n")  # no DTLS
        await bad.send(type="offer", sdp=_sdp_with_one_video())  # well-formed, unusable
        await bad.send(type="candidate", candidate="candidate:1 1 udp 1 224.0.0.1 9 typ host")
        await bad.send(type="candidate", candidate="", pc="nope-1")
        await bad.send(type="answer", sdp=_sdp_with_one_video(), pc="nope-1")
        assert bad.errors() == [
            "malformed",
            "too_large",
            "invalid_sdp",
            "invalid_sdp",
            "invalid_candidate",
            "invalid_field",
            "invalid_field",
        ]
        assert service.connections(OTHER_VISIT) == 0
        for _ in range(300):  # a flood: one error reply, then the connection is to go
            await bad.send_raw(b"[]")
        assert bad.inbound.closing
        assert bad.errors().count("rate_limited") == 1

        await flowing(nurse.video, patient.id, 20)
        assert nurse.errors() + patient.errors() == []
        # The bad client's room still works for a good message.
        await bad.session.handle(Leave())  # what the route does as it drops the connection
        bad_nurse.last("left", participant=bad.last("joined")["participant"])

        nurse_id = nurse.id
        await nurse.send(type="end")
        patient.last("ended", by=nurse_id)
        assert service.connections(VISIT) == 0


async def test_the_sites_ice_servers_reach_the_box_and_every_browser(tmp_path: Path) -> None:
    secret = tmp_path / "turn-credential"
    secret.write_text("s3cret\n", encoding="utf-8")
    settings = [
        IceServerConfig(urls=("stun:stun.example.test:3478",)),
        IceServerConfig(
            urls=("turns:turn.example.test:5349",), username="clinic", credential_file=secret
        ),
    ]
    servers = ice_servers(settings)
    assert [(s.urls, s.username, s.credential) for s in servers] == [
        (("stun:stun.example.test:3478",), None, None),
        (("turns:turn.example.test:5349",), "clinic", "s3cret"),
    ]
    assert "s3cret" not in repr(servers)
    assert [(s.urls, s.username, s.credential) for s in (x.for_box() for x in servers)] == [
        (["stun:stun.example.test:3478"], None, None),
        (["turns:turn.example.test:5349"], "clinic", "s3cret"),
    ]
    # The box's own connections take the same list (RTCConfiguration(iceServers=...)).
    async with video_service(VideoService(ice_servers=servers)) as (_service, client):
        nurse = client("nurse")
        joined = await nurse.join("nurse")
        assert joined["iceServers"] == [
            {"urls": ["stun:stun.example.test:3478"]},
            {
                "urls": ["turns:turn.example.test:5349"],
                "username": "clinic",
                "credential": "s3cret",
            },
        ]


async def test_with_a_shared_secret_each_party_gets_its_own_expiring_turn_login(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "turn-secret"
    secret.write_bytes(b"shared-with-coturn\n")
    settings = [
        IceServerConfig(
            urls=("turns:turn.example.test:5349",), secret_file=secret, credential_ttl_s=3600
        )
    ]
    [server] = ice_servers(settings)
    assert b"shared-with-coturn" not in repr(server).encode()
    box = server.for_box()
    assert box.username is not None
    assert box.username.endswith(":box")
    before = int(time.time())
    async with video_service(VideoService(ice_servers=[server])) as (_service, client):
        nurse, patient = client("nurse"), client("patient")
        joined = [await nurse.join("nurse"), await patient.join("patient")]
    logins = []
    for message in joined:
        [ice] = message["iceServers"]
        expiry, _, who = ice["username"].partition(":")
        assert who == message["participant"]  # a random id, never a name
        assert before + 3600 <= int(expiry) <= int(time.time()) + 3600
        expected = base64.b64encode(
            hmac.new(b"shared-with-coturn", ice["username"].encode(), hashlib.sha1).digest()
        ).decode()
        assert ice["credential"] == expected
        logins.append((ice["username"], ice["credential"]))
    assert logins[0] != logins[1]


def test_an_unreadable_or_empty_turn_file_is_one_clear_config_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")
    settings = [
        IceServerConfig(urls=("turn:turn.example.test",), secret_file=tmp_path / "missing"),
        IceServerConfig(urls=("turn:turn.example.test",), username="u", credential_file=empty),
    ]
    with pytest.raises(ConfigError) as caught:
        ice_servers(settings)
    assert len(caught.value.problems) == 2
    assert "missing: cannot read" in caught.value.problems[0]
    assert "credential file is empty" in caught.value.problems[1]


async def test_reconnect_keeps_the_participant_in_the_room_and_is_not_a_flood() -> None:
    async with video_service() as (_service, client):
        stranger, nurse, provider = client("stranger"), client("nurse"), client("provider")
        await stranger.send(type="reconnect")
        assert stranger.errors() == ["not_allowed"]
        await nurse.join("nurse")
        await provider.join("provider")
        await nurse.send(type="admit", participant=provider.id)
        await provider.send(type="reconnect")
        await provider.send(type="reconnect")  # at once again: each costs ICE gathering
        assert provider.errors() == ["rate_limited"]
        assert provider.session.joined
        assert all(m["type"] != "left" for m in nurse.received)
