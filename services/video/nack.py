"""Repeated NACKs: which missing RTP packets to ask the publisher for again, and when.

aiortc 1.16.0's receiver NACKs a gap once, when the packet after it arrives, and repeats its
whole missing list only when a *new* gap opens. When that NACK or its retransmission is
lost too, the packet is asked for again only if another packet is lost within the next 128;
otherwise the relay's marker jitter buffer waits until 512 packets have piled up behind the
hole, drops them and asks for a keyframe: a stall of seconds (7 s at 0.7 Mbit/s).
``NackSchedule`` keeps asking, as libwebrtc's NACK module does (``kMaxNackRetries = 10``,
``kDefaultRttMs = 100``): a packet still missing is NACKed again once a retry interval has
passed since its last NACK (100 ms until a round trip is measured, then 1.5 smoothed round
trips, within 20-250 ms), at most ``max_nacks`` times in all, and forgotten once the jitter
buffer has moved past it or the sender can no longer have it.

Pure: sequence numbers and a clock reading in, sequence numbers to NACK out (and, through
``take_given_up``, the ones given up). The relay (``services/video/forwarding.py``) feeds it
every packet its receiver buffers and sends the NACKs through the receiver; a packet given
up makes it drop that frame and ask the publisher for a keyframe at once. See docs/video.md,
"Loss repair".
"""

from __future__ import annotations

from dataclasses import dataclass

from aiortc.rtp import RTP_HISTORY_SIZE
from aiortc.utils import uint16_add, uint16_gt

DEFAULT_RETRY_INTERVAL = 0.1  # seconds, before any round trip is measured (libwebrtc's)
MIN_RETRY_INTERVAL = 0.02  # libwebrtc's NACK processing period; also caps reordering's effect
# A longer wait would by itself break a 500 ms stall bound after one failed round; past it a
# duplicate retransmission costs less than the stall (round trips inflated by a busy CPU).
MAX_RETRY_INTERVAL = 0.25
RTT_FACTOR = 1.5  # retry once the retransmission is overdue by half a round trip (jitter)
RTT_GAIN = 0.125  # smoothing of round-trip samples, as TCP's SRTT (RFC 6298)
MAX_NACKS = 10  # per packet, the first one included: 2 % loss each way fails all with ~1e-14
# aiortc's sender keeps the last 128 packets for retransmission (``RTP_HISTORY_SIZE``);
# asking for older ones is pointless, and its own NACK generator forgets them too.
HORIZON = RTP_HISTORY_SIZE


@dataclass(slots=True)
class _Missing:
    first_nack: float
    last_nack: float
    nacks: int


class NackSchedule:
    """Tracks missing sequence numbers of one RTP stream and when each was last NACKed.

    ``packet`` is called for every packet that reaches the jitter buffer (originals and
    unwrapped retransmissions), at the moment aiortc has just NACKed any gap it opened.
    ``due`` then says which packets to NACK again now. A round trip is sampled from each
    repaired packet, from its *first* NACK: when that NACK or its answer was lost the sample
    is too long, which only makes the next retries later, never premature (Karn's rule,
    sampling only packets NACKed once, would never sample while the interval is shorter
    than the round trip, and so never lengthen it).
    """

    def __init__(
        self,
        *,
        default_interval: float = DEFAULT_RETRY_INTERVAL,
        min_interval: float = MIN_RETRY_INTERVAL,
        max_interval: float = MAX_RETRY_INTERVAL,
        max_nacks: int = MAX_NACKS,
        horizon: int = HORIZON,
    ) -> None:
        if not 0 < min_interval <= default_interval <= max_interval:
            raise ValueError("need 0 < min_interval <= default_interval <= max_interval")
        if max_nacks < 1 or not 0 < horizon < 0x8000:
            raise ValueError("need max_nacks >= 1 and 0 < horizon < 32768")
        self._default_interval = default_interval
        self._min_interval = min_interval
        self._max_interval = max_interval
        self._max_nacks = max_nacks
        self._horizon = horizon
        self._newest: int | None = None
        self._missing: dict[int, _Missing] = {}
        self.srtt: float | None = None
        self.repeated = 0  # NACKs sent by ``due`` (one per packet asked for)
        self.repaired = 0  # missing packets that arrived
        self.given_up = 0  # missing packets forgotten before they arrived
        self._given_up_seqs: list[int] = []  # since the last ``take_given_up``

    @property
    def missing(self) -> list[int]:
        """Sequence numbers still missing, oldest first."""
        return self._in_order(self._missing)

    @property
    def retry_interval(self) -> float:
        """Seconds after its last NACK before a missing packet is NACKed again."""
        if self.srtt is None:
            return self._default_interval
        return min(self._max_interval, max(self._min_interval, RTT_FACTOR * self.srtt))

    def packet(self, sequence_number: int, now: float) -> None:
        """A packet reached the jitter buffer; a gap before it was just NACKed by aiortc."""
        if self._newest is None:
            self._newest = sequence_number
            return
        if uint16_gt(sequence_number, self._newest):
            gap = uint16_add(sequence_number, -self._newest) - 1
            if gap:
                # aiortc sends its whole missing list whenever a gap opens: count that NACK.
                for earlier in self._missing.values():
                    earlier.last_nack, earlier.nacks = now, earlier.nacks + 1
                for back in range(min(gap, self._horizon), 0, -1):
                    self._missing[uint16_add(sequence_number, -back)] = _Missing(now, now, 1)
            self._newest = sequence_number
            self._forget_older_than(uint16_add(sequence_number, -self._horizon))
            return
        entry: _Missing | None = self._missing.pop(sequence_number, None)
        if entry is None:
            return
        self.repaired += 1
        sample = max(0.0, now - entry.first_nack)
        self.srtt = sample if self.srtt is None else self.srtt + RTT_GAIN * (sample - self.srtt)

    def due(self, now: float, oldest_wanted: int | None = None) -> list[int]:
        """The packets to NACK again now, oldest first; records the NACK as sent.

        ``oldest_wanted`` is the jitter buffer's first slot: anything before it has been
        released or dropped, so asking for it again would only cost the publisher bandwidth.
        A packet NACKed ``max_nacks`` times is given up.
        """
        if oldest_wanted is not None:
            self._forget_older_than(oldest_wanted)
        interval = self.retry_interval
        ask: list[int] = []
        for seq in self._in_order(self._missing):
            entry = self._missing[seq]
            if now - entry.last_nack < interval:
                continue
            if entry.nacks >= self._max_nacks:
                del self._missing[seq]
                self.given_up += 1
                self._given_up_seqs.append(seq)
                continue
            entry.last_nack, entry.nacks = now, entry.nacks + 1
            ask.append(seq)
        self.repeated += len(ask)
        return ask

    def take_given_up(self) -> list[int]:
        """The packets given up since the last call, oldest first: their frames will never
        be complete (the relay drops them and asks for a keyframe)."""
        seqs, self._given_up_seqs = self._given_up_seqs, []
        newest = self._newest
        if newest is None or len(seqs) < 2:
            return seqs
        return sorted(seqs, key=lambda seq: uint16_add(newest, -seq), reverse=True)

    def _forget_older_than(self, oldest: int) -> None:
        stale = [seq for seq in self._missing if uint16_gt(oldest, seq)]
        for seq in stale:
            del self._missing[seq]
        self.given_up += len(stale)
        self._given_up_seqs += stale

    def _in_order(self, seqs: dict[int, _Missing]) -> list[int]:
        if self._newest is None:
            return []
        newest = self._newest
        return sorted(seqs, key=lambda seq: uint16_add(newest, -seq), reverse=True)
