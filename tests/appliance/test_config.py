"""The site configuration: the example loads, every mistake is reported at once with its path."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.config import (
    AuthKind,
    Config,
    RpmConfig,
    SiteType,
    UpstreamConfig,
    demo_config,
    load,
    npi_is_valid,
    parse,
    reference,
)
from appliance.errors import ConfigError

DOCS = Path(__file__).resolve().parents[2] / "docs"

MINIMAL: dict[str, Any] = {
    "site": {
        "id": "test-site",
        "name": "Test Clinic",
        "type": "rhc",
        "npi": "1234567893",
        "tax_id": "12-3456789",
        "timezone": "America/Chicago",
        "address": {"lines": ["1 Main St"], "city": "Town", "state": "NE", "postal_code": "68000"},
    },
    "paths": {"data_dir": "/srv/appliance"},
}


def doc(**changes: dict[str, Any]) -> dict[str, Any]:
    """MINIMAL with some tables' keys replaced or added."""
    result = copy.deepcopy(MINIMAL)
    for section, values in changes.items():
        result.setdefault(section, {}).update(values)
    return result


def problems_of(data: dict[str, Any], environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(data, base_dir=Path("/etc/appliance"), environ=environ or {})
    return caught.value.problems


def paths_of(problems: list[str]) -> set[str]:
    return {problem.split(": ", 1)[0] for problem in problems}


def test_example_file_loads() -> None:
    config = load(DOCS / "site.example.toml", environ={})
    assert config.source == DOCS / "site.example.toml"
    assert config.site.type is SiteType.HOSPITAL_OUTPATIENT
    assert config.site.tax_id == "841234567"
    assert config.paths.database == Path("/var/lib/appliance/appliance.db")
    assert [(u.name, u.auth) for u in config.sync.upstreams] == [("ehr", AuthKind.SMART)]
    assert config.sync.upstreams[0].algorithm == "ES384"


def test_doc_carries_the_example_and_the_schema_reference() -> None:
    text = (DOCS / "site-config.md").read_text(encoding="utf-8")
    assert (DOCS / "site.example.toml").read_text(encoding="utf-8") in text
    assert reference() in text


def test_minimal_config_takes_the_documented_defaults() -> None:
    config = parse(MINIMAL, base_dir=Path("/etc/appliance"), environ={})
    assert config.site.rural is False
    assert config.paths.backups == Path("/srv/appliance/backups")
    assert config.keys.kek_file == Path("/srv/appliance/keys/kek")
    assert (config.web.host, config.web.port) == ("127.0.0.1", 8443)
    assert config.web.public_url == "http://127.0.0.1:8443"  # no TLS configured
    assert (config.web.tls_cert, config.web.session_idle_timeout_s) == (None, 900)
    assert (config.devices.simulated, config.devices.simulated_interval_s) == (False, 5.0)
    assert (config.sync.interval_s, config.sync.upstreams) == (5.0, ())
    assert config.source is None


def test_upstream_defaults_match_the_dataclass() -> None:
    data = doc(sync={"upstream": [{"name": "ehr", "base_url": "https://ehr.example/fhir/"}]})
    config = parse(data, environ={})
    assert config.sync.upstreams == (
        UpstreamConfig(name="ehr", base_url="https://ehr.example/fhir"),
    )


def test_kek_file_defaults_to_the_systemd_credential() -> None:
    config = parse(MINIMAL, environ={"CREDENTIALS_DIRECTORY": "/run/credentials/appliance-web"})
    assert config.keys.kek_file == Path("/run/credentials/appliance-web/kek")
    explicit = parse(doc(keys={"kek_file": "/etc/kek"}), environ={"CREDENTIALS_DIRECTORY": "/x"})
    assert explicit.keys.kek_file == Path("/etc/kek")


def test_demo_config_is_valid(tmp_path: Path) -> None:
    config = demo_config(tmp_path, environ={"CREDENTIALS_DIRECTORY": "/run/credentials/x"})
    assert isinstance(config, Config)
    assert (config.site.id, config.site.type) == ("demo-clinic", SiteType.RHC)
    assert npi_is_valid(config.site.npi)
    assert config.keys.kek_file == tmp_path / "keys" / "kek"
    assert config.devices.simulated
    assert config.devices.simulated_interval_s == 3
    assert config.web.public_url == "https://127.0.0.1:8443"
    assert config.web.tls_cert == tmp_path / "tls" / "server.pem"
    assert config.sync.upstreams == ()


def test_demo_upstream_comes_from_the_environment(tmp_path: Path) -> None:
    env = {
        "APPLIANCE_DEMO_UPSTREAM": "http://127.0.0.1:8103/fhir/R4/",
        "APPLIANCE_WEB_PORT": "9443",
    }
    config = demo_config(tmp_path, environ=env)
    assert config.sync.upstreams == (
        UpstreamConfig(name="ehr", base_url="http://127.0.0.1:8103/fhir/R4", auth=AuthKind.NONE),
    )
    assert config.web.public_url == "https://127.0.0.1:9443"


def test_reports_every_mistake_at_once(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        """
[site]
id = "X"
name = "Clinic"
type = "hospital"
npi = "1234567890"
tax_id = "12-3456789"
timezone = "Mars/Olympus_Mons"

[site.address]
lines = ["1 Main St"]
city = "Town"
state = "ZZ"
postal_code = "6800"

[web]
port = "abc"
tls_cert = "server.pem"

[devices]
simulated = "yes"

[[sync.upstream]]
name = "ehr"
base_url = "ftp://ehr.example"
auth = "oauth"

[[sync.upstream]]
name = "ehr"
base_url = "https://hie.example"
auth = "bearer"
""",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load(path, environ={})
    assert caught.value.source == str(path)
    assert paths_of(caught.value.problems) == {
        "site.id",
        "site.type",
        "site.npi",
        "site.timezone",
        "site.address.state",
        "site.address.postal_code",
        "paths.data_dir",
        "web.port",
        "web.tls_key",
        "devices.simulated",
        "sync.upstream[0].base_url",
        "sync.upstream[0].auth",
        "sync.upstream[1].name",
        "sync.upstream[1].token_file",
        "sync.upstream",
    }
    assert len(caught.value.problems) == 15
    assert "site.npi: '1234567890' fails the NPI check digit (Luhn with prefix 80840)" in (
        caught.value.problems
    )
    assert "web.port: expected an integer from 1 to 65535, got 'abc'" in caught.value.problems
    assert (
        "sync.upstream[0].auth: unknown value 'oauth'; expected one of none, bearer, smart, mtls"
        in caught.value.problems
    )
    assert "paths.data_dir: required" in caught.value.problems
    assert "15 problems" in str(caught.value)


def test_unknown_keys_are_errors_at_every_level() -> None:
    data = doc(
        site={"colour": "blue", "address": {**MINIMAL["site"]["address"], "county": "Cherry"}},
        web={"prot": 8443},
        sync={"upstream": [{"name": "a", "base_url": "https://a.example", "retries": 3}]},
    )
    data["logging"] = {"level": "debug"}
    assert problems_of(data) == [
        "logging: unknown key",
        "site.colour: unknown key",
        "site.address.county: unknown key",
        "web.prot: unknown key",
        "sync.upstream[0].retries: unknown key",
    ]


def test_an_empty_file_lists_every_required_key() -> None:
    assert paths_of(problems_of({})) == {
        *(f"site.{key}" for key in ("id", "name", "type", "npi", "tax_id", "timezone")),
        *(f"site.address.{key}" for key in ("lines", "city", "state", "postal_code")),
        "paths.data_dir",
    }


def test_wrong_shapes_are_reported_not_raised() -> None:
    data = doc(sync={"upstream": {"name": "ehr"}})
    data["web"] = "8443"
    assert problems_of(data) == [
        "web: expected a table, got '8443'",
        "sync.upstream: expected an array of tables ([[sync.upstream]])",
    ]


@pytest.mark.parametrize(
    ("auth", "needs"),
    [
        ("bearer", {"token_file"}),
        ("smart", {"client_id", "token_url", "private_key_file"}),
        ("mtls", {"client_cert_file", "client_key_file"}),
    ],
)
def test_each_auth_kind_requires_its_files(auth: str, needs: set[str]) -> None:
    data = doc(sync={"upstream": [{"name": "a", "base_url": "https://a.example", "auth": auth}]})
    problems = problems_of(data)
    assert paths_of(problems) == {f"sync.upstream[0].{key}" for key in needs}
    assert all(p.endswith(f"required when auth is '{auth}'") for p in problems)


def test_credentials_in_clear_text_do_not_stop_the_config_from_loading() -> None:
    """Refused by the sync process (tests/sync_agent/test_auth.py), not here: the web UI,
    the devices and the CLI load the same config and keep running on one that loaded
    before."""
    up = {"name": "a", "base_url": "http://10.0.0.5/fhir", "auth": "bearer", "token_file": "t"}
    config = parse(
        doc(sync={"upstream": [up | {"client_cert_file": "c.pem"}]}),
        base_dir=Path("/etc/appliance"),
        environ={},
    )
    assert config.sync.upstreams[0].base_url == "http://10.0.0.5/fhir"


def test_malformed_toml_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text('[site]\nid = "a"\nname "Clinic"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load(path, environ={})
    [problem] = caught.value.problems
    assert re.match(r"line 3, column 6: malformed TOML: ", problem), problem


def test_missing_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "site.toml"
    with pytest.raises(ConfigError) as caught:
        load(path, environ={})
    [problem] = caught.value.problems
    assert problem.startswith(f"{path}: no such file")
    assert "docs/site.example.toml" in problem
    assert "\n" not in problem


def test_known_npis() -> None:
    assert npi_is_valid("1234567893")
    assert not npi_is_valid("1234567890")
    assert not npi_is_valid("123456789")
    assert not npi_is_valid("12345678٩3")  # an Arabic-Indic digit is not an ASCII digit


@given(st.from_regex(r"[0-9]{9}", fullmatch=True))
def test_every_nine_digit_prefix_has_exactly_one_check_digit(prefix: str) -> None:
    assert sum(npi_is_valid(f"{prefix}{digit}") for digit in range(10)) == 1


def test_ein_is_stored_as_nine_digits() -> None:
    assert parse(MINIMAL, environ={}).site.tax_id == "123456789"
    assert parse(doc(site={"tax_id": "123456789"}), environ={}).site.tax_id == "123456789"
    assert problems_of(doc(site={"tax_id": "1-23456789"})) == [
        "site.tax_id: expected an EIN (12-3456789 or 123456789), got '1-23456789'"
    ]


def test_relative_paths_resolve_against_the_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "site.toml").write_text(
        (DOCS / "site.example.toml")
        .read_text(encoding="utf-8")
        .replace('"/var/lib/appliance"', '"data"')
        .replace('"/etc/appliance/smart/client-key.pem"', '"secrets/client-key.pem"')
        .replace('"/etc/appliance/tls/server.pem"', '"../tls/server.pem"'),
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    config = load(Path("etc/site.toml"), environ={})
    assert config.paths.data_dir == folder / "data"
    assert config.paths.database == folder / "data" / "appliance.db"
    assert config.sync.upstreams[0].private_key_file == folder / "secrets" / "client-key.pem"
    assert config.web.tls_cert == folder / ".." / "tls" / "server.pem"


def test_environment_overrides_apply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = {"APPLIANCE_WEB_PORT": "9000", "APPLIANCE_WEB_HOST": "::1", "APPLIANCE_DATA_DIR": "var"}
    config = parse(doc(web={"port": 8443}), base_dir=Path("/etc/appliance"), environ=env)
    assert (config.web.host, config.web.port) == ("::1", 9000)
    assert config.web.public_url == "http://[::1]:9000"  # no TLS configured
    assert config.paths.data_dir == tmp_path / "var"  # the shell's folder, not the file's


def test_invalid_environment_values_are_reported_under_their_names() -> None:
    env = {"APPLIANCE_WEB_PORT": "abc", "APPLIANCE_WEB_HOST": " ", "APPLIANCE_DATA_DIR": ""}
    assert problems_of(MINIMAL, env) == [
        "env APPLIANCE_DATA_DIR: expected a file path, got ''",
        "env APPLIANCE_WEB_HOST: expected a non-empty string, got ' '",
        "env APPLIANCE_WEB_PORT: expected an integer from 1 to 65535, got 'abc'",
    ]
    assert problems_of(MINIMAL, {"APPLIANCE_WEB_PORT": "70000"}) == [
        "env APPLIANCE_WEB_PORT: expected an integer from 1 to 65535, got 70000"
    ]


def test_cross_key_rules() -> None:
    data = doc(
        web={"tls_key": "key.pem"},
        sync={
            "upstream": [
                {"name": "a", "base_url": "https://a"},
                {"name": "a", "base_url": "https://b"},
            ]
        },
    )
    assert problems_of(data) == [
        "sync.upstream[1].name: 'a' is already used by sync.upstream[0]",
        "sync.upstream: one upstream EHR per site is supported (2 are configured); keep the "
        "one this site's records belong to",
        "web.tls_cert: required when web.tls_key is set",
    ]


def test_smart_scope_defaults_to_what_the_agent_does_and_is_checked() -> None:
    from sync_agent.auth import DEFAULT_SCOPE

    upstream = {"name": "ehr", "base_url": "https://ehr.example"}
    etc = Path("/etc/appliance")
    [default] = parse(doc(sync={"upstream": [upstream]}), base_dir=etc, environ={}).sync.upstreams
    assert default.scope == DEFAULT_SCOPE
    narrow = "system/Observation.cu system/Patient.rs"
    chosen_doc = doc(sync={"upstream": [upstream | {"scope": narrow}]})
    [chosen] = parse(chosen_doc, base_dir=etc, environ={}).sync.upstreams
    assert chosen.scope == narrow
    assert problems_of(doc(sync={"upstream": [upstream | {"scope": "a  b"}]})) == [
        "sync.upstream[0].scope: expected space-separated SMART scopes such as "
        "system/Observation.cu, got 'a  b'"
    ]


def test_every_problem_of_a_line_protocol_is_listed_with_its_path() -> None:
    good = {
        "name": "thermo",
        "delimiter": "\r\n",
        "pattern": r"T=(?P<temp>\d+\.\d)C",
        "fields": {"temp": {"loinc": "8310-5", "unit": "Cel", "display": "Body temperature"}},
    }
    bad = {"name": "thermo", "pattern": r"(?P<x>\d+", "fields": {"temp": {"loinc": "x"}}}
    data = doc(devices={"line_protocol": [good, bad, dict(good)]})
    with pytest.raises(ConfigError) as info:
        parse(data, environ={})
    problems = info.value.problems
    assert "devices.line_protocol[1].delimiter: required" in problems
    assert "devices.line_protocol[1].fields.temp.unit: required" in problems
    assert any(
        p.startswith("devices.line_protocol[1].pattern: not a valid regular") for p in problems
    )
    assert "devices.line_protocol[2].name: 'thermo' is declared twice" in problems
    assert not any(p.startswith("devices.line_protocol[0]") for p in problems)
    ok = parse(doc(devices={"line_protocol": [good]}), environ={})
    assert ok.devices.line_protocol("thermo") is not None
    assert ok.devices.line_protocol("other") is None


# -- [rpm] ---------------------------------------------------------------------------------


def test_rpm_defaults_are_the_engines_and_rules_own() -> None:
    from services import devices
    from services.alerts import EscalationPolicy
    from services.rpm_rules import RULE_PARAMS, Rule, Severity

    rpm = parse(MINIMAL, environ={}).rpm
    assert rpm == RpmConfig()
    assert (rpm.poll_s, rpm.tick_s) == (devices.ALERT_POLL_S, devices.ALERT_TICK_S)
    policy = EscalationPolicy()
    assert policy.after[Severity.CRITICAL].total_seconds() == rpm.escalate_critical_min * 60
    assert policy.after[Severity.HIGH].total_seconds() == rpm.escalate_high_min * 60
    assert policy.to_role == rpm.escalate_to_role
    assert rpm.quiet_days == RULE_PARAMS[Rule.NO_DATA]["days"].default
    assert rpm.device_silent_hours == RULE_PARAMS[Rule.DEVICE_SILENT]["hours"].default


def test_rpm_values_are_read() -> None:
    rpm = parse(
        doc(
            rpm={
                "poll_s": 1,
                "tick_s": 30,
                "escalate_critical_min": 5,
                "escalate_high_min": 0,
                "escalate_to_role": "nurse",
                "sync_backlog_hours": 0,
                "quiet_days": 2.5,
                "device_silent_hours": 72,
            }
        ),
        environ={},
    ).rpm
    assert rpm == RpmConfig(1.0, 30.0, 5, 0, "nurse", 0.0, 2.5, 72.0)


def test_every_bad_rpm_value_is_reported_with_its_path() -> None:
    problems = problems_of(
        doc(
            rpm={
                "poll_s": 0,
                "tick_s": "60",
                "escalate_critical_min": 0,
                "escalate_high_min": 1.5,
                "escalate_to_role": "doctor",
                "sync_backlog_hours": -1,
                "quiet_days": 31,
                "device_silent_hours": True,
                "quiet_hours": 3,
            }
        )
    )
    assert paths_of(problems) == {
        "rpm.poll_s",
        "rpm.tick_s",
        "rpm.escalate_critical_min",
        "rpm.escalate_high_min",
        "rpm.escalate_to_role",
        "rpm.sync_backlog_hours",
        "rpm.quiet_days",
        "rpm.device_silent_hours",
        "rpm.quiet_hours",
    }
    assert (
        "rpm.escalate_to_role: unknown value 'doctor'; expected one of provider, nurse, admin"
        in (problems)
    )
    assert "rpm.quiet_hours: unknown key" in problems
    assert problems_of({**MINIMAL, "rpm": ["poll_s"]}) == ["rpm: expected a table, got ['poll_s']"]


def test_rpm_ranges_are_those_of_the_rules_and_roles_of_the_users() -> None:
    from appliance.users import Role
    from services.rpm_rules import RULE_PARAMS, Rule

    for key, spec in (
        ("quiet_days", RULE_PARAMS[Rule.NO_DATA]["days"]),
        ("device_silent_hours", RULE_PARAMS[Rule.DEVICE_SILENT]["hours"]),
    ):
        for inside in (spec.low, spec.high):
            parse(doc(rpm={key: float(inside)}), environ={})
        for outside in (spec.low - 1, spec.high + 1):
            assert paths_of(problems_of(doc(rpm={key: float(outside)}))) == {f"rpm.{key}"}
    for role in Role:
        assert parse(doc(rpm={"escalate_to_role": role.value}), environ={}).rpm.escalate_to_role


def test_exam_cameras_take_their_defaults_and_their_names_are_unique() -> None:
    cameras = [{"name": "otoscope"}, {"name": "exam room 2", "device": "/dev/video2"}]
    config = parse({**MINIMAL, "video": {"exam_camera": cameras}}, environ={})
    [otoscope, room] = config.exam_cameras
    assert (otoscope.device, otoscope.format, otoscope.size, otoscope.framerate) == (
        "/dev/video0",
        "v4l2",
        "1280x720",
        30,
    )
    assert config.exam_camera("exam room 2") == room
    assert config.exam_camera("nothing") is None
    assert parse(MINIMAL, environ={}).exam_cameras == ()
    problems = problems_of(
        {
            **MINIMAL,
            "video": {
                "exam_camera": [
                    {"name": "otoscope"},
                    {"name": "otoscope"},
                    {"name": "x", "format": "mjpeg", "size": "big", "framerate": 0},
                    {"device": "/dev/video1"},
                ],
                "uplink": 5,
            },
        }
    )
    assert "video.exam_camera[1].name: 'otoscope' is declared twice" in problems
    assert paths_of(problems) >= {
        "video.exam_camera[2].format",
        "video.exam_camera[2].size",
        "video.exam_camera[2].framerate",
        "video.exam_camera[3].name",
        "video.uplink",
    }
