"""Which upstream version an edit goes on: what the EHR holds against what this box sent.

:mod:`sync_agent.updates` sends a person's edit as ``PUT`` with ``If-Match`` on the version it
was based on. When that version is not known, or the EHR answers 412, these tell whether
the EHR's copy is one this box made — our create (:func:`created_content`), or our own
earlier ``PUT`` whose answer was lost (:func:`ours_after`, from the (version, keyed digest)
pairs :func:`note_sending` keeps before each ``PUT``) — or someone else's change, which a
nurse reviews. Content is compared without what the server owns (:func:`content`).
"""

from __future__ import annotations

import logging
import re
import sqlite3
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from appliance import db, fhir
from appliance.errors import TamperedDataError
from appliance.store import HISTORY_LABEL, Store, link_for_resource, rewrite_references

logger = logging.getLogger(__name__)

SENT_KEPT = 8  # digests of the bodies an update row sent (outbox.sent), newest last


def content(resource: Any) -> Any:
    """A resource without what the server owns (id, meta, narrative): for "same version?"."""
    if not isinstance(resource, dict):
        return resource
    return {k: v for k, v in resource.items() if k not in ("id", "meta", "text")}


def version_of(resource: Any, response: httpx.Response | None = None) -> str | None:
    meta = resource.get("meta") if isinstance(resource, dict) else None
    version = meta.get("versionId") if isinstance(meta, dict) else None
    if isinstance(version, str):
        return version
    etag = None if response is None else response.headers.get("ETag")
    if etag:
        return str(etag).removeprefix("W/").strip('"')
    return None


# FHIR's id and version id: [A-Za-z0-9\-.]{1,64}.
_HISTORY_ID = re.compile(r"/_history/([A-Za-z0-9\-.]{1,64})/?")


def version_in_location(response: httpx.Response, ref: str) -> str | None:
    """The version a write's ``Location`` or ``Content-Location`` names
    (``…/<Type>/<id>/_history/<version>``), when it names ``ref``: where a server that
    answers a PUT with no body and no ETag still says which version it made."""
    for header in ("Location", "Content-Location"):
        # Absolute or relative ("Patient/1/_history/2"): the path, from a slash.
        path = "/" + urlsplit(response.headers.get(header, "")).path.lstrip("/")
        at = path.rfind(f"/{ref}/_history/")
        found = _HISTORY_ID.fullmatch(path, at + 1 + len(ref)) if at >= 0 else None
        if found is not None:
            return found[1]
    return None


def sent_pairs(value: Any) -> list[tuple[str, str]]:
    """``outbox.sent`` as (base version, digest) pairs (empty for NULL or anything else)."""
    try:
        found = orjson.loads(value) if isinstance(value, str) else None
    except orjson.JSONDecodeError:
        return []
    if not isinstance(found, list):
        return []
    return [
        (pair[0], pair[1])
        for pair in found
        if isinstance(pair, list) and len(pair) == 2 and all(isinstance(part, str) for part in pair)
    ]


def digest(store: Store, resource: Any) -> str:
    """A keyed digest of a resource's content (:func:`content`), for ``outbox.sent``:
    keyed, as the content is a patient's (like the blind indexes)."""
    canonical = orjson.dumps(content(resource), option=orjson.OPT_SORT_KEYS).decode()
    return store.keyring.blind("update-sent", canonical).hex()


def note_sending(conn: sqlite3.Connection, outbox_id: int, base: str, body: str) -> None:
    """Before a PUT: the version it goes on becomes the row's ``if_match`` (the base of
    its edit, as a review shows it), and (that version, ``body``: its body's :func:`digest`)
    joins ``sent``."""
    with db.transaction_sync(conn):
        found = conn.execute("SELECT sent FROM outbox WHERE id = ?", (outbox_id,)).fetchone()
        sent = [
            pair for pair in sent_pairs(None if found is None else found[0]) if pair != (base, body)
        ]
        conn.execute(
            "UPDATE outbox SET if_match = ?, sent = ? WHERE id = ? AND state = 'pending'",
            (base, orjson.dumps([*sent, (base, body)][-SENT_KEPT:]).decode(), outbox_id),
        )


def ours_after(
    conn: sqlite3.Connection, outbox_id: int, resource_id: int, base: str | None
) -> set[str]:
    """Digests of what this box PUT that the upstream's version after ``base`` may be, its
    answer lost (``outbox.sent``):

    * on a known ``base``: what this row sent on that very version. Nothing else: a body
      sent on another version, or by another row (delivered, refused, reviewed), may have
      been put back by someone at the EHR since (an undo of their change, "take theirs"
      followed by their own edit), and taking it for ours would overwrite their change;
    * on none (the last PUT of the resource was answered with no version, and no pull has
      brought one since): what that delivered PUT sent last.
    """
    if base is not None:
        found = conn.execute("SELECT sent FROM outbox WHERE id = ?", (outbox_id,)).fetchone()
        pairs = sent_pairs(None if found is None else found[0])
        return {sent for on, sent in pairs if on == base}
    last = conn.execute(
        "SELECT sent FROM outbox WHERE resource_id = ? AND kind = 'update' "
        "AND state = 'delivered' ORDER BY delivered_at DESC, id DESC LIMIT 1",
        (resource_id,),
    ).fetchone()
    pairs = sent_pairs(None if last is None else last[0])
    return {pairs[-1][1]} if pairs else set()


def created_content(
    conn: sqlite3.Connection, store: Store, resource_id: int, resource: fhir.FhirJson
) -> Any:
    """The content (:func:`content`) of what this resource's create sent, its references
    as the upstream knows them; None when not made here, or not certain.

    The create sends the resource as stored when it goes. That is the version made here
    when no edit replaced it until the create was delivered (its first version in
    ``resource_history`` replaced after ``delivered_at``, or no history at all); after an
    edit before then (made offline, say), the create may have sent either: None.
    """
    create = conn.execute(
        "SELECT delivered_at FROM outbox WHERE resource_id = ? AND kind = 'create' "
        "AND state = 'delivered' ORDER BY id LIMIT 1",
        (resource_id,),
    ).fetchone()
    if create is None or create[0] is None:
        return None
    first = conn.execute(
        "SELECT id, replaced_at, body FROM resource_history WHERE resource_id = ? "
        "ORDER BY id LIMIT 1",
        (resource_id,),
    ).fetchone()
    if first is None:
        made: Any = resource
    elif str(first[1]) <= str(create[0]):
        return None
    else:
        keyring = store.current_keyring(conn)
        try:
            made = orjson.loads(keyring.unseal(HISTORY_LABEL, str(first[0]), bytes(first[2])))
        except (TamperedDataError, orjson.JSONDecodeError):
            logger.warning(
                "resource_history row %s could not be read; what the create of resource "
                "row %s sent is unknown, and the conflict read decides its update",
                first[0],
                resource_id,
            )
            return None
    return content(rewrite_references(made, lambda ref: to_upstream(conn, ref)))


def to_upstream(conn: sqlite3.Connection, ref: str) -> str | None:
    """``<Type>/<local id>`` → the upstream reference of that resource, when it has one."""
    row = conn.execute(
        "SELECT id FROM resources WHERE logical_id = ? AND type = ?",
        (ref.partition("/")[2], ref.partition("/")[0]),
    ).fetchone()
    link = None if row is None else link_for_resource(conn, int(row[0]))
    return None if link is None else link.upstream_ref
