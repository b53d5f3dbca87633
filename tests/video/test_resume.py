"""Resuming a seat after the signalling connection drops, and what a newcomer is told.

Through the video service with the wire messages (``tests/video/test_service.py``'s
``Client``); no media here: ``tests/web/test_video_resume.py`` runs the real WebSocket
routes with aiortc media.
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from services.video.bandwidth import LinkState, RemoteStream, WanPolicy
from services.video.rooms import Participant, Presence, Role
from services.video.service import VideoService, _Subscription
from services.video.signalling import (
    ErrorCode,
    Resume,
    SignallingError,
    encode_participant,
    encode_reconnecting,
    parse_message,
)
from tests.video.peers import loopback_pc, wait_for
from tests.video.test_service import VISIT, Client, video_service


def _resume(client: Client) -> dict[str, object]:
    """The ``visit``, ``participant`` and ``resume`` token ``client`` last joined with."""
    seat = [m for m in client.received if m["type"] in ("joined", "resumed")][-1]
    return {"visit": VISIT, "participant": seat["participant"], "token": seat["resume"]}


def test_resume_parses_and_its_token_stays_out_of_reprs() -> None:
    raw = orjson.dumps({"type": "resume", "visit": "v1", "participant": "a1", "token": "s3cr3t"})
    message = parse_message(raw)
    assert message == Resume("v1", "a1", "s3cr3t")
    assert "s3cr3t" not in repr(message)
    for bad in (
        {"type": "resume", "visit": "v1", "participant": "a1"},
        {"type": "resume", "visit": "v1", "participant": "a 1", "token": "t"},
        {"type": "resume", "visit": "v1", "participant": "a1", "token": "t", "role": "nurse"},
    ):
        with pytest.raises(SignallingError) as refused:
            parse_message(orjson.dumps(bad))
        assert refused.value.code is ErrorCode.INVALID_FIELD


def test_a_participants_state_and_a_dropped_connection_encode_as_documented() -> None:
    noon = datetime(2026, 11, 27, 12, tzinfo=UTC)
    participant = Participant("b2", Role.PROVIDER, Presence.ADMITTED, joined_at=noon)
    assert orjson.loads(encode_participant(participant, True)) == {
        "type": "participant",
        "participant": "b2",
        "role": "provider",
        "presence": "admitted",
        "muted": [],
        "reconnecting": True,
    }
    assert orjson.loads(encode_reconnecting("b2", False)) == {
        "type": "reconnecting",
        "participant": "b2",
        "reconnecting": False,
    }


async def test_a_dropped_connection_keeps_the_seat_and_its_token_resumes_it_unadmitted() -> None:
    async with video_service() as (service, client):
        nurse, provider = client("nurse"), client("provider")
        await nurse.join("nurse")
        joined = await provider.join("provider")
        assert len(str(joined["resume"])) >= 43  # 256 random bits
        await nurse.send(type="admit", participant=provider.id)
        provider_id, seat = provider.id, _resume(provider)

        await provider.session.async_disconnected()
        nurse.last("reconnecting", participant=provider_id, reconnecting=True)
        assert not provider.session.joined
        assert service.rooms.get(VISIT).participant(provider_id).presence is Presence.ADMITTED

        again = client("provider again")
        await again.send(type="resume", **seat)
        resumed = again.last("resumed", participant=provider_id, presence="admitted")
        assert resumed["resume"] != seat["token"]  # a fresh token, for the next drop
        again.last("participant", participant=nurse.id, role="nurse", reconnecting=False)
        nurse.last("reconnecting", participant=provider_id, reconnecting=False)
        assert again.session.participant_id == provider_id
        assert all(m["type"] != "left" for m in nurse.received)
        assert again.errors() == []

        # The resumed connection speaks for the seat, e.g. to leave.
        await again.send(type="leave")
        nurse.last("left", participant=provider_id)


async def test_a_token_used_twice_for_another_seat_or_by_another_credential_is_refused() -> None:
    async with video_service() as (service, client):
        nurse, provider = client("nurse"), client("provider")
        await nurse.join("nurse")
        await provider.join("provider")
        seat = _resume(provider)
        await provider.session.async_disconnected()

        # Another credential (the transport's principal) with the right token.
        foreign = client("foreign")
        foreign.session = service.session(foreign._deliver, "user:someone-else")
        await foreign.send(type="resume", **seat)
        assert foreign.last("error")["code"] == "resume_refused"
        assert "another credential" in foreign.last("error")["message"]
        # Someone else's seat, with this token.
        thief = client("thief")
        await thief.send(type="resume", **(seat | {"participant": nurse.id}))
        assert thief.last("error", code="resume_refused")["message"] == "not that seat's token"

        first, second = client("first"), client("second")
        await first.send(type="resume", **seat)
        first.last("resumed")
        await second.send(type="resume", **seat)  # the same token again
        assert second.last("error", code="resume_refused")["message"] == (
            "that resume token was used already"
        )
        assert not second.session.joined
        assert first.session.joined
        # The refusals moved nobody: the seat is still the first connection's.
        await nurse.send(type="admit", participant=first.id)
        first.last("admitted", participant=first.id)
        assert nurse.session.joined
        assert not thief.session.joined


async def test_a_resume_takes_the_seat_from_a_connection_the_box_still_thinks_open() -> None:
    async with video_service() as (_service, client):
        nurse, provider = client("nurse"), client("provider")
        await nurse.join("nurse")
        await provider.join("provider")
        again = client("provider again")
        await again.send(type="resume", **_resume(provider))  # no drop noticed yet
        again.last("resumed")
        assert not provider.session.joined
        await provider.send(type="leave")  # the old connection speaks for nobody now
        assert all(m["type"] != "left" for m in nurse.received)
        await provider.session.async_disconnected()  # and its close changes nothing
        assert all(m["type"] != "reconnecting" for m in nurse.received)


async def test_after_the_grace_period_the_seat_leaves_and_a_late_token_is_refused() -> None:
    async with video_service(VideoService(resume_grace_s=0.3)) as (service, client):
        nurse, provider = client("nurse"), client("provider")
        await nurse.join("nurse")
        await provider.join("provider")
        provider_id, seat = provider.id, _resume(provider)
        await provider.session.async_disconnected()
        nurse.last("reconnecting", participant=provider_id, reconnecting=True)
        await wait_for(
            lambda: any(m["type"] == "left" for m in nurse.received), 5, "the seat given up"
        )
        nurse.last("left", participant=provider_id)
        late = client("late")
        await late.send(type="resume", **seat)
        assert late.last("error", code="resume_refused")["message"].startswith("that seat is gone")
        assert [p.id for p in service.rooms.get(VISIT)] == [nurse.id]


async def test_the_room_ending_while_a_seat_waits_leaves_nothing_behind() -> None:
    async with video_service() as (service, client):
        nurse, provider = client("nurse"), client("provider")
        await nurse.join("nurse")
        await provider.join("provider")
        seat = _resume(provider)
        await provider.session.async_disconnected()
        await nurse.send(type="end")
        late = client("late")
        await late.send(type="resume", **seat)
        late.last("error", code="resume_refused")
        assert service.connections(VISIT) == 0


async def test_a_late_joiner_sees_mutes_dropped_connections_and_paused_video() -> None:
    async with video_service() as (service, client):
        nurse, patient, provider = client("nurse"), client("patient"), client("provider")
        await nurse.join("nurse")
        await patient.join("patient")
        await provider.join("provider")
        await nurse.send(type="admit", participant=patient.id)
        await nurse.send(type="mute", participant=patient.id, kind="audio", muted=True)
        await patient.send(type="mute", participant=patient.id, kind="video", muted=True)
        provider_id = provider.id
        await provider.session.async_disconnected()

        late = client("late nurse")
        await late.join("nurse")
        late.last("participant", participant=patient.id, muted=["audio", "video"])
        late.last("participant", participant=provider_id, presence="waiting", reconnecting=True)
        late.last("participant", participant=nurse.id, muted=[], reconnecting=False)
        assert late.errors() == []

        # Video the WAN leg paused is told too (a paused remote stream on the box).
        # (a stand-in subscribe connection on the box, no media: only its state is read).
        subscriptions = service._media[VISIT].subscriptions
        remote = RemoteStream(WanPolicy(), 0.0)
        remote.state = LinkState.PAUSED
        key = (patient.id, provider_id)
        subscriptions[key] = _Subscription("x-1", loopback_pc(), frozenset(), remote)
        later = client("later nurse")
        await later.join("nurse")
        later.last("video_paused", publisher=patient.id, viewer=provider_id, paused=True)
        await subscriptions.pop(key).pc.close()
