"""The real devices process (``python -m services.devices``) shows an exam camera live in a
visit, then dies (SIGKILL): the web side takes the camera out once its stamp is stale.

libav's test pattern stands in for /dev/video0; the video service and its nurse and provider
(aiortc clients speaking the wire messages) run in this process, as the web process's would.
No ``loopback`` fixture here: this process gathers the host's own addresses, as the web
process does, and the devices process 127.0.0.1 only (``gather_loopback_only``), so the
camera's connection pairs them as on the box. No STUN server: nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.video import camera_streams
from services.video.camera_streams import StreamState, StreamWatcher
from tests.services.test_devices_process_stills import start_devices_with_camera
from tests.video.peers import wait_for
from tests.video.test_service import VISIT, flowing, video_service

NURSE = "user:nurse1"


@pytest.mark.slow
async def test_a_camera_from_the_real_devices_process_leaves_the_visit_when_it_dies(
    tmp_path: Path,
) -> None:
    store, process = await start_devices_with_camera(tmp_path)
    try:
        async with video_service() as (service, client):
            nurse, provider = client("nurse"), client("provider")
            await nurse.join("nurse")
            await provider.join("provider")
            await nurse.send(type="admit", participant=provider.id)
            stream_id = await camera_streams.submit(
                store, "otoscope", VISIT, NURSE, datetime.now(UTC)
            )
            # As the web process waits (the process may still be starting: give it 30 s).
            stream = await camera_streams.wait_offer(store, stream_id, timeout_s=30)
            assert stream.state is StreamState.OFFERED, stream
            camera = await camera_streams.start(store, service, stream, datetime.now(UTC))
            await flowing(provider.video, camera, 20)
            assert provider.last("participant", participant=camera)["label"] == "otoscope"

            process.send_signal(signal.SIGKILL)  # no goodbye: only the stamps stop
            await process.wait()
            watcher = StreamWatcher(store, service)

            async def watch() -> None:
                while True:
                    await watcher.check()
                    await asyncio.sleep(0.5)

            watching = asyncio.create_task(watch())
            try:
                await wait_for(
                    lambda: any(
                        m["type"] == "left" and m["participant"] == camera
                        for m in provider.received
                    ),
                    camera_streams.ALIVE_TTL_S + 5,
                    "the camera out of the visit",
                )
            finally:
                watching.cancel()
            await wait_for(lambda: service.connections(VISIT) == 0, 10, "its connections closed")
            final = await camera_streams.load(store, stream_id)
            assert final is not None
            assert final.state is StreamState.FAILED
            assert final.offer is None
            assert final.answer is None
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
        await store.close()
    log = stderr.decode()
    assert "a=ice-pwd" not in log  # the session descriptions are never logged
    assert "a=fingerprint" not in log
