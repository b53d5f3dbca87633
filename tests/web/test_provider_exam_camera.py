"""The remote provider's exam-camera controls: a still and the live camera through the link.

As tests/web/test_exam_still.py and test_exam_stream.py: the web app on a real store file,
the devices process's real workers on a second connection to it, libav's test pattern in
place of /dev/video0. The provider is a second browser of the same app that joined by the
visit link the nurse issued (tests/web/test_provider.py), and takes a still or shows a camera
only once it is in the visit's call, admitted by the nurse: both pages' signalling over the
app's WebSocket routes, as tests/web/test_video_ws.py.
"""

from __future__ import annotations

import base64
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from quart.testing import QuartClient

from appliance import visit_links
from appliance.config import Config
from appliance.store import Store
from tests import factories
from tests.e2e.live_server import still_worker, stream_worker
from tests.video.peers import wait_for
from tests.video.test_service import Client, flowing
from tests.web.conftest import ORIGIN, FakeClock, Peer, admit, both_in, form_token
from tests.web.test_exam_still import CAMERA, _nurse, nurse_account, seeded  # noqa: F401
from tests.web.test_provider import Seeded, issue_link, join, seed, visit_csrf
from web.app import AppState
from web.provider import GUESSES
from web.video import NOT_ADMITTED


def _rows(db_path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _nothing_asked(db_path: Path) -> tuple[object, ...]:
    """What a refused request must leave as it was: requests, streams, resources, outbox."""
    return tuple(
        _rows(db_path, f"SELECT count(*) FROM {table}")[0][0]
        for table in ("camera_requests", "camera_streams", "resources", "outbox")
    )


async def _provider(nurse: QuartClient, encounter_id: str) -> tuple[QuartClient, str, str, str]:
    """A second browser joined by a link the nurse issued: (browser, token, form token,
    the link's actor)."""
    token = await issue_link(nurse, encounter_id)
    provider: QuartClient = nurse.app.test_client()  # type: ignore[assignment]
    csrf = visit_csrf(await join(provider, token))
    state: AppState = nurse.app.extensions["appliance"]
    [(link_id,)] = await state.store.query(
        "SELECT id FROM visit_links WHERE encounter_id = ? ORDER BY id DESC LIMIT 1",
        (encounter_id,),
    )
    return provider, token, csrf, f"provider-link:{link_id}"


@contextlib.asynccontextmanager
async def _in_the_call(
    nurse: QuartClient, provider: QuartClient, token: str, visit: str, *, admitted: bool = True
) -> AsyncIterator[tuple[Peer, Peer, str]]:
    """The nurse's and the provider's pages in the visit's call over the app's signalling
    WebSockets, the provider admitted by the nurse (or, ``admitted=False``, left in the
    waiting room): (the nurse's page, the provider's, the provider's participant id)."""
    nurse_csrf = form_token(await (await nurse.get("/mfa/")).get_data())
    async with (
        nurse.websocket("/video/ws", headers=ORIGIN) as nurse_ws,
        provider.websocket(f"/visit/{token}/video", headers=ORIGIN) as provider_ws,
    ):
        nurse_page, provider_page = Peer(nurse_ws), Peer(provider_ws)
        provider_id = await both_in(nurse_page, provider_page, visit, nurse_csrf, token)
        if admitted:
            await admit(nurse_page, provider_page, provider_id)
        yield nurse_page, provider_page, provider_id


async def test_the_provider_takes_a_still_of_their_own_visit(
    config: Config,
    store: Store,
    clock: FakeClock,
    seeded: Seeded,  # noqa: F811
    db_path: Path,
    kek_path: Path,
    nurse_account: None,  # noqa: F811
) -> None:
    stranger = await seed(store, clock, factories.patient(family="Zzstill"))
    async with (
        _nurse(config, store, clock) as nurse,
        still_worker(db_path, kek_path, config.exam_cameras, clock=clock),
    ):
        provider, token, csrf, actor = await _provider(nurse, seeded.encounter_id)
        page = await (await provider.get(f"/visit/{token}")).get_data()
        assert f'data-url="/visit/{token}/video/still"'.encode() in page
        assert f'data-camera="{CAMERA}"'.encode() in page
        assert f'data-visit-csrf="{csrf}"'.encode() in page
        async with _in_the_call(nurse, provider, token, seeded.encounter_id):
            # A visit named in the form is not the link's: it is ignored, never acted on.
            form = {"camera": CAMERA, "visit_csrf": csrf, "visit": stranger.encounter_id}
            answer = await provider.post(f"/visit/{token}/video/still", form=form)
            assert answer.status_code == 200, await answer.get_data()
            media_id = (await answer.get_json())["media"]
            unknown = {**form, "camera": "no such camera"}
            path = f"/visit/{token}/video/still"
            assert (await provider.post(path, form=unknown)).status_code == 404
    media = await store.read("Media", media_id, "user:test")
    assert media["subject"] == {"reference": f"Patient/{seeded.patient_id}"}
    assert media["encounter"] == {"reference": f"Encounter/{seeded.encounter_id}"}
    assert media["deviceName"] == CAMERA
    jpeg = base64.b64decode(media["content"]["data"])
    assert jpeg[:2] == b"\xff\xd8"
    # Asked, stored and audited under the link's actor; encrypted at rest; queued for the EHR.
    assert _rows(
        db_path, "SELECT state, media_id, requested_by, encounter_id FROM camera_requests"
    ) == [("done", media_id, actor, seeded.encounter_id)]
    raw = b"".join(row[0] for row in _rows(db_path, "SELECT body FROM resources"))  # type: ignore[misc]
    assert jpeg[100:164] not in raw
    assert media["content"]["data"][200:264].encode() not in raw
    audited = await store.query(
        "SELECT actor, action, patient_key FROM audit WHERE entity = ?", (f"Media/{media_id}",)
    )
    assert audited[0][:2] == (actor, "create")
    assert audited[0][2] == store.patient_key(f"Patient/{seeded.patient_id}")
    outbox = _rows(
        db_path,
        "SELECT o.state FROM outbox o JOIN resources r ON r.id = o.resource_id "
        f"WHERE r.logical_id = '{media_id}'",
    )
    assert outbox == [("pending",)]
    # The stranger's visit got nothing.
    assert await store.query(
        "SELECT count(*) FROM camera_requests WHERE encounter_id = ?", (stranger.encounter_id,)
    ) == [(0,)]


async def _refused_before_admission(
    provider: QuartClient, token: str, csrf: str, stage: str
) -> None:
    """Both the still and the camera's start answer 409 with the page's message."""
    for route, extra in (("still", {}), ("camera", {"action": "start"})):
        form = {"camera": CAMERA, "visit_csrf": csrf, **extra}
        answer = await provider.post(f"/visit/{token}/video/{route}", form=form)
        assert answer.status_code == 409, (stage, route, await answer.get_data())
        assert await answer.get_json() == {"error": NOT_ADMITTED}, (stage, route)


def _media_rows(db_path: Path) -> int:
    [(count,)] = _rows(db_path, "SELECT count(*) FROM resources WHERE type = 'Media'")
    assert isinstance(count, int)
    return count


async def test_a_provider_not_admitted_to_the_call_gets_no_still_and_no_camera(
    config: Config,
    store: Store,
    clock: FakeClock,
    seeded: Seeded,  # noqa: F811
    db_path: Path,
    kek_path: Path,
    nurse_account: None,  # noqa: F811
) -> None:
    """The link and its form token are good, but the waiting room is the nurse's say over
    when the provider is with the patient: no still and no camera until the nurse admits the
    provider's seat in the call, and none again after the provider left it. Refused before
    anything is asked: no request, no stream, no Media; the devices process never opens the
    camera."""
    async with (
        _nurse(config, store, clock) as nurse,
        still_worker(db_path, kek_path, config.exam_cameras, clock=clock) as stills,
        stream_worker(db_path, kek_path, config.exam_cameras, clock=clock) as streams,
    ):
        provider, token, csrf, actor = await _provider(nurse, seeded.encounter_id)
        before, media_before = _nothing_asked(db_path), _media_rows(db_path)
        # The visit page open, not in the call at all (no signalling connection).
        await _refused_before_admission(provider, token, csrf, "not in the call")
        # Stopping only takes the exam room's picture away: it is answered (nothing shown).
        stop = {"camera": CAMERA, "action": "stop", "visit_csrf": csrf}
        stopped = await provider.post(f"/visit/{token}/video/camera", form=stop)
        assert await stopped.get_json() == {"stopped": 0, "camera": CAMERA}
        async with _in_the_call(nurse, provider, token, seeded.encounter_id, admitted=False) as (
            nurse_page,
            provider_page,
            provider_id,
        ):
            # In the call, in the waiting room.
            await _refused_before_admission(provider, token, csrf, "in the waiting room")
            assert _nothing_asked(db_path) == before
            assert _media_rows(db_path) == media_before
            assert (stills.taken, stills.failed, streams.started, streams.failed) == (0, 0, 0, 0)

            # Admitted by the nurse, the same browser's still is taken.
            await admit(nurse_page, provider_page, provider_id)
            form = {"camera": CAMERA, "visit_csrf": csrf}
            answer = await provider.post(f"/visit/{token}/video/still", form=form)
            assert answer.status_code == 200, await answer.get_data()
            assert _media_rows(db_path) == media_before + 1

            # Out of the call again: refused again.
            await provider_page.send(type="leave")
            await nurse_page.expect("left", participant=provider_id)
            await _refused_before_admission(provider, token, csrf, "left the call")
        assert _media_rows(db_path) == media_before + 1
        assert (stills.taken, streams.started) == (1, 0)
    # Each refusal is audited as denied under the link's actor, the visit and the patient.
    denied = await store.query(
        "SELECT action, patient_key, entity, detail FROM audit "
        "WHERE actor = ? AND outcome = 'denied' ORDER BY id",
        (actor,),
    )
    key = store.patient_key(f"Patient/{seeded.patient_id}")
    refusals = [
        (
            "read",
            key,
            f"Encounter/{seeded.encounter_id}",
            f"video: exam {what} refused, not admitted to the call",
        )
        for what in ("still", "camera")
    ]
    assert denied == refusals * 3


async def test_another_link_admitted_to_the_visit_does_not_let_this_one_in(
    config: Config,
    store: Store,
    clock: FakeClock,
    seeded: Seeded,  # noqa: F811
    db_path: Path,
    kek_path: Path,
    nurse_account: None,  # noqa: F811
) -> None:
    """Admission is the seat's, held to the link that joined: a second link of the same
    visit, admitted, does not open the cameras to the first."""
    async with (
        _nurse(config, store, clock) as nurse,
        still_worker(db_path, kek_path, config.exam_cameras, clock=clock) as stills,
    ):
        provider, token, csrf, _actor = await _provider(nurse, seeded.encounter_id)
        colleague, colleague_token, _csrf, _b = await _provider(nurse, seeded.encounter_id)
        before = _nothing_asked(db_path)
        async with _in_the_call(nurse, colleague, colleague_token, seeded.encounter_id):
            await _refused_before_admission(provider, token, csrf, "another link admitted")
        assert _nothing_asked(db_path) == before
    assert stills.taken == 0


async def test_a_refused_link_asks_for_nothing(
    config: Config,
    store: Store,
    clock: FakeClock,
    seeded: Seeded,  # noqa: F811
    db_path: Path,
    kek_path: Path,
    nurse_account: None,  # noqa: F811
) -> None:
    """No CSRF token, a wrong one, another link's, another visit's link, another browser, a
    link not joined yet, an unknown token, a staff session, a withdrawn or expired link:
    refused before anything is asked, and no worker ever sees a request."""
    other = await seed(store, clock, factories.patient(family="Zzcamera"))
    async with (
        _nurse(config, store, clock) as nurse,
        still_worker(db_path, kek_path, config.exam_cameras, clock=clock) as worker,
    ):
        provider, token, csrf, actor = await _provider(nurse, seeded.encounter_id)
        # A link of another visit, bound to a browser of its own.
        provider_b, other_token, other_csrf, actor_b = await _provider(nurse, other.encounter_id)
        unjoined = await issue_link(nurse, other.encounter_id)  # nobody pressed Join yet
        stranger: QuartClient = nurse.app.test_client()  # type: ignore[assignment]
        before = _nothing_asked(db_path)
        for route, extra in (("still", {}), ("camera", {"action": "start"})):
            path = f"/visit/{token}/video/{route}"
            good = {"camera": CAMERA, **extra}
            refusals = [
                (provider, path, good, 403),  # no CSRF token
                (provider, path, {**good, "visit_csrf": "0" * 64}, 403),  # a wrong one
                (provider, path, {**good, "visit_csrf": other_csrf}, 403),  # another link's
                # Another visit's link, from a browser it is not bound to.
                (
                    provider,
                    f"/visit/{other_token}/video/{route}",
                    {**good, "visit_csrf": csrf},
                    403,
                ),
                (stranger, path, {**good, "visit_csrf": csrf}, 403),  # another browser
                (provider, f"/visit/{unjoined}/video/{route}", {**good, "visit_csrf": csrf}, 403),
                (provider, f"/visit/{'x' * 43}/video/{route}", {**good, "visit_csrf": csrf}, 404),
                (nurse, path, {**good, "visit_csrf": csrf}, 403),  # a staff session is not it
            ]
            for browser, url, form, status in refusals:
                answer = await browser.post(url, form=form)
                assert answer.status_code == status, (url, form, answer.status_code)
        # A link withdrawn by the clinic (the visit is not live through it any more).
        page = await (await nurse.get("/visit/new")).get_data()
        link_id = actor.removeprefix("provider-link:")
        revoked = await nurse.post(
            f"/visit/links/{link_id}/revoke", form={"csrf_token": form_token(page)}
        )
        assert revoked.status_code == 303
        for route in ("still", "camera"):
            answer = await provider.post(
                f"/visit/{token}/video/{route}",
                form={"camera": CAMERA, "action": "start", "visit_csrf": csrf},
            )
            assert answer.status_code == 403
        # A link past its two hours.
        clock.advance(visit_links.LINK_TTL.total_seconds() + 1)
        for route in ("still", "camera"):
            answer = await provider_b.post(
                f"/visit/{other_token}/video/{route}",
                form={"camera": CAMERA, "action": "start", "visit_csrf": other_csrf},
            )
            assert answer.status_code == 403
        assert _nothing_asked(db_path) == before
    assert (worker.taken, worker.failed) == (0, 0)
    # Refusals of a known link are audited as denied under its actor, with no patient data.
    denied = await store.query(
        "SELECT detail FROM audit WHERE actor = ? AND outcome = 'denied'", (actor,)
    )
    assert ("video: visit link revoked",) in denied
    assert ("video: visit link expired",) in await store.query(
        "SELECT detail FROM audit WHERE actor = ? AND outcome = 'denied'", (actor_b,)
    )
    assert ("video: another browser refused",) in await store.query(
        "SELECT detail FROM audit WHERE outcome = 'denied'"
    )


async def test_unknown_tokens_count_against_the_guess_throttle(
    config: Config,
    store: Store,
    clock: FakeClock,
    seeded: Seeded,  # noqa: F811
    nurse_account: None,  # noqa: F811
) -> None:
    async with _nurse(config, store, clock) as nurse:
        provider, token, csrf, _actor = await _provider(nurse, seeded.encounter_id)
        guesser = {"client": ("10.9.8.7", 40000)}
        form = {"camera": CAMERA, "visit_csrf": csrf}
        for n in range(GUESSES):
            route = ("still", "camera")[n % 2]
            guessed = await provider.post(
                f"/visit/guessedtoken{n:020d}/video/{route}", form=form, scope_base=guesser
            )
            assert guessed.status_code == 404
        # From that address even the real link now waits; from another it works.
        throttled = await provider.post(
            f"/visit/{token}/video/still",
            form={**form, "camera": "no such camera"},
            scope_base=guesser,
        )
        assert throttled.status_code == 429
        reached = await provider.post(
            f"/visit/{token}/video/still", form={**form, "camera": "no such camera"}
        )
        assert reached.status_code == 409  # past the link and the token: not in the call


@pytest.mark.usefixtures("loopback")
async def test_the_provider_shows_the_camera_in_their_visit_and_stops_it(
    config: Config,
    store: Store,
    clock: FakeClock,
    seeded: Seeded,  # noqa: F811
    db_path: Path,
    kek_path: Path,
    nurse_account: None,  # noqa: F811
) -> None:
    other = await seed(store, clock, factories.patient(family="Zzcamera"))
    async with (
        _nurse(config, store, clock) as nurse,
        stream_worker(db_path, kek_path, config.exam_cameras, clock=clock),
    ):
        provider, token, csrf, actor = await _provider(nurse, seeded.encounter_id)
        other_provider, other_token, other_csrf, _b = await _provider(nurse, other.encounter_id)
        page = await (await provider.get(f"/visit/{token}")).get_data()
        assert f'data-stream-url="/visit/{token}/video/camera"'.encode() in page
        assert f"Show {CAMERA} in the visit".encode() in page
        state: AppState = nurse.app.extensions["appliance"]
        # A second nurse's page, with media (aiortc), to see the camera's frames.
        in_visit = Client(state.video, "a nurse's page with media")
        try:
            async with _in_the_call(nurse, provider, token, seeded.encounter_id):
                await in_visit.send(type="join", visit=seeded.encounter_id, role="nurse", token="t")
                path = f"/visit/{token}/video/camera"
                form = {"camera": CAMERA, "action": "start", "visit_csrf": csrf}
                for bad in ({"camera": "no such camera"}, {"action": "record"}):
                    assert (await provider.post(path, form={**form, **bad})).status_code == 404
                started = await provider.post(path, form=form)
                assert started.status_code == 200, await started.get_data()
                camera = (await started.get_json())["participant"]
                told = in_visit.last("participant", participant=camera)
                assert (told["role"], told["label"]) == ("camera", CAMERA)
                await flowing(in_visit.video, camera, 10)
                assert _rows(
                    db_path, "SELECT state, requested_by, encounter_id FROM camera_streams"
                ) == [("live", actor, seeded.encounter_id)]
                # Another visit's provider cannot stop it: their link's visit is not this one.
                elsewhere = await other_provider.post(
                    f"/visit/{other_token}/video/camera",
                    form={"camera": CAMERA, "action": "stop", "visit_csrf": other_csrf},
                )
                assert (await elsewhere.get_json()) == {"stopped": 0, "camera": CAMERA}
                assert _rows(db_path, "SELECT state FROM camera_streams") == [("live",)]
                # This visit's page, loaded now, offers to stop it; the other visit's does not.
                page = await (await provider.get(f"/visit/{token}")).get_data()
                assert (
                    f'data-stream="{CAMERA}" data-showing="true">Stop showing it'.encode() in page
                )
                page = await (await other_provider.get(f"/visit/{other_token}")).get_data()
                assert f'data-showing="false">Show {CAMERA} in the visit'.encode() in page

                stopped = await provider.post(path, form={**form, "action": "stop"})
                assert (await stopped.get_json()) == {"stopped": 1, "camera": CAMERA}
                in_visit.last("left", participant=camera)
                await wait_for(
                    lambda: _rows(db_path, "SELECT state FROM camera_streams") == [("stopped",)],
                    10,
                    "the camera stopped",
                )
        finally:
            await in_visit.close()


async def test_a_staff_session_in_the_same_browser_also_needs_its_own_token(
    config: Config,
    store: Store,
    clock: FakeClock,
    seeded: Seeded,  # noqa: F811
    nurse_account: None,  # noqa: F811
) -> None:
    """The nurse's own browser joins as the provider: its session's CSRF token is asked as on
    every POST of the app (the page's meta tag, sent by exam_camera.js as X-CSRF-Token)."""
    async with _nurse(config, store, clock) as nurse:
        token = await issue_link(nurse, seeded.encounter_id)
        page = await join(nurse, token)
        session_token = form_token(page)
        assert f'<meta name="csrf-token" content="{session_token}">'.encode() in page
        form = {"camera": "no such camera", "action": "start", "visit_csrf": visit_csrf(page)}
        for route in ("still", "camera"):
            path = f"/visit/{token}/video/{route}"
            assert (await nurse.post(path, form=form)).status_code == 403
            # Past both tokens: the link's provider is not in the call, the view's own 409.
            reached = await nurse.post(path, form=form, headers={"X-CSRF-Token": session_token})
            assert reached.status_code == 409
