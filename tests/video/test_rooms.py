"""Visit rooms: waiting room, admission, muting, ending, and who sees whom."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.video.rooms import (
    ENDED_ROOMS_KEPT,
    Admitted,
    Ended,
    Joined,
    Left,
    MediaKind,
    MuteChanged,
    Presence,
    Role,
    Room,
    RoomError,
    RoomErrorCode,
    Rooms,
)

NOW = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
AUDIO, VIDEO = MediaKind.AUDIO, MediaKind.VIDEO


def visit() -> Room:
    """A nurse in, the patient and the provider admitted."""
    room = Room("visit-1")
    room.join("nurse", Role.NURSE, NOW)
    room.join("kiosk", Role.PATIENT, NOW)
    room.join("dr", Role.PROVIDER, NOW)
    room.admit("nurse", "kiosk")
    room.admit("nurse", "dr")
    return room


def refused(code: RoomErrorCode) -> pytest.RaisesExc[RoomError]:
    return pytest.raises(RoomError, match=f"^{code}: ")


def test_nurse_is_admitted_and_others_wait() -> None:
    room = Room("visit-1")
    assert room.join("kiosk", Role.PATIENT, NOW) == [
        Joined("kiosk", Role.PATIENT, Presence.WAITING)
    ]
    assert room.join("nurse", Role.NURSE, NOW) == [Joined("nurse", Role.NURSE, Presence.ADMITTED)]
    assert room.join("dr", Role.PROVIDER, NOW) == [Joined("dr", Role.PROVIDER, Presence.WAITING)]
    assert room.participant("kiosk").joined_at == NOW
    assert room.routes(VIDEO) == frozenset()


def test_nurse_admits_a_waiting_participant() -> None:
    room = Room("visit-1")
    room.join("nurse", Role.NURSE, NOW)
    room.join("kiosk", Role.PATIENT, NOW)
    assert room.admit("nurse", "kiosk") == [Admitted("kiosk", "nurse")]
    assert room.participant("kiosk").presence is Presence.ADMITTED
    assert room.routes(VIDEO) == {("nurse", "kiosk"), ("kiosk", "nurse")}


def test_only_an_admitted_nurse_admits_and_only_the_waiting() -> None:
    room = Room("visit-1")
    room.join("kiosk", Role.PATIENT, NOW)
    room.join("dr", Role.PROVIDER, NOW)
    with refused(RoomErrorCode.NOT_ALLOWED):
        room.admit("dr", "kiosk")
    with refused(RoomErrorCode.NOT_ALLOWED):
        room.admit("kiosk", "kiosk")
    room.join("nurse", Role.NURSE, NOW)
    room.admit("nurse", "kiosk")
    with refused(RoomErrorCode.NOT_WAITING):
        room.admit("nurse", "kiosk")
    with refused(RoomErrorCode.UNKNOWN_PARTICIPANT):
        room.admit("nurse", "ghost")
    with refused(RoomErrorCode.UNKNOWN_PARTICIPANT):
        room.admit("ghost", "dr")


def test_everyone_admitted_sees_everyone_else() -> None:
    room = visit()
    pairs = {(a, b) for a in ("nurse", "kiosk", "dr") for b in ("nurse", "kiosk", "dr") if a != b}
    assert room.routes(VIDEO) == pairs
    assert room.routes(AUDIO) == pairs


def test_nurse_mutes_anyone_and_muted_media_is_not_forwarded() -> None:
    room = visit()
    assert room.set_muted("nurse", "kiosk", AUDIO, True) == [
        MuteChanged("kiosk", AUDIO, True, "nurse")
    ]
    assert not any(publisher == "kiosk" for publisher, _ in room.routes(AUDIO))
    assert ("kiosk", "dr") in room.routes(VIDEO)
    assert ("dr", "kiosk") in room.routes(AUDIO)  # a muted participant still hears


def test_participant_cannot_unmute_what_a_nurse_muted() -> None:
    room = visit()
    room.set_muted("nurse", "dr", VIDEO, True)
    with refused(RoomErrorCode.NOT_ALLOWED):
        room.set_muted("dr", "dr", VIDEO, False)
    assert room.set_muted("nurse", "dr", VIDEO, False) == [MuteChanged("dr", VIDEO, False, "nurse")]
    assert room.participant("dr").muted == frozenset()


def test_self_mute_and_unmute() -> None:
    room = visit()
    assert room.set_muted("dr", "dr", AUDIO, True) == [MuteChanged("dr", AUDIO, True, "dr")]
    assert room.set_muted("dr", "dr", AUDIO, True) == []  # already muted: nothing to tell
    assert room.set_muted("dr", "dr", AUDIO, False) == [MuteChanged("dr", AUDIO, False, "dr")]


def test_a_self_muted_participant_unmuted_by_the_nurse_is_free_again() -> None:
    room = visit()
    room.set_muted("kiosk", "kiosk", VIDEO, True)
    room.set_muted("nurse", "kiosk", VIDEO, False)
    room.set_muted("kiosk", "kiosk", VIDEO, True)
    assert room.set_muted("kiosk", "kiosk", VIDEO, False) == [
        MuteChanged("kiosk", VIDEO, False, "kiosk")
    ]


def test_only_a_nurse_mutes_someone_else() -> None:
    room = visit()
    with refused(RoomErrorCode.NOT_ALLOWED):
        room.set_muted("dr", "kiosk", AUDIO, True)
    with refused(RoomErrorCode.NOT_ALLOWED):
        room.set_muted("kiosk", "nurse", VIDEO, True)


def test_waiting_participants_cannot_end_the_visit_but_can_mute_themselves() -> None:
    room = Room("visit-1")
    room.join("dr", Role.PROVIDER, NOW)
    room.join("kiosk", Role.PATIENT, NOW)
    with refused(RoomErrorCode.NOT_ALLOWED):
        room.end("dr")
    assert room.set_muted("kiosk", "kiosk", VIDEO, True) == [
        MuteChanged("kiosk", VIDEO, True, "kiosk")
    ]


def test_nurse_ends_the_visit_and_nobody_can_rejoin() -> None:
    room = visit()
    with refused(RoomErrorCode.NOT_ALLOWED):
        room.end("kiosk")
    assert room.end("nurse") == [Ended("nurse")]
    assert len(room) == 0
    assert room.routes(VIDEO) == frozenset()
    with refused(RoomErrorCode.ROOM_ENDED):
        room.join("kiosk", Role.PATIENT, NOW)
    with refused(RoomErrorCode.ROOM_ENDED):
        room.end("nurse")


def test_leaving_stops_the_routes_of_the_one_who_left() -> None:
    room = visit()
    assert room.leave("dr") == [Left("dr")]
    assert room.routes(VIDEO) == {("nurse", "kiosk"), ("kiosk", "nurse")}
    with refused(RoomErrorCode.UNKNOWN_PARTICIPANT):
        room.leave("dr")


def test_duplicate_join_and_capacity() -> None:
    room = Room("visit-1", capacity=2)
    room.join("nurse", Role.NURSE, NOW)
    with refused(RoomErrorCode.ALREADY_JOINED):
        room.join("nurse", Role.NURSE, NOW)
    room.join("kiosk", Role.PATIENT, NOW)
    with refused(RoomErrorCode.ROOM_FULL):
        room.join("dr", Role.PROVIDER, NOW)


def test_rooms_are_separate_and_bounded() -> None:
    rooms = Rooms(max_rooms=2)
    rooms.join("visit-a", "nurse", Role.NURSE, NOW)
    rooms.join("visit-b", "nurse", Role.NURSE, NOW)
    with refused(RoomErrorCode.TOO_MANY_ROOMS):
        rooms.join("visit-c", "nurse", Role.NURSE, NOW)
    rooms.join("visit-a", "kiosk", Role.PATIENT, NOW)
    assert len(rooms.get("visit-b")) == 1
    rooms.end("visit-a", "nurse")
    rooms.join("visit-c", "nurse", Role.NURSE, NOW)  # an ended room no longer counts
    with refused(RoomErrorCode.ROOM_ENDED):
        rooms.join("visit-a", "kiosk", Role.PATIENT, NOW)


def test_empty_open_room_is_forgotten_and_ended_rooms_are_bounded() -> None:
    rooms = Rooms(max_rooms=2)
    rooms.join("visit-a", "kiosk", Role.PATIENT, NOW)
    rooms.leave("visit-a", "kiosk")
    assert "visit-a" not in rooms
    for n in range(ENDED_ROOMS_KEPT + 3):
        rooms.join(f"visit-{n}", "nurse", Role.NURSE, NOW)
        rooms.end(f"visit-{n}", "nurse")
    assert len(rooms) == ENDED_ROOMS_KEPT
    assert "visit-0" not in rooms
    assert f"visit-{ENDED_ROOMS_KEPT + 2}" in rooms


people = st.sampled_from(["nurse", "nurse-2", "kiosk", "dr", "family"])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("join"), people, st.sampled_from(list(Role))),
        st.tuples(st.just("admit"), people, people),
        st.tuples(st.just("mute"), people, people, st.sampled_from(list(MediaKind)), st.booleans()),
        st.tuples(st.just("leave"), people),
        st.tuples(st.just("end"), people),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_any_sequence_keeps_the_rules(ops: list[tuple[Any, ...]]) -> None:
    room = Room("visit-1", capacity=4)
    refusals: list[RoomErrorCode] = []
    for op, *args in ops:
        try:
            if op == "join":
                room.join(args[0], args[1], NOW)
            elif op == "admit":
                room.admit(args[0], args[1])
            elif op == "mute":
                room.set_muted(*args)
            elif op == "leave":
                room.leave(args[0])
            else:
                room.end(args[0])
        except RoomError as exc:
            refusals.append(exc.code)
        admitted = {p.id for p in room if p.presence is Presence.ADMITTED}
        assert all(p.presence is Presence.ADMITTED for p in room if p.role is Role.NURSE)
        assert all(p.muted_by_nurse <= p.muted for p in room)
        assert len(room) <= room.capacity
        for kind in MediaKind:
            for publisher, viewer in room.routes(kind):
                assert publisher != viewer
                assert {publisher, viewer} <= admitted
                assert kind not in room.participant(publisher).muted
        if room.ended:
            assert len(room) == 0
    assert all(isinstance(code, RoomErrorCode) for code in refusals)
