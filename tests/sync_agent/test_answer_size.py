"""An upstream answer is read into memory only up to ``upstream.MAX_ANSWER_BYTES``.

A real HTTP server on loopback, written here: it states a huge Content-Length, or streams a
chunked body without end, or answers a small chunked body (which must pass untouched).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from appliance.config import UpstreamConfig
from sync_agent import upstream
from sync_agent.upstream import Failure, UpstreamError, build_client, exchange

SMALL = b'{"resourceType":"Bundle","type":"searchset","entry":[]}'


async def _answer(mode: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    head = "HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n"
    try:
        if mode == "stated":
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
    listening = await asyncio.start_server(lambda r, w: _answer(mode, r, w), "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    async with listening:
        yield f"http://127.0.0.1:{port}/fhir"


@pytest.fixture(autouse=True)
def small_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "MAX_ANSWER_BYTES", 2**20, raising=False)


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
