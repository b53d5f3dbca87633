"""Pytest fixture for the loopback FHIR peer.

Import it into a conftest.py (``from tests.fhir_peer.fixtures import fhir_peer``). The peer is
started once per session; a test that needs an empty peer or no pending fault calls
``fhir_peer.reset()`` itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fhir_peer.peer import FhirPeer


@pytest.fixture(scope="session")
def fhir_peer() -> Iterator[FhirPeer]:
    with FhirPeer() as peer:
        yield peer
