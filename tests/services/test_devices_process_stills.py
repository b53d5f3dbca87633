"""The real devices process (``python -m services.devices``) takes an exam-camera still the
web process asked for through the store, with libav's test pattern in place of /dev/video0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

from appliance.cli import main as cli
from appliance.config import load
from appliance.store import Store
from services.video import still_requests
from tests import factories

REPO = Path(__file__).resolve().parents[2]
NURSE = "user:nurse1"
CAMERA = """
[[video.exam_camera]]
name = "otoscope"
device = "testsrc2=size=640x480:rate=30"
format = "lavfi"
"""


async def start_devices_with_camera(
    tmp_path: Path,
) -> tuple[Store, asyncio.subprocess.Process]:
    """A box initialised with the ``otoscope`` camera, its store open here, and the real
    devices process started on it (stderr piped: its log)."""
    site = tmp_path / "site.toml"
    site.write_text(factories.SITE_TOML + CAMERA)
    assert cli(["init", "--dev-key", "--config", str(site)]) == 0
    config = load(site)
    store = await Store.open(config.paths.database, config.keys.kek_file)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.devices",
        "--config",
        str(site),
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    return store, process


async def test_the_devices_process_takes_the_still_the_web_process_asked_for(
    tmp_path: Path,
) -> None:
    store, process = await start_devices_with_camera(tmp_path)
    try:
        [patient] = await store.create([factories.patient()], NURSE)
        request_id = await still_requests.submit(
            store, "otoscope", patient.logical_id, "enc-1", NURSE, datetime.now(UTC)
        )
        # As the web process waits (the process may still be starting: give it 30 s).
        outcome = await still_requests.wait(store, request_id, timeout_s=30)
        assert outcome.state is still_requests.RequestState.DONE, outcome
        assert outcome.media_id is not None
        media = await store.read("Media", outcome.media_id, NURSE)
        assert media["encounter"] == {"reference": "Encounter/enc-1"}
        assert media["deviceName"] == "otoscope"
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
        await store.close()
    assert process.returncode == 0, stderr.decode()[-2000:]
    # Its log names the request and the camera, never the patient.
    assert f"camera request {request_id} done (otoscope)" in stderr.decode()
    assert patient.logical_id not in stderr.decode()
