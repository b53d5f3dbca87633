"""The devices process: every registered device's transport, feeding the device hub.

Registered devices (``appliance devices add`` or the admin UI) are read from the store; each
gets its own task — a Bluetooth link, a serial port, or a simulated peripheral — so one
device's failure never touches another's. The list is re-read every few seconds, so pairing
or retiring a device needs no restart.

The exam cameras of the site config (``[[video.exam_camera]]``) are opened here too, for the
stills nurses take from the web process, which may not open devices, and for showing a camera
live in a visit (this process publishes it as a WebRTC participant on loopback): the requests
cross through the store (:mod:`services.video.still_requests`,
:mod:`services.video.camera_streams`).

Demo mode (``devices.simulated``) also seeds synthetic patients, two stations with
simulated devices, a home scale, and a "front desk" that checks the next synthetic patient
in at each station now and then, so readings visibly land in different charts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from appliance import runtime, sdnotify
from appliance.config import RpmConfig
from appliance.device_registry import Device, DeviceRegistry, Transport
from appliance.errors import ApplianceError
from appliance.runtime import ProcessContext
from appliance.store import Store
from drivers.ble import BleakBackends, BleDeviceSpec, BleEvent, BleLink, LinkStatus
from drivers.serial_port import SerialSource
from services import demo, device_profiles, rpm_demo, rpm_rules
from services.alerts import AlertEngine, escalation_policy
from services.device_hub import DeviceHub
from services.simulated_link import SimulatedGattLink, SimulatedSerialLink
from services.video import camera_streams
from services.video.exam_camera import CameraHub
from services.video.still_requests import StillWorker
from services.vitals import CaptureMethod

logger = logging.getLogger(__name__)

ACTOR = "service:devices"
RELOAD_S = 5.0
RESTART_BACKOFF_S = (1.0, 60.0)
FILE_RETRIES = 6  # ~1 minute of retries before a reading is given up (and logged)
FILE_RETRY_S = (1.0, 30.0)
# The alert engine looks for newly committed Observations (from any process: devices, vendor
# ingest in web, home readings pulled by sync) this often; with the worklist's own 0.25 s
# stream poll a new alert is on an open screen well within the 1 s (p95) of issue 4. These
# are the defaults of the site config's [rpm] poll_s and tick_s (a test keeps them equal).
ALERT_POLL_S = 0.25
ALERT_TICK_S = 60.0  # data-stopped rules, snoozes ending, escalation


class DeviceRunner:
    """Keeps one transport task per registered device, restarting a failed one on its own."""

    def __init__(
        self,
        ctx: ProcessContext,
        registry: DeviceRegistry,
        hub: DeviceHub,
        *,
        rng: random.Random,
        ble_backends: BleakBackends | None = None,
    ) -> None:
        self._ctx = ctx
        self._ble_backends = ble_backends or BleakBackends()
        self._registry = registry
        self._hub = hub
        self._rng = rng
        self._zone = ZoneInfo(ctx.config.site.timezone)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.errors: dict[str, str] = {}
        self.link_states: dict[str, dict[str, object]] = {}
        self._serial_sources: dict[str, SerialSource] = {}

    def site_now(self) -> datetime:
        """The site's naive wall clock (what device clocks are set to)."""
        return datetime.now(self._zone).replace(tzinfo=None)

    async def run(self) -> None:
        """Reconcile tasks with the registry until stopping, then stop them all."""
        stopping = self._ctx.stopping
        try:
            while not stopping.is_set():
                await self.reconcile()
                self._ctx.set_status(
                    devices=len(self._tasks),
                    readings_stored=self._hub.readings_stored,
                    readings_held=self._hub.readings_held,
                    device_errors=dict(self.errors),
                    links={**self.link_states, **self._serial_states()},
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), RELOAD_S)
        finally:
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def reconcile(self) -> None:
        """Start tasks for new devices and stop those of retired ones."""
        devices = {d.id: d for d in await self._registry.devices()}
        for device_id in set(self._tasks) - set(devices):
            self._tasks.pop(device_id).cancel()
        for device_id, device in devices.items():
            if device_id not in self._tasks:
                await self._hub.load(device)
                self._tasks[device_id] = asyncio.create_task(
                    self._supervise(device), name=f"device {device_id}"
                )

    async def _supervise(self, device: Device) -> None:
        """Run a device's transport; on an unexpected failure log it and restart later."""
        delay = RESTART_BACKOFF_S[0]
        while not self._ctx.stopping.is_set():
            try:
                await self._transport(device)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one device must not stop the others
                self.errors[device.id] = type(exc).__name__
                logger.error(
                    "device %s transport failed (%s); restarting in %.0f s",
                    device.id,
                    type(exc).__name__,
                    delay,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ctx.stopping.wait(), delay)
            delay = min(RESTART_BACKOFF_S[1], delay * 2) * self._rng.uniform(0.8, 1.2)

    def _on_event(
        self, device_id: str, method: CaptureMethod
    ) -> Callable[[object, datetime | None], Coroutine[Any, Any, None]]:
        async def on_event(event: object, received: datetime | None) -> None:
            when = received or datetime.now(UTC)
            delay = FILE_RETRY_S[0]
            for attempt in range(FILE_RETRIES):
                try:
                    await self._hub.on_event(device_id, event, when, method)
                    return
                except ApplianceError as exc:
                    # e.g. a full disk. The device has already had its confirmation, so the
                    # reading is kept in memory and retried (the transport waits meanwhile);
                    # a meter's stored records come again on the next connection anyway.
                    logger.error(
                        "could not file a reading from device %s (attempt %d of %d): %s",
                        device_id,
                        attempt + 1,
                        FILE_RETRIES,
                        exc,
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ctx.stopping.wait(), delay)
                if self._ctx.stopping.is_set():
                    break
                delay = min(FILE_RETRY_S[1], delay * 2)
            self.errors[device_id] = "reading not filed"
            logger.error("gave up filing a reading from device %s", device_id)

        return on_event

    def _now_filer(
        self, device_id: str, method: CaptureMethod
    ) -> Callable[[object], Coroutine[Any, Any, None]]:
        file_event = self._on_event(device_id, method)

        async def on_event(event: object) -> None:
            await file_event(event, None)

        return on_event

    async def _transport(self, device: Device) -> None:
        stop = self._ctx.stopping
        if device.transport is Transport.SIMULATED and device_profiles.is_serial(device.profile):
            simulated, decoder = device_profiles.simulated_serial(
                device.profile, rng=self._rng, now=lambda: datetime.now(self._zone)
            )
            serial_link = SimulatedSerialLink(
                simulated,
                decoder,
                self._now_filer(device.id, CaptureMethod.SIMULATED),
                rng=self._rng,
            )
            await serial_link.run(stop, self._ctx.config.devices.simulated_interval_s)
            return
        if device.transport is Transport.SERIAL:
            port, baud, factory = device_profiles.serial_port(device, self._ctx.config)
            source = SerialSource(
                port,
                baud,
                factory,
                self._now_filer(device.id, CaptureMethod.SERIAL),
                rng=self._rng,
            )
            self._serial_sources[device.id] = source
            try:
                await source.run(stop)
            finally:
                self._serial_sources.pop(device.id, None)
            return
        if device.transport is Transport.SIMULATED:
            peripheral = device_profiles.simulated_peripheral(
                device.profile, rng=self._rng, now=lambda: datetime.now(self._zone)
            )
            link = SimulatedGattLink(
                peripheral,
                device_profiles.session_factory(device, self._hub.last_sequence),
                self._now_filer(device.id, CaptureMethod.SIMULATED),
                clock=self.site_now,
            )
            await link.run(stop, self._ctx.config.devices.simulated_interval_s)
            return
        if device.transport is Transport.BLE:
            on_event = self._on_event(device.id, CaptureMethod.BLE)

            async def deliver(event: BleEvent) -> None:
                await on_event(event.event, event.received)

            ble_link = BleLink(
                BleDeviceSpec(
                    address=device.address,
                    service_uuid=device_profiles.service_uuid(device.profile),
                    name=device.id,
                    requires_bonding=device.requires_bonding,
                ),
                device_profiles.session_factory(device, self._hub.last_sequence),
                deliver,
                clock=lambda: datetime.now(self._zone),
                rng=self._rng,
                on_status=self._link_status,
                backends=self._ble_backends,
            )
            await ble_link.run(stop)
            return
        raise ApplianceError(f"device {device.id}: transport {device.transport} is not available")

    def _serial_states(self) -> dict[str, dict[str, object]]:
        states: dict[str, dict[str, object]] = {}
        for device_id, source in self._serial_sources.items():
            status = source.status
            states[device_id] = {
                "state": "connected" if status.connected else "backoff",
                "connections": status.opens,
                "protocol_errors": status.protocol_errors + status.skip_events,
                "last_error": status.last_error,
            }
        return states

    def _link_status(self, status: LinkStatus) -> None:
        """Keep each link's state for /healthz and the device-status page (no PHI)."""
        self.link_states[status.device] = {
            "state": status.state.value,
            "connections": status.connections,
            "protocol_errors": status.protocol_errors,
            "last_error": status.last_error,
        }


def alert_engine(
    store: Store, rpm: RpmConfig, *, clock: Callable[[], datetime] | None = None
) -> AlertEngine:
    """The alert engine as the site's ``[rpm]`` config sets it up."""
    return AlertEngine(
        store,
        clock=clock,
        escalation=escalation_policy(
            rpm.escalate_critical_min, rpm.escalate_high_min, rpm.escalate_to_role
        ),
        backlog_hours=rpm.sync_backlog_hours or None,
        site=rpm_rules.site_defaults(
            quiet_days=rpm.quiet_days, device_silent_hours=rpm.device_silent_hours
        ),
    )


async def main(ctx: ProcessContext) -> None:
    """Entry of the devices process."""
    rng = random.Random()  # noqa: S311 - simulated readings and back-off jitter, not security
    registry = DeviceRegistry(ctx.store)
    hub = DeviceHub(ctx.store, registry, ZoneInfo(ctx.config.site.timezone))
    runner = DeviceRunner(ctx, registry, hub, rng=rng)
    engine = alert_engine(ctx.store, ctx.config.rpm)
    patients: list[str] = []
    if ctx.config.devices.simulated:
        patients = await demo.seed_devices(ctx.store, registry)
        # The engine's starting point first, so the demo's recent readings raise their alerts.
        await engine.pin_start()
        await rpm_demo.seed(ctx.store, ZoneInfo(ctx.config.site.timezone))
    tasks = [
        asyncio.create_task(
            engine.run(ctx.stopping, poll_s=ctx.config.rpm.poll_s, tick_s=ctx.config.rpm.tick_s),
            name="rpm alerts",
        )
    ]
    if ctx.config.exam_cameras:
        # Exam-camera stills and live streams the web process asks for (it may not open
        # cameras itself); a still taken while the camera is in a visit shares its capture.
        open_cameras = CameraHub()
        stills = StillWorker(
            ctx.store,
            ctx.config.exam_cameras,
            name=f"devices:{os.getpid()}",
            on_status=ctx.set_status,
            hub=open_cameras,
        )
        tasks.append(asyncio.create_task(stills.run(ctx.stopping), name="exam camera stills"))
        # This process's only WebRTC peers are cameras publishing to the box's own video
        # service: they gather 127.0.0.1 only (docs/video.md, "Exam cameras").
        camera_streams.gather_loopback_only()
        streams = camera_streams.StreamWorker(
            ctx.store,
            ctx.config.exam_cameras,
            open_cameras,
            name=f"devices:{os.getpid()}",
            on_status=ctx.set_status,
        )
        tasks.append(asyncio.create_task(streams.run(ctx.stopping), name="exam camera streams"))
    if ctx.config.devices.simulated:
        tasks.append(
            asyncio.create_task(
                demo.front_desk(
                    registry,
                    patients,
                    ctx.stopping,
                    interval_s=ctx.config.devices.simulated_interval_s * 4,
                    offset_s=ctx.config.devices.simulated_interval_s / 2,
                )
            )
        )
    sdnotify.ready()
    try:
        await runner.run()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    sys.exit(runtime.main_entry("devices", main))
