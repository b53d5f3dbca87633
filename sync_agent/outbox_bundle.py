"""A delivery's batch Bundle on the wire: the request made of the items, its answer read
entry by entry.

One entry per item, a conditional create (:func:`bundle`). Entry *k* of the answer is item
*k*'s (an answer not one entry each is :class:`UnmatchedAnswer`); a 2xx names the resource
made or found (:func:`entry_ref`), an answer that says nothing against the item is sent
again with its reason (:func:`not_taken`), and a bundle failing as a whole may be one
entry's doing (:func:`may_be_an_entry`). Pure: no I/O (:mod:`sync_agent.outbox_delivery`
sends and records).
"""

from __future__ import annotations

import re
from typing import Any

from appliance import fhir
from sync_agent.outgoing import Item, Outgoing
from sync_agent.upstream import Failure, UpstreamError, entry_answer, entry_outcome

# What an entry's answer may name as the resource it made or found: ``Type/id``, FHIR's shapes.
_UPSTREAM_REF = re.compile(r"[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}")


class UnmatchedAnswer(UpstreamError):
    """A bundle's answer whose entries cannot be matched to the items sent (not one each)."""

    __slots__ = ()


def bundle(entries: list[tuple[Item, Outgoing]]) -> dict[str, Any]:
    """The batch Bundle of these entries: each a conditional create of its item."""
    return {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": body,
                "request": {
                    "method": "POST",
                    "url": item.type,
                    "ifNoneExist": f"identifier={fhir.IDENTIFIER_SYSTEM}|{fhir.identifier_value(item.logical_id)}",
                },
            }
            for item, body in entries
        ],
    }


def entry_ref(entry: Any, rtype: str) -> str | None:
    """``<rtype>/id`` of what an entry created or found: from its location, else its resource.

    Only a reference of the item's own type with an id counts: an OperationOutcome in the
    entry, a resource without an id, or a location whose last segments are not
    ``<rtype>/<id>`` (``https://ehr/Fhir/123``) name nothing, and were taken for the
    resource's upstream id (``OperationOutcome/None``, ``Fhir/123``) that everything pointing
    at it was then sent with. None when nothing does (the item is delivered all the same;
    what refers to it is then sent by our identifier, see :func:`~sync_agent.outgoing.outgoing_body`).
    """
    location = entry_answer(entry).get("location")
    if isinstance(location, str) and location:
        head, sep, rid = location.split("/_history", 1)[0].rpartition("/")
        ref = f"{head.rpartition('/')[2]}/{rid}"
        if sep and ref.startswith(f"{rtype}/") and _UPSTREAM_REF.fullmatch(ref):
            return ref
    resource = entry.get("resource") if isinstance(entry, dict) else None
    if isinstance(resource, dict) and resource.get("resourceType") == rtype:
        found = resource.get("id")
        if isinstance(found, str) and _UPSTREAM_REF.fullmatch(f"{rtype}/{found}"):
            return f"{rtype}/{found}"
    return None


def may_be_an_entry(exc: UpstreamError) -> bool:
    """Whether a bundle's failure as a whole may be one entry's doing, so that bisecting it
    finds the entry: the server, or a filter in front of it, answered 5xx or 403 without a
    ``Retry-After`` (a server that throws on one resource, a WAF that refuses one), an
    answer that cannot be matched to the entries, or none at all once the request went.
    Not a connection that could not be made, our credentials (401, 407), a pause asked
    for (429, ``Retry-After``), or an address that does not take the request."""
    if exc.retry_after_s is not None:
        return False
    if exc.failure is Failure.AMBIGUOUS or isinstance(exc, UnmatchedAnswer):
        return True
    return exc.status is not None and (exc.status == 403 or exc.status >= 500)


def not_taken(entry: Any, code: int) -> str:
    """Why an entry is sent again (an answer that says nothing against the item: our access,
    "later", a 5xx, none at all), in the server's words when it gave any. Sealed when stored,
    as a dead letter's message is: those words may quote what was sent."""
    head = f"entry HTTP {code}" if code else "entry answer missing"
    said = entry_outcome(entry, code)
    return head if said == f"HTTP {code}" else f"{head}: {said}"
