"""Video visit rooms: who is in, who waits, who is muted, and who sees whom. Pure state.

One room per visit. The nurse runs it: a nurse is admitted on joining; the patient (at the
kiosk or in the exam room) and the remote provider wait until a nurse admits them. A nurse
can mute anyone's audio or video and end the visit; anyone can mute themselves, and unmute
themselves unless a nurse muted them. Admitted participants publish, and each sees every
other admitted participant's unmuted media (``routes``). Transport-independent: every
operation returns the events to tell the participants, or raises ``RoomError``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

DEFAULT_CAPACITY = 6  # patient, nurse(s), provider, an interpreter or family member
DEFAULT_MAX_ROOMS = 16
ENDED_ROOMS_KEPT = 256  # ended visits remembered so they cannot be rejoined


class Role(StrEnum):
    """Who a participant is in the visit."""

    PATIENT = "patient"  # the kiosk or exam-room station, with the patient
    NURSE = "nurse"
    PROVIDER = "provider"  # the remote provider, joining by the signed link
    CAMERA = "camera"  # an exam camera the box publishes (devices process): video only


class Presence(StrEnum):
    """Whether a participant waits or is in the visit."""

    WAITING = "waiting"
    ADMITTED = "admitted"


class MediaKind(StrEnum):
    """A kind of track a participant publishes."""

    AUDIO = "audio"
    VIDEO = "video"


class RoomErrorCode(StrEnum):
    """Why a room operation was refused (sent to the client in an ``error`` message)."""

    ROOM_ENDED = "room_ended"
    ROOM_FULL = "room_full"
    TOO_MANY_ROOMS = "too_many_rooms"
    ALREADY_JOINED = "already_joined"
    UNKNOWN_PARTICIPANT = "unknown_participant"
    NOT_ALLOWED = "not_allowed"
    NOT_WAITING = "not_waiting"


class RoomError(ValueError):
    """A room operation that the rules refuse."""

    def __init__(self, code: RoomErrorCode, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


@dataclass(frozen=True, slots=True)
class Participant:
    """One participant's state in a room."""

    id: str
    role: Role
    presence: Presence
    joined_at: datetime
    muted: frozenset[MediaKind] = frozenset()
    muted_by_nurse: frozenset[MediaKind] = frozenset()
    label: str | None = None  # a camera's configured name, shown on its tile


@dataclass(frozen=True, slots=True)
class Joined:
    """Someone joined, admitted or into the waiting room."""

    participant_id: str
    role: Role
    presence: Presence
    label: str | None = None


@dataclass(frozen=True, slots=True)
class Admitted:
    """A nurse let a waiting participant in."""

    participant_id: str
    by: str


@dataclass(frozen=True, slots=True)
class MuteChanged:
    """A participant's audio or video was muted or unmuted."""

    participant_id: str
    kind: MediaKind
    muted: bool
    by: str


@dataclass(frozen=True, slots=True)
class Left:
    """A participant left."""

    participant_id: str


@dataclass(frozen=True, slots=True)
class Ended:
    """A nurse ended the visit; everyone is out."""

    by: str


Event = Joined | Admitted | MuteChanged | Left | Ended


class Room:
    """The participants of one visit and the rules between them."""

    def __init__(self, visit_id: str, capacity: int = DEFAULT_CAPACITY) -> None:
        self.visit_id = visit_id
        self.capacity = capacity
        self.ended = False
        self._participants: dict[str, Participant] = {}

    def __iter__(self) -> Iterator[Participant]:
        return iter(self._participants.values())

    def __len__(self) -> int:
        return len(self._participants)

    def participant(self, participant_id: str) -> Participant:
        """The participant, or ``RoomError(UNKNOWN_PARTICIPANT)``."""
        try:
            return self._participants[participant_id]
        except KeyError:
            raise RoomError(
                RoomErrorCode.UNKNOWN_PARTICIPANT, f"{participant_id!r} is not in the room"
            ) from None

    def join(
        self, participant_id: str, role: Role, now: datetime, label: str | None = None
    ) -> list[Event]:
        """Add a participant: a nurse is admitted, anyone else waits for a nurse.

        A camera is admitted too: only a nurse's action on the box adds one.
        """
        self._check_open()
        if participant_id in self._participants:
            raise RoomError(RoomErrorCode.ALREADY_JOINED, f"{participant_id!r} is already in")
        if len(self._participants) >= self.capacity:
            raise RoomError(RoomErrorCode.ROOM_FULL, f"the room holds {self.capacity}")
        admitted = role in (Role.NURSE, Role.CAMERA)
        presence = Presence.ADMITTED if admitted else Presence.WAITING
        self._participants[participant_id] = Participant(
            participant_id, role, presence, now, label=label
        )
        return [Joined(participant_id, role, presence, label)]

    def admit(self, by: str, participant_id: str) -> list[Event]:
        """A nurse admits a waiting participant."""
        self._check_open()
        self._check_nurse(by, "admit")
        target = self.participant(participant_id)
        if target.presence is not Presence.WAITING:
            raise RoomError(RoomErrorCode.NOT_WAITING, f"{participant_id!r} is not waiting")
        self._participants[participant_id] = replace(target, presence=Presence.ADMITTED)
        return [Admitted(participant_id, by)]

    def set_muted(self, by: str, participant_id: str, kind: MediaKind, muted: bool) -> list[Event]:
        """Mute or unmute: a nurse for anyone, anyone for themselves unless a nurse muted them."""
        self._check_open()
        actor = self.participant(by)
        target = self.participant(participant_id)
        by_nurse = actor.role is Role.NURSE and actor.presence is Presence.ADMITTED
        if by != participant_id and not by_nurse:
            raise RoomError(RoomErrorCode.NOT_ALLOWED, "only a nurse can mute someone else")
        if not muted and not by_nurse and kind in target.muted_by_nurse:
            raise RoomError(RoomErrorCode.NOT_ALLOWED, "a nurse muted this; a nurse unmutes it")
        if (kind in target.muted) == muted:
            return []
        if muted:
            held = target.muted_by_nurse | {kind} if by_nurse else target.muted_by_nurse
            updated = replace(target, muted=target.muted | {kind}, muted_by_nurse=held)
        else:
            held = target.muted_by_nurse - {kind}
            updated = replace(target, muted=target.muted - {kind}, muted_by_nurse=held)
        self._participants[participant_id] = updated
        return [MuteChanged(participant_id, kind, muted, by)]

    def leave(self, participant_id: str) -> list[Event]:
        """A participant leaves (or their connection dropped)."""
        self.participant(participant_id)
        del self._participants[participant_id]
        return [Left(participant_id)]

    def end(self, by: str) -> list[Event]:
        """A nurse ends the visit: everyone leaves and nobody can join again."""
        self._check_open()
        self._check_nurse(by, "end the visit")
        self._participants.clear()
        self.ended = True
        return [Ended(by)]

    def routes(self, kind: MediaKind) -> frozenset[tuple[str, str]]:
        """(publisher, viewer) pairs for ``kind``: admitted, unmuted, to every other admitted.

        A camera publishes and never views.
        """
        admitted = [p for p in self._participants.values() if p.presence is Presence.ADMITTED]
        return frozenset(
            (publisher.id, viewer.id)
            for publisher in admitted
            if kind not in publisher.muted
            for viewer in admitted
            if viewer.id != publisher.id and viewer.role is not Role.CAMERA
        )

    def _check_open(self) -> None:
        if self.ended:
            raise RoomError(RoomErrorCode.ROOM_ENDED, f"visit {self.visit_id!r} has ended")

    def _check_nurse(self, participant_id: str, action: str) -> None:
        actor = self.participant(participant_id)
        if actor.role is not Role.NURSE or actor.presence is not Presence.ADMITTED:
            raise RoomError(RoomErrorCode.NOT_ALLOWED, f"only a nurse can {action}")


class Rooms:
    """The rooms of the box, one per visit, created on the first join."""

    def __init__(
        self, max_rooms: int = DEFAULT_MAX_ROOMS, capacity: int = DEFAULT_CAPACITY
    ) -> None:
        self.max_rooms = max_rooms
        self.capacity = capacity
        self._rooms: dict[str, Room] = {}

    def __contains__(self, visit_id: object) -> bool:
        return visit_id in self._rooms

    def __len__(self) -> int:
        return len(self._rooms)

    def get(self, visit_id: str) -> Room:
        """The open or ended room of a visit; ``KeyError`` if nobody ever joined it."""
        return self._rooms[visit_id]

    def join(self, visit_id: str, participant_id: str, role: Role, now: datetime) -> list[Event]:
        """Join the visit's room, creating it if this is the first participant."""
        room = self._rooms.get(visit_id)
        if room is None:
            open_rooms = sum(not r.ended for r in self._rooms.values())
            if open_rooms >= self.max_rooms:
                raise RoomError(RoomErrorCode.TOO_MANY_ROOMS, f"{self.max_rooms} visits are on")
            room = self._rooms[visit_id] = Room(visit_id, self.capacity)
        return room.join(participant_id, role, now)

    def leave(self, visit_id: str, participant_id: str) -> list[Event]:
        """Leave; an open room nobody is in any more is forgotten."""
        room = self.get(visit_id)
        events = room.leave(participant_id)
        if not room.ended and not len(room):
            del self._rooms[visit_id]
        return events

    def end(self, visit_id: str, by: str) -> list[Event]:
        """A nurse ends the visit; the oldest ended rooms beyond a bound are forgotten."""
        events = self.get(visit_id).end(by)
        ended = [key for key, room in self._rooms.items() if room.ended]
        for key in ended[: max(0, len(ended) - ENDED_ROOMS_KEPT)]:
            del self._rooms[key]
        return events
