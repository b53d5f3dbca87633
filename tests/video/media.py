"""Synthetic media for the relay tests: video frames that carry their own number.

The number is drawn as big black and white blocks (40 px at 320x240), which survive VP8's
loss of precision, with its 16-bit complement as a check, so a receiver reads back exactly
which frame it got, or nothing.
"""

from __future__ import annotations

import time

from aiortc import VideoStreamTrack
from av import VideoFrame

WIDTH, HEIGHT = 320, 240
BLOCK = 40
COLUMNS = WIDTH // BLOCK  # 8 blocks a row; 4 rows carry 32 bits
BITS = 32
WHITE, BLACK = 235, 16


def _bits(frame_id: int) -> list[int]:
    word = (frame_id & 0xFFFF) | ((~frame_id & 0xFFFF) << 16)
    return [(word >> i) & 1 for i in range(BITS)]


def draw_frame_id(frame_id: int) -> VideoFrame:
    """A 320x240 grey frame whose top 4 block rows spell ``frame_id``."""
    bits = _bits(frame_id)
    rows = []
    for block_row in range(HEIGHT // BLOCK):
        line = bytearray()
        for column in range(COLUMNS):
            index = block_row * COLUMNS + column
            on = index < BITS and bits[index]
            line += bytes([WHITE if on else BLACK]) * BLOCK
        rows.append(bytes(line) * BLOCK)
    frame = VideoFrame(WIDTH, HEIGHT, "yuv420p")
    luma, chroma_u, chroma_v = frame.planes
    assert luma.line_size == WIDTH
    luma.update(b"".join(rows))
    chroma_u.update(b"\x80" * chroma_u.buffer_size)
    chroma_v.update(b"\x80" * chroma_v.buffer_size)
    return frame


def read_frame_id(frame: VideoFrame) -> int | None:
    """The number drawn by ``draw_frame_id``, or None if the check bits disagree."""
    if frame.format.name != "yuv420p":
        frame = frame.reformat(format="yuv420p")
    luma = frame.planes[0]
    data, stride = bytes(luma), luma.line_size
    word = 0
    for index in range(BITS):
        top, left = (index // COLUMNS) * BLOCK, (index % COLUMNS) * BLOCK
        total = 0
        for y in range(top + 15, top + 25, 3):
            start = y * stride + left + 15
            total += sum(data[start : start + 10 : 3])
        if total / 16 > 128:
            word |= 1 << index
    frame_id, check = word & 0xFFFF, word >> 16
    return frame_id if check == (~frame_id & 0xFFFF) else None


class NumberedVideoTrack(VideoStreamTrack):
    """30 fps of numbered frames; remembers when each was made (``time.monotonic``)."""

    def __init__(self) -> None:
        super().__init__()
        self.made_at: dict[int, float] = {}
        self._next = 0

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame_id = self._next
        self._next += 1
        frame = draw_frame_id(frame_id)
        frame.pts, frame.time_base = pts, time_base
        self.made_at[frame_id] = time.monotonic()
        return frame
