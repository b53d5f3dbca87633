"""How an exchange that never gets a usable answer is classed: not every such failure is a
dead link to probe for.

A request that cannot be formed is for a person to mend: the drain backs off with the
reason (``endpoint``) and the status does not say "check the internet link". Against the
token server's FHIR front on loopback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from appliance.config import UpstreamConfig
from sync_agent.upstream import Failure, UpstreamError, build_client, exchange
from tests.sync_agent.token_server import FakeClock, TokenServer, serving


def _chain(exc: BaseException) -> str:
    """Every exception raised with ``exc`` (causes and contexts), as text and as repr."""
    seen: list[str] = []
    current: BaseException | None = exc
    while current is not None:
        seen += [str(current), repr(current)]
        current = current.__cause__ or current.__context__
    return "\n".join(seen)


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
