"""The claims queue page: filters, plain words, actions with CSRF and roles (real store)."""

from __future__ import annotations

import random
import re
import sqlite3
from datetime import datetime
from pathlib import Path
from urllib.parse import urlencode

import pytest
from quart import Response
from quart.testing import QuartClient

from appliance import db, users
from appliance.store import Store
from services.claims.lifecycle import Lifecycle
from services.claims.model import ClaimStatus
from services.claims.service import ClaimsService
from services.claims.x12_read import read
from sync_agent.claims_submit import ClaimsSubmitter
from tests.services.clearinghouse import Clearinghouse, envelope
from tests.services.test_claims import encounter, make_mbi, patient, site_doc
from tests.web.conftest import PASSWORD, FakeClock, form_token, login

ADMIN = "admin1"


async def seed(store: Store) -> dict[str, int]:
    """A draft, a ready claim that went through a 999 reject, one paid less, one in review."""
    config = site_doc(auto_ready=False)
    service = ClaimsService(store, config)
    rng = random.Random(5)
    ids = {}
    for name, day in (("draft", "02"), ("rejected", "03"), ("paid", "04"), ("review", "05")):
        [pat] = await store.create([patient(make_mbi(rng))], "user:test")
        [enc] = await store.create(
            [encounter(pat.logical_id, start=f"2026-03-{day}T10:00:00-06:00")], "user:test"
        )
        decided = await service.on_visit_finished(enc.resource)
        assert decided.claim_id is not None
        ids[name] = decided.claim_id
    life = Lifecycle(service, store)
    house = Clearinghouse(when=datetime(2026, 3, 10, 12, 0))
    rejected = (await service.claim(ids["rejected"])).claim_number
    house.reject_999 = {rejected}
    for name in ("rejected", "paid"):
        await service.transition(ids[name], ClaimStatus.READY, "user:biller")
    batch = await life.take_batch("x12")
    assert batch is not None
    await life.sent(batch.id, "received: HTTP 200")
    await life.apply_response(house._999(read(batch.payload.decode())), "sync:poll")
    paid = (await service.claim(ids["paid"])).claim_number
    house.pay = {paid: 2000}
    house.adjudicate()
    for _kind, text in house.responses:
        await life.apply_response(text, "sync:poll")
    await service.transition(ids["review"], ClaimStatus.READY, "user:biller")
    batch = await life.take_batch("x12")
    assert batch is not None
    await life.ambiguous(batch.id, "no answer: ReadTimeout")
    return ids


@pytest.fixture
async def ids(store: Store, clock: FakeClock) -> dict[str, int]:
    await db.run_sync(
        store.connection, users.create_user, ADMIN, PASSWORD, users.Role.ADMIN, now=clock()
    )
    return await seed(store)


async def test_the_queue_shows_states_answers_and_amounts_in_plain_words(
    logged_in: QuartClient, ids: dict[str, int]
) -> None:
    page = await logged_in.get("/claims/")
    assert page.status_code == 200
    html = (await page.get_data()).decode()
    for word in ("draft", "rejected", "paid", "in review"):
        assert f">{word}</span>" in html
    assert "segment NM1 at position 14 (loop 2010BA): segment has data element errors" in html
    assert "$20.00" in html
    assert "patient $5.92" in html
    assert "no clear answer to the submission" in html
    assert 'href="/claims/"' in html  # the nav link
    assert "<script" not in html
    assert "style=" not in html


async def test_filters_by_status_date_and_payer(
    logged_in: QuartClient, ids: dict[str, int]
) -> None:
    html = (await (await logged_in.get("/claims/?status=paid")).get_data()).decode()
    assert html.count('class="claim-row') == 1
    assert f'data-claim-id="{ids["paid"]}"' in html
    html = (
        await (await logged_in.get("/claims/?since=2026-03-03&until=2026-03-04")).get_data()
    ).decode()
    assert html.count('class="claim-row') == 2
    html = (await (await logged_in.get("/claims/?payer=NOPE")).get_data()).decode()
    assert 'id="no-claims"' in html
    assert (await logged_in.get("/claims/?status=bogus")).status_code == 400


async def test_a_nurse_marks_a_draft_ready_with_csrf(
    logged_in: QuartClient, ids: dict[str, int], store: Store
) -> None:
    page = await logged_in.get(f"/claims/{ids['draft']}")
    token = form_token(await page.get_data())
    refused = await logged_in.post(f"/claims/{ids['draft']}/ready", form={})
    assert refused.status_code in (400, 403)
    done = await logged_in.post(f"/claims/{ids['draft']}/ready", form={"csrf_token": token})
    assert done.status_code == 303
    row = await ClaimsService(store, site_doc()).claim(ids["draft"])
    assert row.status is ClaimStatus.READY
    html = (await (await logged_in.get(f"/claims/{ids['draft']}")).get_data()).decode()
    assert "reviewed in the queue" in html
    assert "nurse1" in html
    # resolving is an admin's decision
    forbidden = await logged_in.post(
        f"/claims/{ids['review']}/resolve",
        form={"csrf_token": token, "as": "ready", "reason": "they never got it"},
    )
    assert forbidden.status_code == 403


async def test_an_admin_resolves_a_claim_in_review_with_a_reason(
    client: QuartClient, ids: dict[str, int], store: Store
) -> None:
    assert await login(client, ADMIN) == 302
    page = await client.get(f"/claims/{ids['review']}")
    html = (await page.get_data()).decode()
    assert 'id="resolve-form"' in html
    token = form_token(html.encode())
    short = await client.post(
        f"/claims/{ids['review']}/resolve", form={"csrf_token": token, "as": "ready", "reason": "x"}
    )
    assert short.status_code == 409
    assert "at least 10 characters" in (await short.get_data()).decode()
    done = await client.post(
        f"/claims/{ids['review']}/resolve",
        form={
            "csrf_token": token,
            "as": "acknowledged",
            "reason": "clearinghouse confirmed receipt",
        },
    )
    assert done.status_code == 303
    row = await ClaimsService(store, site_doc()).claim(ids["review"])
    assert row.status is ClaimStatus.ACKNOWLEDGED
    html = (await (await client.get(f"/claims/{ids['review']}")).get_data()).decode()
    assert "resolved by a person: clearinghouse confirmed receipt" in html


async def test_anonymous_visitors_go_to_the_login_page(client: QuartClient) -> None:
    response = await client.get("/claims/")
    assert response.status_code == 302
    assert "/login" in response.headers["Location"]


async def test_a_claim_that_cannot_be_built_shows_in_the_queue_with_its_reason(
    logged_in: QuartClient, ids: dict[str, int], store: Store, db_path: Path
) -> None:
    service = ClaimsService(store, site_doc(auto_ready=False))
    await service.transition(ids["draft"], ClaimStatus.READY, "user:biller")
    raw = sqlite3.connect(db_path)  # its row and its content disagree: interchange() raises
    with raw:
        raw.execute("UPDATE claims SET form = '837I' WHERE id = ?", (ids["draft"],))
    raw.close()
    # Before: ClaimsError, and the claim stayed ready at the head of the queue.
    assert await Lifecycle(service, store).take_batch("x12") is None
    html = (await (await logged_in.get("/claims/")).get_data()).decode()
    row = html.split(f'data-claim-id="{ids["draft"]}"')[1].split("</tr>")[0]
    assert ">draft</span>" in row
    assert "the claim could not be made into an X12 837 (ValueError) and was not sent" in row


_SEEN = re.compile(r'name="seen" value="([0-9a-f]{64})"')
_FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def _unreadable(html: str) -> str:
    """The list of response files that could not be applied, as the page shows it."""
    return html.split('id="unreadable-responses"')[1].split("</section>")[0]


async def _clear(client: QuartClient, html: str, **fields: str) -> Response:
    """Post the page's clear form as a browser would (its token, the entries it showed)."""
    pairs = [*fields.items()] + [("seen", d) for d in _SEEN.findall(html)]
    return await client.post(
        "/claims/unreadable-responses/clear", data=urlencode(pairs), headers=_FORM
    )


async def _poll_a_bad_835(store: Store) -> None:
    """The sync pass polls the clearinghouse and meets an 835 that does not balance."""
    house = Clearinghouse(when=datetime(2026, 3, 10, 12, 0))
    body = ["835", "BPR*I*10*C", "LX*1", "CLP*Q1*1*31.85*10.00*0*MB*X*11*1", "CAS*CO*45*1.00"]
    house.responses.append(("835", envelope("HP", "005010X221A1", [body], 3, house.when)))
    await house.start()
    try:
        config = site_doc(endpoint_url=house.url)
        service = ClaimsService(store, config, run_pyx12=False)
        result = await ClaimsSubmitter(store, config, service=service).submit(poll=True)
    finally:
        await house.stop()
    assert result.responses == 0
    assert result.errors == [
        "response 1: claim Q1: billed minus adjustments is not the paid amount (the 835 is out "
        "of balance) (kept on the unreadable list)"
    ]


async def test_response_files_that_could_not_be_applied_are_listed_and_an_admin_clears_them(
    client: QuartClient, ids: dict[str, int], store: Store
) -> None:
    assert await login(client, ADMIN) == 302
    html = (await (await client.get("/claims/")).get_data()).decode()
    assert 'id="unreadable-responses"' not in html  # nothing to show
    await _poll_a_bad_835(store)
    html = (await (await client.get("/claims/")).get_data()).decode()
    # Before: only the journal said so; nothing here.
    shown = _unreadable(html)
    assert "1 file from the clearinghouse changed nothing" in shown
    [row] = shown.split("<tbody>")[1].split("</tbody>")[0].split("</tr>")[:-1]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
    assert cells[:2] == ["<code>1</code>", "835"]
    assert cells[2] == (
        "claim Q1: billed minus adjustments is not the paid amount (the 835 is out of balance)"
    )
    life = Lifecycle(ClaimsService(store, site_doc()), store)
    [kept] = await life.unreadable_responses()
    assert cells[3] == kept.at[:19].replace("T", " ")  # UTC, to the second
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", cells[3])
    assert "Clear the list" in shown
    # Another bad file comes in while the admin reads the page: clearing leaves it alone.
    await life.note_unreadable("2", "999", "999: AK9 is missing", "ISA*later~")
    done = await _clear(client, html, csrf_token=form_token(html.encode()))
    assert done.status_code == 303
    assert done.location == "/claims/?cleared=1"
    html = (await (await client.get(done.location)).get_data()).decode()
    assert "1 response file taken off the list" in html
    assert [u.source_id for u in await life.unreadable_responses()] == ["2"]
    assert "<code>2</code>" in _unreadable(html)
    [(actor, detail)] = await store.query(
        "SELECT actor, detail FROM audit WHERE detail LIKE 'unreadable claims response%'"
    )
    assert (actor, detail) == (
        f"user:{ADMIN}",
        "unreadable claims response files: list cleared (1: 1)",
    )
    done = await _clear(client, html, csrf_token=form_token(html.encode()))
    html = (await (await client.get(done.location)).get_data()).decode()
    assert await life.unreadable_responses() == ()
    assert 'id="unreadable-responses"' not in html


async def test_clearing_the_list_of_response_files_needs_the_csrf_token_and_an_admin(
    client: QuartClient, ids: dict[str, int], store: Store
) -> None:
    await _poll_a_bad_835(store)
    life = Lifecycle(ClaimsService(store, site_doc()), store)
    assert await login(client) == 302  # a nurse sees the list, and cannot clear it
    html = (await (await client.get("/claims/")).get_data()).decode()
    shown = _unreadable(html)
    assert "(the 835 is out of balance)" in shown
    assert "Clear the list" not in shown
    assert "An admin clears the list" in shown
    token = form_token(html.encode())
    [digest] = [u.digest for u in await life.unreadable_responses()]
    nurse = await client.post(
        "/claims/unreadable-responses/clear",
        data=urlencode({"csrf_token": token, "seen": digest}),
        headers=_FORM,
    )
    assert nurse.status_code == 403
    await client.post("/logout", form={"csrf_token": token})
    assert await login(client, ADMIN) == 302
    html = (await (await client.get("/claims/")).get_data()).decode()
    forged = await _clear(client, html)  # another site's form: no token
    assert forged.status_code == 403
    wrong = await _clear(client, html, csrf_token=token)  # the nurse's session's token
    assert wrong.status_code == 403
    assert len(await life.unreadable_responses()) == 1
    assert await store.query(
        "SELECT count(*) FROM audit WHERE detail LIKE 'unreadable claims response%'"
    ) == [(0,)]
