"""``appliance devices|stations|held``: pairing and routing from the command line, in-process
against a real site config, database and key."""

from __future__ import annotations

import asyncio
import getpass
import json
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.device_registry import DeviceRegistry
from appliance.store import Store
from drivers.blood_pressure import parse_measurement
from drivers.simulated import SimulatedBloodPressureCuff
from services.device_hub import DeviceHub
from services.vitals import CaptureMethod
from tests import factories


@pytest.fixture
def site(tmp_path: Path) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(factories.SITE_TOML)
    assert main(["init", "--dev-key", "--config", str(path)]) == 0
    return path


def _store(site: Path) -> tuple[Path, Path]:
    data = site.parent / "data"
    return data / "appliance.db", data / "keys" / "kek"


async def _patient_and_held_reading(site: Path) -> tuple[str, int]:
    db_path, kek = _store(site)
    store = await Store.open(db_path, kek)
    try:
        [patient] = await store.create([factories.patient()], "user:admin")
        now = datetime.now(UTC).replace(tzinfo=None)
        cuff = SimulatedBloodPressureCuff(rng=random.Random(1), now=lambda: now)
        hub = DeviceHub(store, DeviceRegistry(store), UTC)
        outcome = await hub.on_event(
            "cuff-1", parse_measurement(cuff.next_payload()), datetime.now(UTC), CaptureMethod.BLE
        )
        assert outcome is not None
        assert outcome.held_id is not None
        return patient.logical_id, outcome.held_id
    finally:
        await store.close()


def test_register_assign_check_in_and_file_a_held_reading(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = ["--config", str(site)]
    assert main(["stations", "add", "kiosk-1", "--name", "Kiosk 1", "--kind", "kiosk", *cfg]) == 0
    assert (
        main(
            [
                "devices",
                "add",
                "cuff-1",
                "--transport",
                "ble",
                "--profile",
                "blood_pressure",
                "--address",
                "AA:BB:CC:DD:EE:01",
                "--station",
                "kiosk-1",
                *cfg,
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["devices", "list", "--format", "json", *cfg]) == 0
    [device] = json.loads(capsys.readouterr().out)
    assert (device["id"], device["station_id"], device["transport"]) == ("cuff-1", "kiosk-1", "ble")
    patient_id, held_id = asyncio.run(_patient_and_held_reading(site))
    assert main(["held", "list", *cfg]) == 0
    listing = capsys.readouterr().out
    assert "no patient was checked in at Kiosk 1" in listing
    assert "Blood pressure, heart rate" in listing
    assert main(["held", "assign", str(held_id), patient_id, *cfg]) == 0
    assert "2 Observation(s) filed" in capsys.readouterr().out
    assert main(["stations", "checkin", "kiosk-1", patient_id, *cfg]) == 0
    assert main(["stations", "list", *cfg]) == 0
    assert patient_id in capsys.readouterr().out
    # Audited under the operator's login name.
    assert (
        main(["audit", "report", "--user", f"cli:{getpass.getuser()}", "--format", "json", *cfg])
        == 0
    )
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    actions = [r["action"] for r in records]
    assert actions.count("config") >= 2  # station + device
    assert "create" in actions


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (
            ["devices", "add", "x", "--transport", "ble", "--profile", "espresso"],
            "not a ble profile",
        ),
        (
            ["devices", "add", "x", "--transport", "serial", "--profile", "nonin-df7"],
            "needs --address",
        ),
        (["devices", "assign", "ghost", "--station", "kiosk-1"], "no device 'ghost'"),
        (["stations", "checkin", "nowhere", "p1"], "not found"),
        (["held", "discard", "1", "--note", " "], "say why"),
    ],
)
def test_mistakes_get_one_clear_line_and_exit_2(
    site: Path, capsys: pytest.CaptureFixture[str], argv: list[str], reason: str
) -> None:
    assert main([*argv, "--config", str(site)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert reason in err


def test_scan_without_a_bluetooth_stack_says_so_in_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-such-bus")
    assert main(["devices", "scan", "--seconds", "0.2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no Bluetooth stack" in err
    assert "bluetoothd" in err
