"""The sync agent's tests: an HTTP client on the Medplum FHIR peer, reset for each test.

Modules that reach the peer another way (through the fault proxy, ``test_faults.py``)
define their own ``client``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from sync_agent.upstream import FHIR_JSON
from tests.fhir_peer.peer import FhirPeer


@pytest.fixture
async def client(fhir_peer: FhirPeer) -> AsyncIterator[httpx.AsyncClient]:
    fhir_peer.reset()
    async with httpx.AsyncClient(
        base_url=fhir_peer.base_url, headers={"Content-Type": FHIR_JSON}, timeout=5.0
    ) as http:
        yield http
