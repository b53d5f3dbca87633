"""The real app served by Hypercorn on loopback, Debian's Chromium, and a simulated home cuff.

Shared by the browser tests (``tests/e2e/conftest.py``) and ``bench/rpm.py``, so what the
benchmark measures is what the end-to-end test checks:

* :func:`serve` runs ``web.app.create_app`` under Hypercorn on ``127.0.0.1`` on a free port
  (the listening socket is bound first and handed over by file descriptor: no port race);
* :func:`launch_chromium` starts ``/usr/bin/chromium`` headless through Playwright — never a
  downloaded browser (``make test`` installs the Debian package);
* :func:`log_in` signs a user in through the real login form;
* :class:`HomeCuff` is a patient's home blood-pressure cuff as the devices process sees it:
  the bytes of a 0x2A35 indication, decoded by ``BloodPressureSession`` and filed by
  ``DeviceHub`` (routing, FHIR, encrypted write with outbox and audit), on the devices
  process's own store connection;
* :func:`alert_engine` runs ``AlertEngine.run`` with the devices process's poll settings;
* :func:`still_worker` runs the devices process's exam-camera still worker;
* :func:`stream_worker` runs the devices process's worker that shows cameras live in visits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from quart import Quart

from appliance import db, users
from appliance.config import ExamCameraConfig
from appliance.device_registry import DeviceRegistry, Setting, Transport
from appliance.store import Store
from drivers import blood_pressure
from drivers.ieee11073 import SFloatValue
from drivers.simulated import SimulatedBloodPressureCuff
from services import devices as devices_process
from services.alerts import AlertEngine
from services.device_hub import DeviceHub
from services.rpm_enrollment import Enrollments
from services.rpm_rules import Program
from services.video import camera_streams
from services.video.exam_camera import CameraHub
from services.video.still_requests import StillWorker
from services.vitals import CaptureMethod
from tests import factories

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Chromium's fake camera (a test pattern with a frame counter) and microphone (a beep), and
# every permission prompt answered yes: for the pre-call check and the video pages.
FAKE_MEDIA_ARGS = [
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--autoplay-policy=no-user-gesture-required",
    # Host candidates as addresses, not mDNS names, which aioice would have to resolve.
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]
ACTOR = "service:devices"


@contextlib.asynccontextmanager
async def serve(app: Quart) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port) until the block ends; yields the base URL."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    config = HypercornConfig()
    # Hypercorn adopts (and closes) the descriptor it is given: hand it a duplicate.
    config.bind = [f"fd://{os.dup(listener.fileno())}"]
    config.accesslog = None
    config.graceful_timeout = 1.0
    stop = asyncio.Event()
    task = asyncio.create_task(hypercorn_serve(app, config, shutdown_trigger=stop.wait))
    try:
        base = f"http://127.0.0.1:{port}"
        await _wait_until_up(port, task)
        yield base
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 10)
        except TimeoutError:
            task.cancel()
        listener.close()


async def _wait_until_up(port: int, task: asyncio.Task[Any]) -> None:
    for _ in range(200):
        if task.done():
            task.result()  # raises what stopped the server
        with contextlib.suppress(OSError):
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            return
        await asyncio.sleep(0.02)
    raise RuntimeError("the app did not start listening")


async def launch_chromium(playwright: Any, *, fake_media: bool = False) -> Any:
    """Headless Chromium from the Debian package, with the flags a CI container needs
    (and, with ``fake_media``, :data:`FAKE_MEDIA_ARGS`)."""
    args = CHROMIUM_ARGS + (FAKE_MEDIA_ARGS if fake_media else [])
    return await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)


async def create_user(store: Store, username: str, password: str, role: users.Role) -> None:
    """A staff account in the store (as ``appliance users add`` makes one)."""
    await db.run_sync(
        store.connection, users.create_user, username, password, role, now=datetime.now(UTC)
    )


async def log_in(page: Any, base_url: str, username: str, password: str, path: str = "/") -> None:
    """Sign in through the real login form, landing on ``path``."""
    await page.goto(f"{base_url}/login?next={path}")
    await page.fill("#username", username)
    await page.fill("#password", password)
    async with page.expect_navigation():
        await page.click("button[type=submit]")


@dataclass
class HomeCuff:
    """A patient's home blood-pressure cuff, filed through the devices process's hub."""

    device_id: str
    patient_id: str
    hub: DeviceHub
    rng: random.Random

    @classmethod
    async def enrol(
        cls, store: Store, family: str, *, device_id: str | None = None, seed: int = 1
    ) -> HomeCuff:
        """A new synthetic patient, enrolled in hypertension RPM, with a home cuff."""
        [patient] = await store.create(
            [factories.patient(family=family, mrn=f"E2E-{family}")], "user:e2e"
        )
        await Enrollments(store).enroll(patient.logical_id, Program.HYPERTENSION, "user:e2e")
        registry = DeviceRegistry(store)
        device = device_id or f"home-cuff-{family.lower()}"
        await registry.register_device(
            device,
            name=f"Home cuff {family}",
            transport=Transport.SIMULATED,
            profile="blood_pressure",
            address=None,
            setting=Setting.HOME,
            actor=ACTOR,
        )
        await registry.assign_device(device, ACTOR, patient_id=patient.logical_id)
        hub = DeviceHub(store, registry, UTC)
        found = await registry.device(device)
        await hub.load(found)
        return cls(device, patient.logical_id, hub, random.Random(seed))

    async def measure(self, systolic: int, diastolic: int) -> float:
        """The cuff indicates one reading; returns ``time.time()`` once it is committed."""
        cuff = SimulatedBloodPressureCuff(rng=self.rng, now=lambda: datetime.now(UTC))
        reading = replace(
            cuff.next_measurement(),
            systolic=SFloatValue(systolic, 0),
            diastolic=SFloatValue(diastolic, 0),
            mean_arterial=SFloatValue(round(diastolic + (systolic - diastolic) / 3), 0),
        )
        payload = blood_pressure.encode_measurement(reading)
        session = blood_pressure.BloodPressureSession()
        for event in session.on_value(blood_pressure.MEASUREMENT, payload):
            outcome = await self.hub.on_event(
                self.device_id, event, datetime.now(UTC), CaptureMethod.SIMULATED
            )
            if outcome is None or not outcome.stored:
                raise AssertionError("the reading was not filed into the chart")
        return time.time()


@contextlib.asynccontextmanager
async def alert_engine(store: Store) -> AsyncIterator[AlertEngine]:
    """``AlertEngine.run`` as the devices process runs it (same poll and tick), until the end."""
    engine = AlertEngine(store)
    stopping = asyncio.Event()
    task = asyncio.create_task(
        engine.run(
            stopping, poll_s=devices_process.ALERT_POLL_S, tick_s=devices_process.ALERT_TICK_S
        )
    )
    try:
        yield engine
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def still_worker(
    db_path: Path,
    kek_path: Path,
    cameras: Sequence[ExamCameraConfig],
    *,
    clock: Callable[[], datetime] | None = None,
) -> AsyncIterator[StillWorker]:
    """The devices process's exam-camera still worker (``services.devices.main`` runs it), on
    a store connection of its own as that process has, until the block ends."""
    store = await Store.open(db_path, kek_path)
    worker = StillWorker(store, cameras, name="devices:test", clock=clock or _utcnow)
    stopping = asyncio.Event()
    task = asyncio.create_task(worker.run(stopping), name="exam camera stills")
    try:
        yield worker
    finally:
        stopping.set()
        try:
            await asyncio.wait_for(task, 10)
        finally:
            await store.close()


def _utcnow() -> datetime:
    return datetime.now(UTC)


def watch_problems(page: Any) -> list[str]:
    """What the page reports as wrong from now on: console errors (a CSP violation is one),
    uncaught exceptions and 4xx/5xx responses. A missing favicon is not ours."""
    problems: list[str] = []
    page.on(
        "console",
        lambda m: (
            problems.append(m.text)
            if m.type == "error" and "favicon" not in str(m.location.get("url", ""))
            else None
        ),
    )
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on(
        "response",
        lambda r: (
            problems.append(f"{r.status} {r.url}")
            if r.status >= 400 and not r.url.endswith("/favicon.ico")
            else None
        ),
    )
    return problems


@contextlib.asynccontextmanager
async def stream_worker(
    db_path: Path,
    kek_path: Path,
    cameras: Sequence[ExamCameraConfig],
    *,
    clock: Callable[[], datetime] | None = None,
) -> AsyncIterator[camera_streams.StreamWorker]:
    """The devices process's worker publishing exam cameras live in visits
    (``services.devices.main`` runs it), on a store connection of its own, until the block
    ends (its streams then end as a stopping devices process's do)."""
    store = await Store.open(db_path, kek_path)
    worker = camera_streams.StreamWorker(
        store, cameras, CameraHub(), name="devices:test", clock=clock or _utcnow
    )
    stopping = asyncio.Event()
    task = asyncio.create_task(worker.run(stopping), name="exam camera streams")
    try:
        yield worker
    finally:
        stopping.set()
        try:
            await asyncio.wait_for(task, 10)
        finally:
            await store.close()


# Seeds reach this far back (test_nurse_arrivals_e2e: 24 minutes), plus a margin.
_SEEDS_BACK = timedelta(minutes=25)
_BEFORE_MIDNIGHT = timedelta(minutes=5)  # a test that straddles midnight


def most_wait_for_the_day() -> timedelta:
    """The longest :func:`wait_for_the_day` can ask for."""
    return _SEEDS_BACK + _BEFORE_MIDNIGHT


def wait_for_the_day(now: datetime, zone: ZoneInfo) -> float:
    """Seconds until the day in the site's ``zone`` is old enough for the seeds (0: it is)."""
    local = now.astimezone(zone)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if local - midnight < _SEEDS_BACK:
        return (midnight + _SEEDS_BACK - local).total_seconds()
    next_midnight = (midnight + timedelta(days=1, hours=1)).replace(hour=0)
    if next_midnight - local < _BEFORE_MIDNIGHT:
        return (next_midnight + _SEEDS_BACK - local).total_seconds()
    return 0.0
