"""How an exchange that never gets a usable answer is classed: not every such failure is a
dead link to probe for.

A request that cannot be formed, or a TLS handshake that fails the same way every time, is
for a person to mend: the drain backs off with the reason (``endpoint``, ``auth``) and the
status does not say "check the internet link". A gateway's 504 is an ambiguous outcome, as
a timeout is: the bundle is sent again, smaller. Real servers on loopback: a plain-HTTP
server written here, the token server's FHIR front, the Medplum peer.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from appliance.config import UpstreamConfig
from appliance.store import Store
from sync_agent.link_health import probe
from sync_agent.outbox_delivery import Deliverer
from sync_agent.transport import build_client
from sync_agent.upstream import Failure, UpstreamError, exchange
from tests.fhir_peer.peer import FhirPeer
from tests.sync_agent.test_auth import _chain
from tests.sync_agent.test_faults import _readings
from tests.sync_agent.test_outbox_delivery import _states
from tests.sync_agent.token_server import FakeClock, TokenServer, serving

# -- a request that cannot be formed ------------------------------------------------------------


@pytest.fixture
async def fhir_front() -> AsyncIterator[tuple[TokenServer, UpstreamConfig]]:
    server = TokenServer(clock=FakeClock())
    async with serving(server.create_app(require_token=False)) as port:
        yield server, UpstreamConfig(name="ehr", base_url=f"http://127.0.0.1:{port}/fhir")


@pytest.mark.parametrize(
    ("url", "headers", "unformed"),
    [
        # A version id from a server, with a line break, in an If-Match.
        ("", {"If-Match": 'W/"1\r\nX-Smuggled: secret-value"'}, "LocalProtocolError"),
        ("", {"If-None-Exist": "identifier=secret-value\x00"}, "LocalProtocolError"),
        ("ftp://127.0.0.1:9/fhir/", None, "UnsupportedProtocol"),
    ],
    ids=["line-break", "nul", "scheme"],
)
async def test_a_request_that_cannot_be_formed_is_an_endpoint_failure_quoting_no_header(
    fhir_front: tuple[TokenServer, UpstreamConfig],
    url: str,
    headers: dict[str, str] | None,
    unformed: str,
) -> None:
    server, upstream = fhir_front
    async with build_client(upstream) as client:
        with pytest.raises(UpstreamError) as caught:
            await exchange(client, "POST", url, content=b"{}", headers=headers)
    # Before: transient, with httpx's error as cause, which the drain counts as a dead link
    # (probed and drained again twice a second for ever) and whose text quotes the header.
    assert caught.value.failure is Failure.ENDPOINT
    assert unformed in caught.value.message
    assert (caught.value.__cause__, caught.value.__context__) == (None, None)
    assert "secret-value" not in _chain(caught.value)
    assert server.fhir_requests == 0  # nothing left the box


# -- a TLS handshake that fails for good ----------------------------------------------------


async def _plain_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A plain HTTP server's answer to anything (here: a TLS ClientHello)."""
    try:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def http_port() -> AsyncIterator[int]:
    listening = await asyncio.start_server(_plain_http, "127.0.0.1", 0)
    async with listening:
        yield listening.sockets[0].getsockname()[1]


async def test_https_to_a_plain_http_port_is_an_auth_failure_with_openssls_reason(
    http_port: int, store: Store, db_path: Path
) -> None:
    await _readings(store, 1)
    upstream = UpstreamConfig(name="ehr", base_url=f"https://127.0.0.1:{http_port}/fhir")
    async with build_client(upstream) as client:
        with pytest.raises(UpstreamError) as caught:
            await exchange(client, "POST", "", content=b"{}")
        result = await Deliverer(store, client, max_entries=8, rng=random.Random(1)).drain()
        reached = await probe(client, 2.0)
    # Before: "cannot connect: ConnectError", and the box said "unreachable: check the
    # internet link" for ever, probing an upstream that answers every probe.
    assert caught.value.failure is Failure.AUTH
    assert caught.value.message.startswith(f"TLS with 127.0.0.1:{http_port}: ")
    assert "(WRONG_VERSION_NUMBER)" in caught.value.message
    assert "https port" in caught.value.message
    assert caught.value.__cause__ is None
    assert result.error is not None
    assert result.error.startswith("auth: TLS with 127.0.0.1:")
    assert (result.link_down, result.unreachable, result.dead, result.ambiguous) == (
        True,
        False,
        0,
        0,
    )
    assert reached  # the probe reaches it: the loop backs off and says why, no probing
    assert _states(db_path) == [("pending", 2)]


async def test_a_refused_connection_is_still_a_dead_link(store: Store) -> None:
    await _readings(store, 1)
    upstream = UpstreamConfig(name="ehr", base_url="https://127.0.0.1:9/fhir", timeout_s=2.0)
    async with build_client(upstream) as client:
        result = await Deliverer(store, client, max_entries=8, rng=random.Random(1)).drain()
        reached = await probe(client, 2.0)
    assert result.error == "transient: cannot connect: ConnectError"
    assert (result.link_down, result.unreachable, reached) == (True, True, False)


# -- a gateway timeout ----------------------------------------------------------------------


@pytest.mark.peer
async def test_a_gateway_timeout_is_ambiguous_the_bundle_shrinks_and_lands_once(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    await _readings(store, 7)
    now = [datetime.now(UTC)]
    deliverer = Deliverer(
        store, client, max_entries=8, rng=random.Random(1), clock=lambda: now[0], unsure_s=5
    )
    assert (await deliverer.drain_once()).delivered == 1  # the Patient
    # A gateway in front of the EHR gave up waiting, and the EHR applied the bundle anyway.
    fhir_peer.fault("status", status=504, count=1, after="response")
    failed = await deliverer.drain()
    assert failed.error is not None
    assert failed.error.startswith("ambiguous: ")
    assert (failed.link_down, failed.unreachable, failed.ambiguous) == (True, False, 7)
    # Before: transient, and the same bundle, too slow for the gateway, again for ever.
    assert deliverer.batch_size == 3
    assert fhir_peer.count("Observation") == 7  # it did land
    assert _states(db_path) == [("delivered", 1), ("pending", 7)]
    # Not sent again before a request timeout has passed (the EHR may be applying it still).
    assert (await deliverer.drain()).delivered == 0
    now[0] += timedelta(seconds=6)
    resent = await deliverer.drain()
    assert (resent.delivered, resent.existing, resent.error) == (7, 7, None)
    assert (fhir_peer.count("Patient"), fhir_peer.count("Observation")) == (1, 7)
    assert _states(db_path) == [("delivered", 8)]
