"""The pull's requests: a search page's Bundle from the upstream, checked before it is taken.

The pull reads every page through these (:mod:`sync_agent.pull_streams`,
:mod:`sync_agent.pull_patients`): :func:`search_page` asks (strict handling for a search of
ours), :func:`next_page` follows one of the server's ``next`` links and :func:`check_order`
refuses a page not in the order asked for. A page refused so (:class:`Unordered`) or a link
the server refused (:class:`LinkRefused`) ends that one stream's part of the pass; the other
streams go on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import httpx

from appliance import fhir
from sync_agent.own_address import followed
from sync_agent.pull_answers import order_problem
from sync_agent.upstream import (
    Failure,
    UpstreamError,
    classify_for_resource,
    exchange,
    is_outcome,
    next_url,
    outcome_text,
    response_json,
)

logger = logging.getLogger(__name__)

# What drops a walk through a run: the server refused the link, or the address took it not.
REFUSALS = frozenset({Failure.PERMANENT, Failure.ENDPOINT})


class Unordered(UpstreamError):
    """A page not in the order asked for (:func:`order_problem`): not taken."""


class LinkRefused(UpstreamError):
    """A ``next`` link of the server's own refused (its search expired): the walk ends."""


def link_to_follow(
    bundle: Any, client: httpx.AsyncClient, also_known_as: Iterable[str]
) -> str | None:
    """The URL to ask for a page's ``next`` link (as :func:`~sync_agent.upstream.next_link`,
    with the addresses the upstream is also known as), or None. A link the page has but
    that is not the upstream's is not followed, and the journal names the base it is at
    (:func:`_where`), since the cause is a setting: an EHR behind a proxy writing its
    internal address (docs/troubleshooting.md), which is what ``also_known_as`` takes.
    """
    url = next_url(bundle)
    if url is None:
        return None
    link = followed(url, str(client.base_url), also_known_as)
    if link is None:
        logger.warning(
            "pull: a next link at %s is not the upstream's address: not followed "
            "(list that address in the upstream's also_known_as if it is the EHR's own)",
            _where(url),
        )
    return link


def _where(url: str) -> str:
    """The FHIR base a link is at, as ``also_known_as`` takes it: scheme, host, port and the
    path before its first resource type (``Appointment``) or operation (``_history``,
    ``$everything``), so never an id; a query (which may carry ids) is left out. HAPI's
    ``<base>?_getpages=…`` is at ``<base>``. A word for a link that is not a URL."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "an address that is not a URL"
    if not parsed.host:
        return "an address with no host"
    port = f":{parsed.port}" if parsed.port is not None else ""
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    base = []
    for segment in parsed.raw_path.decode("ascii").split("?", 1)[0].split("/"):
        if _RESOURCE_TYPE.fullmatch(segment) or segment[:1] in ("_", "$"):
            break
        base.append(segment)
    path = "/".join(base).rstrip("/")
    return f"{parsed.scheme}://{host}{port}{path}"


# A segment naming a resource type (Appointment, AuditEvent), not a base's own (R4, STU3).
_RESOURCE_TYPE = re.compile(r"[A-Z][a-z][A-Za-z]*")


async def search_page(
    client: httpx.AsyncClient,
    url: str,
    params: dict[str, str] | None = None,
    *,
    strict: bool = False,
) -> Any:
    """A search page's Bundle. ``strict``: the server is asked to refuse a parameter it
    does not support (``Prefer: handling=strict``) instead of ignoring it, which is FHIR's
    default: a server ignoring ``_sort`` pages in its own order, one ignoring ``actor``
    answers with every Appointment it holds. Not on a server's own ``next`` links: all in
    them is its own."""
    headers = {"Prefer": "handling=strict"} if strict else None
    response = await exchange(client, "GET", url, params=params, headers=headers)
    body = response_json(response)
    status = response.status_code
    if status == 403:
        # To one search a 403 is that patient restricted upstream, not our credentials
        # (a 401): the other streams go on (Streams.guarded).
        said = outcome_text(body) or "HTTP 403"
        raise UpstreamError(
            Failure.PERMANENT,
            f"the upstream refused this search: {said}",
            status=status,
            outcome=is_outcome(body),
        )
    if status >= 300:
        refusal = classify_for_resource(
            status,
            body,
            response.headers.get("Retry-After"),
            served=response.headers.get("Date"),
        )
        refusal.status, refusal.outcome = status, is_outcome(body)
        raise refusal
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise UpstreamError(Failure.TRANSIENT, f"HTTP {response.status_code} without a Bundle")
    return body


def check_order(
    rtype: str, resources: list[fhir.FhirJson], since: str | None, overlap_s: float
) -> None:
    """Refuse a page that is not in the order asked for (:func:`order_problem`), before
    anything of it is taken: the stream's cursor stays, and it is counted in
    ``unordered``."""
    why = order_problem(resources, since, overlap_s)
    if why is not None:
        logger.warning("pull of one %s stream: %s", rtype, why)  # words of ours only
        raise Unordered(Failure.PERMANENT, why)


async def next_page(client: httpx.AsyncClient, link: str) -> Any:
    """The page at one of the server's ``next`` links. A refusal of it, or an address
    status, is a refusal of this stream's walk (the other streams go on), not the
    address failing: the server answered this stream's search from its cursor (the page
    that gave the link, or the look-back), and a 404 or 410 to one of its links is its
    search expired, or a proxy not passing its paging on."""
    try:
        return await search_page(client, link)
    except UpstreamError as exc:
        if exc.failure not in REFUSALS:
            raise
        # The status only: the server's words may quote data.
        why = (
            f"the upstream refused a next link of its own (HTTP {exc.status}; its search "
            "expired?): the stream starts again from its cursor on the next pass"
        )
        logger.warning("pull: %s", why)
        raise LinkRefused(Failure.PERMANENT, why, status=exc.status, outcome=exc.outcome) from exc
