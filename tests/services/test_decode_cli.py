"""``appliance decode``: the field technician's tool, run through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import cli, fhir
from drivers import nonin
from services import decode

BP_DATED = "1E790051006A00EA070B1A081E0F4800FF0C00"  # tests/drivers/test_blood_pressure.py DATED


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["decode", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_blood_pressure_bytes_print_valid_observations(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "--gatt", "0x2A35", BP_DATED, "--timezone", "America/Chicago")
    assert (code, err) == (0, "")
    bp, hr = json.loads(out)
    assert bp["code"]["coding"][0]["code"] == "85354-9"
    assert [c["valueQuantity"]["value"] for c in bp["component"]] == [121, 81]
    assert bp["effectiveDateTime"] == "2026-11-26T08:30:15-06:00"
    assert hr["valueQuantity"]["value"] == 72
    assert "Irregular pulse detected" in [n["text"] for n in bp["note"]]
    for resource in (bp, hr):
        fhir.validate(resource)


def test_spaced_and_prefixed_hex_and_full_uuid_are_accepted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    spaced = " ".join(BP_DATED[i : i + 2] for i in range(0, len(BP_DATED), 2))
    code, out, _ = _run(capsys, "--gatt", "00002a35-0000-1000-8000-00805f9b34fb", *spaced.split())
    assert code == 0
    assert len(json.loads(out)) == 2


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (
            ["--gatt", "0x2A35", "1E7900"],
            "Blood Pressure Measurement is 3 bytes, flags 0x1E need 19",
        ),
        (["--gatt", "0x2A35", "1E79G0"], "not hexadecimal"),
        (["--gatt", "0x2A35", "1E790"], "odd number of hex digits"),
        (["--gatt", "0x9999", "00"], "characteristic 0x9999 is not decoded here"),
        (["--serial", "modem", "00"], "no serial protocol 'modem'"),
        (["--serial", "nonin-df7", "0102030405"], "nonin-df7: no complete reading in 5 bytes"),
    ],
)
def test_malformed_input_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], reason: str
) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("appliance decode: ")
    assert reason in err


def test_non_measurement_characteristics_print_their_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = _run(capsys, "--gatt", "0x2A19", "5A")
    assert code == 0
    assert json.loads(out) == [{"type": "BatteryLevel", "percent": 90}]


def test_nonin_df7_capture_with_garbage_decodes_and_reports_the_skip(
    capsys: pytest.CaptureFixture[str],
) -> None:
    capture = b"\xff\x00" + nonin.encode_df7_packet(95, 64) * 2
    code, out, err = _run(capsys, "--serial", "nonin-df7", capture.hex())
    assert code == 0
    observations = json.loads(out)
    assert {o["valueQuantity"]["value"] for o in observations} == {95, 64}
    assert "skipped 2 bytes" in err


def test_line_protocol_comes_from_the_site_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    example = Path(__file__).parents[2] / "docs" / "site.example.toml"
    code, out, _ = _run(
        capsys, "--config", str(example), "--serial", "line:thermometer", b"T=37.9C\r\n".hex()
    )
    assert code == 0
    [temperature] = json.loads(out)
    assert temperature["code"]["coding"][0]["code"] == "8310-5"
    assert temperature["valueQuantity"] == {
        "value": 37.9,
        "unit": "Cel",
        "system": "http://unitsofmeasure.org",
        "code": "Cel",
    }
    code, _, err = _run(capsys, "--config", str(example), "--serial", "line:nope", "00")
    assert code == 2
    assert "no [[devices.line_protocol]] named 'nope'" in err


@settings(max_examples=200, deadline=None)
@given(uuid=st.sampled_from(sorted(decode.GATT_PARSERS)), data=st.binary(max_size=40))
def test_arbitrary_bytes_either_decode_or_raise_decode_error(uuid: int, data: bytes) -> None:
    try:
        result = decode.decode_gatt(uuid, data)
    except decode.DecodeError as exc:
        message = str(exc)
    else:
        message = ""
        for item in result:  # whatever decodes is valid FHIR, or a plain decoded record
            if item.get("resourceType") == "Observation":
                fhir.validate(item)
            else:
                assert isinstance(item["type"], str)
    assert "\n" not in message  # a refusal is always one line
