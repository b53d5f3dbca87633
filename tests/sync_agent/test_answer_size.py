"""An upstream answer is read into memory only up to ``transport.MAX_ANSWER_BYTES``, as sent
and as decoded.

A real HTTP server on loopback, written here: it states a huge Content-Length, or streams a
chunked body without end, or answers a small chunked body (which must pass untouched), or
answers compressed: a small gzip that decodes past the cap (a "zip bomb"), with a stated
length or chunked, or a normal gzip or deflate answer, which must decode as before.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
import zlib
from collections.abc import AsyncIterator

import pytest

from appliance.config import UpstreamConfig
from sync_agent import transport
from sync_agent.transport import _Decoder, build_client
from sync_agent.upstream import Failure, UpstreamError, exchange

SMALL = b'{"resourceType":"Bundle","type":"searchset","entry":[]}'
# 8 MB of spaces in about 8 KB: past the 1 MB cap of these tests a thousand times over.
BOMB = gzip.compress(b" " * (8 * 2**20), 9)
# The compressed answers, by mode: (Content-Encoding, body).
CODED = {
    "bomb": ("gzip", BOMB),
    "bomb-chunked": ("gzip", BOMB),
    "gzip": ("gzip", gzip.compress(SMALL)),
    "deflate": ("deflate", zlib.compress(SMALL)),
    "raw-deflate": ("deflate", zlib.compress(SMALL, wbits=-zlib.MAX_WBITS)),
    "twice": ("gzip, deflate", zlib.compress(gzip.compress(SMALL))),
    "not-gzip": ("gzip", b"this is not gzip at all"),
}
# The request heads the server read, in order.
HEADS: list[bytes] = []


async def _answer(mode: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    HEADS.append(await reader.readuntil(b"\r\n\r\n"))
    head = "HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n"
    try:
        if mode in CODED:
            coding, body = CODED[mode]
            head += f"Content-Encoding: {coding}\r\n"
            if mode == "bomb-chunked":
                writer.write(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
                for start in range(0, len(body), 1000):
                    piece = body[start : start + 1000]
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
        elif mode == "stated":
            writer.write(f"{head}Content-Length: {200 * 2**20}\r\n\r\n".encode() + b"{" * 4096)
            await writer.drain()
            await asyncio.sleep(5)
        elif mode == "endless":
            writer.write(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
            chunk = b" " * 65536
            while True:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
        else:
            writer.write(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMALL), SMALL))
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    mode = request.param
    HEADS.clear()
    listening = await asyncio.start_server(lambda r, w: _answer(mode, r, w), "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    async with listening:
        yield f"http://127.0.0.1:{port}/fhir"


@pytest.fixture(autouse=True)
def small_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "MAX_ANSWER_BYTES", 2**20, raising=False)


@pytest.mark.parametrize("server", ["stated", "endless"], indirect=True)
async def test_an_answer_over_the_cap_is_refused_not_read_into_memory(server: str) -> None:
    async with build_client(UpstreamConfig(name="ehr", base_url=server)) as client:
        with pytest.raises(UpstreamError) as caught:
            await asyncio.wait_for(exchange(client, "GET", "Patient"), 10)
    # Before: read on until the process ran out of memory (or the stated length came).
    assert caught.value.failure is Failure.TRANSIENT
    assert "answer over 1 MB" in str(caught.value)


@pytest.mark.parametrize("server", ["small"], indirect=True)
async def test_a_small_chunked_answer_passes_untouched(server: str) -> None:
    async with build_client(UpstreamConfig(name="ehr", base_url=server)) as client:
        response = await exchange(client, "GET", "Patient")
    assert response.status_code == 200
    assert response.content == SMALL


@pytest.mark.parametrize("server", ["bomb", "bomb-chunked"], indirect=True)
async def test_a_small_gzip_that_decodes_past_the_cap_is_refused_not_decoded_into_memory(
    server: str,
) -> None:
    async with build_client(UpstreamConfig(name="ehr", base_url=server)) as client:
        with pytest.raises(UpstreamError) as caught:
            await asyncio.wait_for(exchange(client, "GET", "Patient"), 10)
    # Before: 8 KB on the wire passed the cap, and httpx decoded all 8 MB (a 64 MB gzip of
    # zeros, under the real cap, is 64 GB decoded).
    assert len(BOMB) < 2**20 // 64
    assert caught.value.failure is Failure.TRANSIENT
    assert "answer over 1 MB" in str(caught.value)


@pytest.mark.parametrize("server", ["gzip", "deflate", "raw-deflate", "twice"], indirect=True)
async def test_a_compressed_answer_is_decoded_as_before_and_only_gzip_and_deflate_are_asked_for(
    server: str,
) -> None:
    async with build_client(UpstreamConfig(name="ehr", base_url=server)) as client:
        response = await exchange(client, "GET", "Patient")
    assert response.status_code == 200
    assert response.content == SMALL
    assert "Content-Encoding" not in response.headers  # decoded once, by the transport
    [head] = HEADS
    assert b"\r\naccept-encoding: gzip, deflate\r\n" in head.lower()


@pytest.mark.parametrize("server", ["not-gzip"], indirect=True)
async def test_an_answer_that_is_not_the_gzip_it_claims_is_ambiguous_as_before(
    server: str,
) -> None:
    async with build_client(UpstreamConfig(name="ehr", base_url=server)) as client:
        with pytest.raises(UpstreamError) as caught:
            await exchange(client, "GET", "Patient")
    assert caught.value.failure is Failure.AMBIGUOUS
    assert "DecodingError" in str(caught.value)


@pytest.mark.parametrize("size", [1, 2, 5, 4096])
@pytest.mark.parametrize(
    ("codings", "encoded"),
    [
        (["gzip"], gzip.compress(SMALL * 5000)),
        (["deflate"], zlib.compress(SMALL * 5000)),
        (["deflate"], zlib.compress(SMALL * 5000, wbits=-zlib.MAX_WBITS)),
        (["gzip", "deflate"], zlib.compress(gzip.compress(SMALL * 5000))),
    ],
    ids=["gzip", "deflate", "raw-deflate", "gzip-then-deflate"],
)
def test_the_decoder_fed_in_small_chunks_gives_the_body_in_bounded_pieces(
    codings: list[str], encoded: bytes, size: int
) -> None:
    decoder = _Decoder(codings)
    pieces = [p for i in range(0, len(encoded), size) for p in decoder.feed(encoded[i : i + size])]
    pieces += list(decoder.finish())
    assert b"".join(pieces) == SMALL * 5000
    assert max(map(len, pieces)) <= 2**16


@pytest.mark.parametrize(
    "after",
    [b"\n", gzip.compress(b""), gzip.compress(b"a second member")],
    ids=["newline", "empty-member", "second-member"],
)
@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_bytes_after_the_end_of_the_data_are_ignored_not_looped_on(
    coding: str, after: bytes
) -> None:
    body = SMALL * 5000  # past one decoding step
    encoded = gzip.compress(body) if coding == "gzip" else zlib.compress(body)
    decoded: list[bytes] = []

    def decode() -> None:  # in a thread: a decoder that loops never returns to asyncio
        decoder = _Decoder([coding])
        decoded.extend(decoder.feed(encoded + after))
        decoded.extend(decoder.feed(b"more after the end"))
        decoded.extend(decoder.finish())

    worker = threading.Thread(target=decode, daemon=True)
    worker.start()
    worker.join(10)
    # Before: the decoder asked zlib again and again for what follows the end, for ever
    # (the sync process's event loop stood still, its memory grew).
    assert not worker.is_alive(), "the decoder loops on the bytes after the end"
    assert b"".join(decoded) == body


def test_the_decoder_never_makes_one_piece_of_a_whole_bomb() -> None:
    pieces = _Decoder(["gzip"]).feed(BOMB)  # one chunk off the wire: 8 KB, 8 MB inside
    assert len(next(pieces)) <= 2**16
