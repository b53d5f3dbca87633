"""Keep every aiortc peer on 127.0.0.1.

aioice gathers host candidates on every interface except 127.0.0.1; the tests must stay on
loopback, and there is no public option for it, so its address lookup is replaced here.
"""

from __future__ import annotations

import aioice.ice
import pytest


@pytest.fixture
def loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    def loopback_only(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return ["127.0.0.1"]

    monkeypatch.setattr(aioice.ice, "get_host_addresses", loopback_only)
