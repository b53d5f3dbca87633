"""``appliance vendors ...`` and ``appliance rpm ...`` in-process, against a real site config,
database and key."""

from __future__ import annotations

import asyncio
import getpass
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.store import Store
from services.vendor_keys import VendorKeys
from services.vitals import CAPTURE_SETTING_SYSTEM
from tests import factories


@pytest.fixture
def site(tmp_path: Path) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(factories.SITE_TOML)
    assert main(["init", "--dev-key", "--config", str(path)]) == 0
    return path


async def _open(site: Path) -> Store:
    data = site.parent / "data"
    return await Store.open(data / "appliance.db", data / "keys" / "kek")


def _check(site: Path, key: str) -> tuple[str | None, bool]:
    async def go() -> tuple[str | None, bool]:
        store = await _open(site)
        try:
            found = await VendorKeys(store).check(key)
            return found.vendor, found.active
        finally:
            await store.close()

    return asyncio.run(go())


def test_vendor_keys_are_issued_once_replaced_and_disabled(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = ["--config", str(site)]
    assert main(["vendors", "add", "acme-rpm", *cfg]) == 0
    first = capsys.readouterr().out.strip()
    assert first.startswith("thv_")
    assert _check(site, first) == ("acme-rpm", True)
    assert main(["vendors", "add", "acme-rpm", *cfg]) == 2
    assert "--replace" in capsys.readouterr().err
    assert main(["vendors", "add", "acme-rpm", "--replace", *cfg]) == 0
    second = capsys.readouterr().out.strip()
    assert _check(site, first) == (None, False)
    assert main(["vendors", "disable", "acme-rpm", *cfg]) == 0
    assert _check(site, second) == ("acme-rpm", False)
    capsys.readouterr()
    assert main(["vendors", "list", "--format", "json", *cfg]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert (listed["vendor"], listed["active"]) == ("acme-rpm", False)
    assert listed["created_by"] == f"cli:{getpass.getuser()}"
    assert main(["vendors", "list", *cfg]) == 0
    assert "disabled" in capsys.readouterr().out
    assert main(["vendors", "add", "Bad Name", *cfg]) == 2


def _scope(site: Path, key: str) -> str:
    async def go() -> str:
        store = await _open(site)
        try:
            return (await VendorKeys(store).check(key)).scope.value
        finally:
            await store.close()

    return asyncio.run(go())


def test_a_read_key_is_issued_with_its_scope_and_listed_with_it(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = ["--config", str(site)]
    assert main(["vendors", "add", "acme-rpm", *cfg]) == 0
    ingest = capsys.readouterr().out.strip()
    assert main(["vendors", "add", "ehr-bridge", "--scope", "read", *cfg]) == 0
    captured = capsys.readouterr()
    read = captured.out.strip()
    assert "read key for ehr-bridge" in captured.err
    assert (_scope(site, ingest), _scope(site, read)) == ("ingest", "read")
    # A replaced key keeps its scope unless told otherwise.
    assert main(["vendors", "add", "ehr-bridge", "--replace", *cfg]) == 0
    assert _scope(site, capsys.readouterr().out.strip()) == "read"
    assert main(["vendors", "list", "--format", "json", *cfg]) == 0
    listed = {v["vendor"]: v["scope"] for v in json.loads(capsys.readouterr().out)}
    assert listed == {"acme-rpm": "ingest", "ehr-bridge": "read"}
    assert main(["vendors", "list", *cfg]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["VENDOR", "SCOPE", "STATE"]
    assert table[2].split()[:3] == ["ehr-bridge", "read", "active"]
    with pytest.raises(SystemExit):  # argparse refuses a scope that does not exist
        main(["vendors", "add", "other", "--scope", "write", *cfg])


def _enrol_with_readings(site: Path, enrolled: date, home_days: int) -> str:
    async def go() -> str:
        store = await _open(site)
        try:
            [patient] = await store.create([factories.patient()], "user:admin")
            await store.transact(
                lambda conn: conn.execute(
                    "INSERT INTO rpm_enrollment (patient_id, program, enrolled_at, enrolled_by) "
                    "VALUES (?, 'heart-failure', ?, 'user:admin')",
                    (patient.logical_id, f"{enrolled.isoformat()}T15:00:00Z"),
                )
            )
            readings = []
            for n in range(home_days):
                at = datetime.combine(enrolled + timedelta(days=n), datetime.min.time(), UTC)
                reading = factories.bp_observation(
                    f"Patient/{patient.logical_id}",
                    effective=(at + timedelta(hours=18)).isoformat(),
                )
                reading["meta"] = {"tag": [{"system": CAPTURE_SETTING_SYSTEM, "code": "home"}]}
                readings.append(reading)
            await store.create(readings, "service:devices")
            return patient.logical_id
        finally:
            await store.close()

    return asyncio.run(go())


def test_time_log_and_billing_report(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ["--config", str(site)]
    patient_id = _enrol_with_readings(site, date(2026, 10, 1), home_days=17)
    note = "Discussed the weight gain with the patient"
    assert (
        main(
            [
                "rpm",
                "time-log",
                patient_id,
                "25",
                "--interactive",
                "--note",
                note,
                "--on",
                "2026-10-05",
                *cfg,
            ]
        )
        == 0
    )
    assert note not in capsys.readouterr().out
    assert main(["rpm", "billing", "--as-of", "2026-10-20", *cfg]) == 0
    table = capsys.readouterr().out
    assert patient_id in table
    assert "99454" in table
    assert "99457" in table
    assert (
        main(
            [
                "rpm",
                "billing",
                "--as-of",
                "2026-10-20",
                "--patient",
                patient_id,
                "--format",
                "json",
                *cfg,
            ]
        )
        == 0
    )
    [found] = json.loads(capsys.readouterr().out)
    assert found["period"] == {"number": 1, "start": "2026-10-01", "end": "2026-10-30"}
    assert found["days_with_home_readings"] == 17
    assert (found["device_code"], found["at_risk"]) == ("99454", False)
    assert (found["minutes"], found["time_codes"]) == (25, ["99457"])


def test_time_log_for_a_patient_not_enrolled_fails(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["rpm", "time-log", "no-such-patient", "20", "--config", str(site)]) == 2
    assert "not enrolled" in capsys.readouterr().err
    assert main(["rpm", "billing", "--config", str(site)]) == 0
    assert "no patient is enrolled" in capsys.readouterr().out
