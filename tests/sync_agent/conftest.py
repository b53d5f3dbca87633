"""The sync agent's tests: an HTTP client on the Medplum FHIR peer, reset for each test.

Modules that reach the peer another way (through the fault proxy, ``test_faults.py``)
define their own ``client``.
"""

from __future__ import annotations

import httpx
import pytest


@pytest.fixture
def client(upstream: httpx.AsyncClient) -> httpx.AsyncClient:
    """The shared ``upstream`` fixture (tests/fhir_peer/fixtures.py) under this folder's name."""
    return upstream
