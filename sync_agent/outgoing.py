"""What an outbox item sends upstream: the stored resource with our references mapped.

An outbox item (:class:`Item`) holds its resource's JSON bytes as the store wrote them. Most
go up as those bytes with each reference to one of ours replaced by the upstream's id and the
server-owned ``id`` and ``meta`` cut (:func:`outgoing_body`): parsing ~1 KB of JSON into dicts
and encoding it again cost more than the rest of the drain's work for the item. What does not
fit (a reference to a resource refused upstream or delivered without a location, a body not
laid out as the store writes it) is parsed and rewritten (:func:`outgoing_parsed`): the same
result, slower. ``tests/sync_agent/test_outgoing.py`` holds the two to the same answers.

Pure functions of the item and the upstream ids (:class:`sync_agent.outbox_queue.OutboxQueue`
finds those); no I/O.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import orjson

from appliance import fhir

# A relative reference, ``Type/id``, as it appears in the compact JSON the store writes:
# perhaps one of ours (:meth:`OutboxQueue._upstream_refs` tells). FHIR ids are
# [A-Za-z0-9\-.]{1,64}, so nothing in one needs escaping, and in valid JSON an unescaped
# `"reference":"` can only be a key with its string value (inside a string every quote is
# escaped): each match is a Reference, at any depth.
_LOCAL_REF = re.compile(rb'"reference":"([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})"')

# The store's server-owned meta, last in the object as the store writes it, with our tags
# (where and how a reading was captured) kept. A server ignores a create's ``id`` and
# ``meta.lastUpdated`` anyway (FHIR R4 RESTful API, *create*); they are dropped so the
# upstream copy carries only what is ours to say.
_STORED_META = re.compile(rb',"meta":\{(?:("tag":\[[^\]]*\]),)?"lastUpdated":"[^"\\]*"\}\}')
_DROP = object()
_SERVER_META = frozenset({"versionId", "lastUpdated"})
# ``targets`` value of a resource delivered without a location: referred to by our identifier.
NO_LOCATION = "delivered-without-location"


class Item(NamedTuple):
    """One pending outbox row with its decrypted resource: the JSON bytes as stored.

    A tuple rather than a frozen dataclass: a drain makes one per item, and a frozen
    dataclass's ``__init__`` (``object.__setattr__`` per field) costs about three times as much.
    """

    outbox_id: int
    lane: int
    attempts: int
    logical_id: str
    type: str
    # Empty when the stored copy failed authentication (a stored resource never is).
    raw: bytes

    @property
    def resource(self) -> fhir.FhirJson:
        """The resource, parsed (a fresh dict at each call)."""
        parsed: fhir.FhirJson = orjson.loads(self.raw)
        return parsed

    @property
    def key(self) -> str:
        """``Type/<logical id>``: how references name this resource here."""
        return f"{self.type}/{self.logical_id}"

    def local_refs(self) -> list[tuple[str, str]]:
        """(type, id) of every relative reference in the resource (ours or not)."""
        return [(t.decode(), i.decode()) for t, i in _LOCAL_REF.findall(self.raw)]


# What goes in an entry's ``resource``: the stored bytes with references rewritten (the
# common case, never parsed), or a parsed copy when it needed more than that.
Outgoing = orjson.Fragment | fhir.FhirJson


def outgoing_body(
    item: Item, refs: list[tuple[str, str]], targets: dict[str, str | None]
) -> Outgoing:
    """The resource as it goes upstream: our references to the upstream's ids, no id/meta.

    Most resources are sent as the stored bytes with each reference replaced in place
    (parsing ~1 KB of JSON into dicts and encoding it again cost more than the rest of the
    agent's work for the item). Whatever does not fit that (a reference to a Device the
    server refused or to a resource delivered without a location, a body not laid out as
    the store writes it) is parsed and rewritten as a dict: same result, slower.
    """
    raw = item.raw
    for rtype, local_id in refs:
        target = targets.get(f"{rtype}/{local_id}")
        if target == "dead" or target == NO_LOCATION:
            return outgoing_parsed(item, targets)
        if target is not None and target != "absent":
            raw = raw.replace(
                b'"reference":"%s/%s"' % (rtype.encode(), local_id.encode()),
                b'"reference":' + orjson.dumps(target),
            )
    cut = raw.rfind(b',"meta":{')
    meta = _STORED_META.fullmatch(raw, cut) if cut > 0 else None
    own_id = b'"id":' + orjson.dumps(item.logical_id)
    at = raw.find(own_id)
    if meta is None or not 0 < at < cut or raw.count(own_id) != 1:
        return outgoing_parsed(item, targets)
    end = at + len(own_id)
    if raw[at - 1] == 0x2C:  # ,"id":"…"
        raw = raw[: at - 1] + raw[end:cut]
    elif at == 1 and raw[end] == 0x2C:  # {"id":"…",
        raw = b"{" + raw[end + 1 : cut]
    else:
        return outgoing_parsed(item, targets)
    tags = meta[1]
    return orjson.Fragment(raw + (b',"meta":{' + tags + b"}}" if tags else b"}"))


def outgoing_parsed(item: Item, targets: dict[str, str | None]) -> fhir.FhirJson:
    body: fhir.FhirJson = _rewrite_references(item.resource, targets)
    # Server-owned meta goes (the version and time are the upstream's to set); the rest is
    # what we, or the hub that sent it, say about the resource: our tags (where and how a
    # reading was captured), its profiles, its security labels (docs/ingest.md).
    meta = body.pop("meta", None)
    if isinstance(meta, dict):
        kept = {k: v for k, v in meta.items() if k not in _SERVER_META}
        if kept:
            body["meta"] = kept
    body.pop("id", None)
    return body


def _rewrite_references(value: Any, targets: dict[str, str | None]) -> Any:
    """``value`` with each Reference to one of ours as the upstream must see it.

    ``targets`` is keyed by the reference (``Type/<local id>``). Delivered: the upstream's
    id. Delivered without a location: by our identifier. Refused upstream (a Device, say):
    the link goes and the rest (its display name) stays; a Reference left empty goes
    altogether. Not ours, or not delivered yet: as it is.
    """
    if isinstance(value, list):
        kept = [new for part in value if (new := _rewrite_references(part, targets)) is not _DROP]
        return _DROP if value and not kept else kept
    if not isinstance(value, dict):
        return value
    out = {}
    for key, part in value.items():
        new = _rewrite_references(part, targets)
        if new is not _DROP:
            out[key] = new
    ref = value.get("reference")
    if isinstance(ref, str) and ref in targets:
        rtype, local_id = ref.split("/", 1)
        target = targets[ref]
        if target == "dead":
            del out["reference"]
            return out or _DROP
        if target == NO_LOCATION:
            del out["reference"]
            out["type"] = rtype
            out["identifier"] = {
                "system": fhir.IDENTIFIER_SYSTEM,
                "value": fhir.identifier_value(local_id),
            }
        elif target is not None and target != "absent":
            out["reference"] = target
    return out
