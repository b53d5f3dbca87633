"""Shared fixtures: a real SQLite store on a temp file with a generated key, the FHIR peer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.keys import generate_kek_file
from appliance.store import Store


@pytest.fixture
def kek_path(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "kek"
    generate_kek_file(path)
    return path


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "appliance.db"


@pytest.fixture
async def store(db_path: Path, kek_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(db_path, kek_path)
    try:
        yield opened
    finally:
        await opened.close()


# The Medplum FHIR peer (Node.js) on loopback, started once per session when a test asks.
from tests.fhir_peer.fixtures import fhir_peer, upstream  # noqa: E402, F401


@pytest.fixture
def loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every aiortc peer on 127.0.0.1 (video tests).

    aioice gathers host candidates on every interface except 127.0.0.1; the tests must stay
    on loopback, and there is no public option for it, so its address lookup is replaced.
    """
    import aioice.ice

    def loopback_only(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return ["127.0.0.1"]

    monkeypatch.setattr(aioice.ice, "get_host_addresses", loopback_only)
