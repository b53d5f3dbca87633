"""What a resource looks like on its way upstream: the stored bytes rewritten, or a parsed copy.

The drain sends most resources as the stored JSON with references replaced in place, and
parses only those that need more (:func:`sync_agent.outgoing.outgoing_body`). The two
paths must never disagree: a property test compares them on resources laid out as the store
writes them and otherwise, with references at any depth, strings that quote reference JSON,
and every kind of target. The peer tests show the same on a real server.
"""

from __future__ import annotations

import random
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import fhir
from appliance.store import Store
from sync_agent.outbox_delivery import Deliverer
from sync_agent.outgoing import NO_LOCATION, Item, outgoing_body, outgoing_parsed
from tests import factories
from tests.fhir_peer.peer import FhirPeer
from tests.sync_agent.test_outbox_delivery import reading_from_a_device

LOCAL_IDS = ["01a2-p1", "01a2-p2", "01a2-d1", "x.y-Z9"]
OWN_ID = "01a21cac-1183-7a03-9c5b-ddc1300eb4ec"

# Targets as _upstream_refs answers them; upstream ids with characters JSON must escape.
targets_st = st.dictionaries(
    st.sampled_from([f"{t}/{i}" for t in ("Patient", "Device", "Observation") for i in LOCAL_IDS]),
    st.one_of(
        st.sampled_from(["absent", "dead", NO_LOCATION, None]),
        st.builds(
            lambda t, i: f"{t}/{i}",
            st.sampled_from(["Patient", "Device"]),
            st.text(min_size=1, max_size=12),
        ),
    ),
)

reference_st = st.builds(
    lambda rtype, local_id, display: {
        "reference": f"{rtype}/{local_id}",
        **({"display": display} if display is not None else {}),
    },
    st.sampled_from(["Patient", "Device", "Practitioner", "Observation"]),
    st.sampled_from(LOCAL_IDS),
    st.none() | st.text(max_size=8),
)
# Strings that quote what a reference looks like in JSON must never be taken for one.
tricky_text_st = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            '"reference":"Patient/01a2-p1"',
            '{"reference":"Device/01a2-d1"}',
            ',"meta":{"lastUpdated":"x"}}',
            f'"id":"{OWN_ID}"',
        ]
    ),
)
json_value_st = st.recursive(
    st.one_of(tricky_text_st, st.integers(-(2**53), 2**53), st.booleans(), reference_st),
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3),
        st.dictionaries(st.sampled_from(["a", "note", "performer", "code"]), inner, max_size=3),
    ),
    max_leaves=8,
)


@st.composite
def stored_resources(draw: st.DrawFn) -> bytes:
    """A resource as the store writes it (id, identifier, meta last) or laid out otherwise."""
    body: dict[str, Any] = {"resourceType": "Observation", "status": "final"}
    for key in draw(st.lists(st.sampled_from(["subject", "device", "performer", "note"]))):
        body[key] = draw(json_value_st)
    meta: dict[str, Any] = {}
    if draw(st.booleans()):
        meta["tag"] = [{"system": "urn:x", "code": draw(st.sampled_from(["clinic", "home]"]))}]
    if draw(st.booleans()):
        meta["versionId"] = "3"
    if draw(st.booleans()):
        meta["security"] = [{"system": "urn:x", "code": "R"}]
    meta["lastUpdated"] = "2026-11-27T11:02:48.451135+00:00"
    layout = draw(st.sampled_from(["store", "id first", "shuffled", "no id", "no meta"]))
    own = {
        "id": OWN_ID,
        "identifier": [{"system": fhir.IDENTIFIER_SYSTEM, "value": f"urn:uuid:{OWN_ID}"}],
        "meta": meta,
    }
    if layout == "store":
        body |= own
    elif layout == "id first":
        body = {"id": OWN_ID, **body, "identifier": own["identifier"], "meta": meta}
    elif layout == "shuffled":
        pairs = list((body | own).items())
        random.Random(draw(st.integers(0, 2**16))).shuffle(pairs)
        body = dict(pairs)
    elif layout == "no id":
        body |= {"meta": meta}
    else:
        body |= {"id": OWN_ID}
    return orjson.dumps(body)


def _item(raw: bytes) -> Item:
    return Item(1, 2, 0, OWN_ID, "Observation", raw)


@settings(max_examples=400)
@given(raw=stored_resources(), targets=targets_st)
def test_the_rewritten_bytes_say_exactly_what_the_parsed_copy_says(
    raw: bytes, targets: dict[str, str | None]
) -> None:
    item = _item(raw)
    fast = outgoing_body(item, item.local_refs(), targets)
    parsed = outgoing_parsed(item, targets)
    assert orjson.loads(orjson.dumps(fast)) == parsed
    assert "id" not in parsed
    assert not set(parsed.get("meta", {})) & {"versionId", "lastUpdated"}
    assert parsed.get("meta", {}).get("security") == orjson.loads(raw).get("meta", {}).get(
        "security"
    )


def test_the_common_case_is_not_parsed_and_a_strange_layout_is() -> None:
    body = factories.bp_observation("Patient/01a2-p1")
    stored = orjson.dumps(
        body
        | {
            "id": OWN_ID,
            "identifier": [{"system": fhir.IDENTIFIER_SYSTEM, "value": f"urn:uuid:{OWN_ID}"}],
            "meta": {"lastUpdated": "2026-11-27T11:02:48+00:00"},
        }
    )
    item = _item(stored)
    sent = outgoing_body(item, item.local_refs(), {"Patient/01a2-p1": "Patient/77"})
    assert isinstance(sent, orjson.Fragment)
    assert orjson.loads(orjson.dumps(sent))["subject"] == {"reference": "Patient/77"}
    # A Device the server refused needs its Reference edited: that one is parsed.
    item = _item(stored.replace(b"Patient/01a2-p1", b"Device/01a2-d1"))
    assert isinstance(outgoing_body(item, item.local_refs(), {"Device/01a2-d1": "dead"}), dict)


# -- on the real server ---------------------------------------------------------------------


@pytest.mark.peer
async def test_a_reference_below_the_top_level_waits_for_its_patient_and_is_mapped(
    store: Store, client: httpx.AsyncClient
) -> None:
    [pat] = await store.create([factories.patient()], "user:nurse1")
    reading = factories.bp_observation(f"Patient/{pat.logical_id}")
    reading["performer"] = [{"reference": f"Patient/{pat.logical_id}", "display": "self"}]
    await store.create([reading], "service:devices")
    # One entry per bundle: the reading cannot go before its Patient has an upstream id.
    result = await Deliverer(store, client, max_entries=1, rng=random.Random(1)).drain()
    assert (result.delivered, result.dead) == (2, 0)
    patient_id = (await client.get("Patient")).json()["entry"][0]["resource"]["id"]
    [entry] = (await client.get("Observation")).json()["entry"]
    assert entry["resource"]["subject"] == {"reference": f"Patient/{patient_id}"}
    assert entry["resource"]["performer"] == [
        {"reference": f"Patient/{patient_id}", "display": "self"}
    ]
    # Our id and lastUpdated stayed home: the server chose its own (Medplum keeps a given id
    # in a batch, so this would fail had they been sent).
    [[own]] = [
        [i for i in entry["resource"]["identifier"] if i["system"] == fhir.IDENTIFIER_SYSTEM]
    ]
    assert entry["resource"]["id"] != own["value"].removeprefix("urn:uuid:")


@pytest.mark.peer
async def test_a_reading_whose_device_was_refused_goes_without_the_link(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    reading = await reading_from_a_device(store, "refuse-this-device")
    await store.create([reading], "service:devices")
    fhir_peer.reject("refuse-this-device")
    try:
        result = await Deliverer(store, client, max_entries=1, rng=random.Random(1)).drain()
    finally:
        fhir_peer.reject(None)
    assert (result.delivered, result.dead) == (2, 1)
    [entry] = (await client.get("Observation")).json()["entry"]
    assert entry["resource"]["device"] == {"display": "Kiosk cuff"}
