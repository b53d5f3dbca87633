"""Whether the upstream answers: the probe, the round-trip measure and the offline probing.

:func:`probe` is the cheap ``HEAD metadata`` the loop sends instead of drains while no
connection can be made (why: ``sync_agent.process``'s docstring); :class:`LinkHealth`
measures the round trip while online and probes until the upstream answers again;
:func:`link_seen` says what a round that sent nothing saw of the link.
"""

from __future__ import annotations

import asyncio
import logging
import random

import httpx

from appliance.config import UpstreamConfig
from appliance.runtime import ProcessContext
from sync_agent.pacing import Pacing
from sync_agent.upstream import Failure, UpstreamError
from sync_agent.wakeups import Wake, Wakeups

logger = logging.getLogger(__name__)

# While online, the round trip of a ``HEAD metadata`` is measured this often and published
# as ``upstream_rtt_ms`` (the pre-call check shows it: web/precall.py).
RTT_EVERY_S = 60.0


async def probe(client: httpx.AsyncClient, timeout_s: float) -> bool:
    """Whether the upstream answers at all (``HEAD metadata``; any status counts).

    Sent without the client's authentication: the CapabilityStatement is public, a 401 is an
    answer too, and a probe must not fetch tokens from a token endpoint while offline. A TLS
    refusal (``UpstreamError`` from the transport) is an answer as well: the drain that
    follows reports it as an authentication problem and backs off. So is a connection made
    whose answer is slow or odd (a server building its CapabilityStatement on each request, a
    satellite link): only a connection that could not be made is "unreachable" — else such
    an upstream would never be sent a bundle, which allows far longer than the probe.
    """
    # As long to connect as a bundle gets (a satellite link's TCP and TLS take seconds); the
    # answer itself gets ``timeout_s``, and a slow one counts as reached (below).
    connect = max(timeout_s, client.timeout.connect or timeout_s)
    try:
        await client.head(
            "metadata", timeout=httpx.Timeout(timeout_s, connect=connect), auth=httpx.Auth()
        )
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.ProxyError, httpx.PoolTimeout):
        return False
    except httpx.HTTPError:
        return True  # connected: the drain finds out the rest, with its own timeouts
    except UpstreamError as exc:
        return not isinstance(exc.__cause__, httpx.TransportError)
    return True


def link_seen(
    stops: list[UpstreamError], reached: bool | None, answered: bool = False
) -> dict[str, object]:
    """What a round whose drain sent nothing saw of the link: the steps after the drain
    found it down (a pulled cable with an empty outbox), or the round-trip probe answered
    or not; ``answered``: a step got the upstream's answer this round (a pull's page), which
    says the link is up whatever the probe said (a proxy refusing ``HEAD``, a probe timing
    out on a slow link). Nothing new: no figures (the last ones stand)."""
    cut = [e for e in stops if e.failure in (Failure.TRANSIENT, Failure.AMBIGUOUS)]
    if not cut and (answered or reached):
        return {"online": True, "unreachable": False, "last_failure": None}
    if cut or reached is False:
        no_connection = reached is False or any(
            isinstance(e.__cause__, httpx.ConnectError | httpx.ConnectTimeout) for e in cut
        )
        return {
            "online": False,
            "unreachable": no_connection,
            "last_failure": str(cut[0].failure) if cut else str(Failure.TRANSIENT),
        }
    return {}


class LinkHealth:
    """The loop's view of the link: the round trip measured while online
    (:meth:`measure_rtt`), the probes while unreachable (:meth:`until_reachable`)."""

    def __init__(
        self,
        ctx: ProcessContext,
        client: httpx.AsyncClient,
        upstream: UpstreamConfig,
        *,
        pacing: Pacing,
        rng: random.Random,
        wakeups: Wakeups,
    ) -> None:
        self._ctx = ctx
        self._client = client
        self._upstream = upstream
        self._pacing = pacing
        self._rng = rng
        self._wakeups = wakeups
        self.probes = 0
        self._rtt_at: float | None = None
        self.rtt_ok = True
        self.back = False  # a probe answered after the drain found no connection

    async def measure_rtt(self) -> bool | None:
        """Time one ``HEAD metadata`` (at most every :data:`RTT_EVERY_S`); no PHI, no auth.

        Whether the upstream answered (None: not asked this round). After one that did not,
        asked every round but never more often than the offline probes (``probe_cap_s / 2``,
        however short ``interval_s``), so the status says "online" again soon after the link
        is back."""
        loop = asyncio.get_running_loop()
        every = RTT_EVERY_S if self.rtt_ok else self._pacing.probe_cap_s / 2
        if self._rtt_at is not None and loop.time() - self._rtt_at < every:
            return None
        self._rtt_at = start = loop.time()
        self.rtt_ok = await probe(self._client, self._pacing.probe_timeout_s)
        if self.rtt_ok:
            self._ctx.set_status(upstream_rtt_ms=round((loop.time() - start) * 1000, 1))
        return self.rtt_ok

    async def until_reachable(self) -> Wake:
        """Probe until the upstream answers (:attr:`Wake.TIMEOUT`) or a wait ends otherwise
        (a stop, "Sync now"): what the loop does instead of drains while it is unreachable."""
        logger.warning(
            "upstream %s unreachable; probing every %.0f s at most",
            self._upstream.name,
            self._pacing.probe_cap_s,
        )
        loop = asyncio.get_running_loop()
        since = loop.time()
        failed = 0
        while True:
            wake = await self._wakeups.wait(
                self._pacing.probe_wait(failed, self._rng), on_work=False
            )
            if wake is not Wake.TIMEOUT:
                return wake
            self.probes += 1
            if await probe(self._client, self._pacing.probe_timeout_s):
                logger.info(
                    "upstream %s answers again after %.0f s",
                    self._upstream.name,
                    loop.time() - since,
                )
                return Wake.TIMEOUT
            failed += 1
