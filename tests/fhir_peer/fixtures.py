"""Pytest fixtures for the loopback FHIR peer.

Import them into a conftest.py (``from tests.fhir_peer.fixtures import fhir_peer, upstream``).
The peer is started once per session; a test that needs an empty peer or no pending fault
calls ``fhir_peer.reset()`` itself, or takes ``upstream`` (an HTTP client on a reset peer).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from sync_agent.upstream import FHIR_JSON
from tests.fhir_peer.peer import FhirPeer


@pytest.fixture(scope="session")
def fhir_peer() -> Iterator[FhirPeer]:
    with FhirPeer() as peer:
        yield peer


@pytest.fixture
async def upstream(fhir_peer: FhirPeer) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on the peer (the EHR), reset for the test."""
    fhir_peer.reset()
    async with httpx.AsyncClient(
        base_url=fhir_peer.base_url, headers={"Content-Type": FHIR_JSON}, timeout=5.0
    ) as http:
        yield http
