"""The checkpoint anchors held upstream: reading them, and holding the local trail to them.

The exporter (:mod:`sync_agent.audit_export`) sends each signed checkpoint up as a
``Provenance``; :func:`fetch_upstream_anchors` reads them all back and
:func:`verify_against_anchors` holds the local chain to them (``appliance audit verify``): a
trail truncated, or rewritten and re-hashed, below an anchor is caught even when the local
checkpoints were removed with it (``appliance/audit.py``, "What is guaranteed").
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance import audit
from appliance.audit import Checkpoint, VerifyResult
from sync_agent.balp import anchor_from_provenance, checkpoint_system
from sync_agent.upstream import (
    Failure,
    UpstreamError,
    as_dict,
    as_list,
    bundle_entries,
    classify_response,
    exchange,
    next_link,
    response_json,
)


def verify_against_anchor(
    conn: sqlite3.Connection, public_key: Ed25519PublicKey, anchor: Checkpoint
) -> VerifyResult:
    """:func:`appliance.audit.verify`, then the local chain against the upstream's anchor.

    The anchor must carry this box's signature, the local trail must reach its record, and
    the (recomputed, so trustworthy) hash there must be the signed one. A trail cut back
    below the anchor, even with its local checkpoints removed and the chain re-hashed, fails.
    """
    return verify_against_anchors(conn, public_key, [anchor])


def verify_against_anchors(
    conn: sqlite3.Connection, public_key: Ed25519PublicKey, anchors: Sequence[Checkpoint]
) -> VerifyResult:
    """:func:`verify_against_anchor` for each of ``anchors``: the first failure, else the
    local verification. Not only the newest: a trail cut back and grown again past the
    newest old anchor is anchored anew, and only the older anchors then tell."""
    for anchor in anchors:  # the signatures first: they cost no walk of the chain
        try:
            public_key.verify(anchor.signature, anchor.message())
        except InvalidSignature:
            return VerifyResult(
                False,
                0,
                0,
                anchor.audit_id,
                f"{_label(anchor)}: signature does not verify (not this box's)",
            )
    local = audit.verify(conn, public_key)
    if not local.ok:
        return local
    for anchor in anchors:
        if local.records < anchor.audit_id:
            return VerifyResult(
                False,
                local.records,
                local.checkpoints,
                local.records + 1,
                f"{_label(anchor)}: the local audit trail ends at record {local.records} "
                "(truncated)",
            )
        row = conn.execute("SELECT hash FROM audit WHERE id = ?", (anchor.audit_id,)).fetchone()
        if row is None or bytes(row[0]) != anchor.hash:
            return VerifyResult(
                False,
                local.records,
                local.checkpoints,
                anchor.audit_id,
                f"{_label(anchor)}: the local chain differs from the signed hash (records up "
                "to it rewritten, or cut back and grown again)",
            )
    return local


def _label(anchor: Checkpoint) -> str:
    return f"upstream anchor (record {anchor.audit_id}, signed {audit.ts_text(anchor.ts)})"


ANCHOR_PAGE = 1000  # anchors asked for per page (a few hundred bytes each)
ANCHOR_PAGES = 500  # pages followed at most: half a million anchors, a year of minutes


async def fetch_upstream_anchors(
    client: httpx.AsyncClient,
    site_id: str,
    *,
    also_known_as: Iterable[str] = (),
    page: int = ANCHOR_PAGE,
    max_pages: int = ANCHOR_PAGES,
) -> list[Checkpoint]:
    """This site's checkpoint anchors upstream, all of them (through the server's ``next``
    links, up to ``max_pages``), by audit id.

    All, not the newest few: the anchors of a chain cut back and grown again scroll out of
    any window of the newest within the hour, one being anchored every minute. Raises
    :class:`UpstreamError` when the server cannot be asked, when a page is not a search
    Bundle (a login page answered 200 read as "no anchors", and the trail passed as intact),
    and when a ``next`` link leaves the upstream (not followed: our credentials would go
    with it; nor read as the end, which would leave the older anchors unchecked).
    """
    params: dict[str, str] | None = {
        "_tag": f"{checkpoint_system(site_id)}|",
        "_sort": "-recorded",
        "_count": str(page),
    }
    url = "Provenance"
    anchors: list[Checkpoint] = []
    for _ in range(max_pages):
        response = await exchange(client, "GET", url, params=params)
        body = response_json(response)
        if response.status_code >= 300:
            raise classify_response(
                response.status_code,
                body,
                response.headers.get("Retry-After"),
                served=response.headers.get("Date"),
            )
        if as_dict(body).get("resourceType") != "Bundle":
            raise UpstreamError(
                Failure.TRANSIENT,
                f"anchor search: HTTP {response.status_code} without a search Bundle",
            )
        anchors += anchors_of(body)
        link = next_link(body, client, also_known_as)
        if link is None and _says_next(body):
            raise UpstreamError(
                Failure.ENDPOINT,
                "anchor search: the next page is not on the upstream (not followed; if "
                "its address is the EHR's own, list it in the upstream's also_known_as); "
                "the anchors were not all read",
            )
        if link is None:
            break
        url, params = link, None
    return sorted(anchors, key=lambda cp: (cp.audit_id, cp.ts))


def _says_next(bundle: Any) -> bool:
    """Whether a search page has a ``next`` link of any kind (see :func:`next_link`)."""
    return any(
        as_dict(link).get("relation") == "next" for link in as_list(as_dict(bundle).get("link"))
    )


def anchors_of(body: Any) -> list[Checkpoint]:
    """The checkpoint anchors in a Provenance search answer, by audit id (what is not one is
    skipped)."""
    anchors = []
    for entry in bundle_entries(body):
        try:
            anchors.append(anchor_from_provenance(entry.get("resource")))
        except ValueError:
            continue
    return sorted(anchors, key=lambda cp: (cp.audit_id, cp.ts))
