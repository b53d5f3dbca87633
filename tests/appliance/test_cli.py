"""The appliance CLI against a real site config, database and key (in-process)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from appliance import audit, db
from appliance.cli import main
from appliance.keys import generate_kek_file
from appliance.store import Store
from tests import factories
from tests.tamper import move_ciphertext

SITE = factories.SITE_TOML


@pytest.fixture
def site(tmp_path: Path) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(SITE)
    assert main(["init", "--dev-key", "--config", str(path)]) == 0
    return path


def _audit_rows(site: Path, n: int) -> None:
    from datetime import UTC, datetime

    conn = db.connect_sync(site.parent / "data" / "appliance.db")
    for i in range(n):
        with db.transaction_sync(conn):
            audit.append(
                conn,
                [
                    audit.AuditEvent(
                        f"user:nurse{i % 2}", audit.AuditAction.READ, entity=f"Observation/{i}"
                    )
                ],
                now=datetime.now(UTC),
            )
    conn.close()


def test_init_creates_a_private_key_and_the_database(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = site.parent / "data"
    assert (data / "keys" / "kek").stat().st_mode & 0o777 == 0o600
    assert (data / "appliance.db").exists()
    assert main(["init", "--config", str(site)]) == 0  # idempotent, never overwrites the key


def test_audit_verify_passes_then_names_the_altered_record(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _audit_rows(site, 12)
    assert main(["audit", "verify", "--quiet", "--config", str(site)]) == 0
    assert "12 records" in capsys.readouterr().out
    raw = sqlite3.connect(site.parent / "data" / "appliance.db")
    raw.execute("DROP TRIGGER audit_no_update")
    raw.execute("UPDATE audit SET actor = 'user:mallory' WHERE id = 5")
    raw.execute(
        "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'x'); END"
    )
    raw.commit()
    raw.close()
    assert main(["audit", "verify", "--quiet", "--config", str(site)]) == 1
    assert "record 5" in capsys.readouterr().err


def test_audit_report_filters_by_user_as_json(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _audit_rows(site, 6)
    capsys.readouterr()
    assert (
        main(["audit", "report", "--user", "nurse1", "--format", "json", "--config", str(site)])
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["actor"] for r in rows] == ["user:nurse1"] * 3


def test_config_with_mistakes_lists_them_all_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        SITE.replace('npi = "1234567893"', 'npi = "1234567890"').replace(
            'type = "office"', 'type = "spaceport"'
        )
        + "\n[web]\nport = 0\ncolour = 'red'\n"
    )
    assert main(["audit", "verify", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    for path in ("site.npi", "site.type", "web.port", "web.colour"):
        assert path in err


def test_wrong_key_is_one_clear_line(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kek = site.parent / "data" / "keys" / "kek"
    kek.unlink()
    generate_kek_file(kek)
    assert main(["audit", "verify", "--config", str(site)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not the one that protects this database" in err
    assert "\n" not in err


def test_keys_rotate_kek_and_data_through_the_cli(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kek = site.parent / "data" / "keys" / "kek"
    before = kek.read_bytes()
    assert main(["keys", "rotate", "kek", "--config", str(site)]) == 0
    assert kek.read_bytes() != before
    assert main(["keys", "rotate", "data", "--config", str(site)]) == 0
    assert "data key version" in capsys.readouterr().out
    assert main(["audit", "verify", "--quiet", "--config", str(site)]) == 0


async def test_keys_rotate_data_names_records_it_could_not_re_encrypt(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = site.parent / "data"
    store = await Store.open(data / "appliance.db", data / "keys" / "kek")
    [a, b] = await store.create(
        [factories.patient(mrn="C1"), factories.patient(mrn="C2", family="Other")], "user:test"
    )
    await store.close()
    move_ciphertext(data / "appliance.db", b.logical_id, a.logical_id)
    assert main(["keys", "rotate", "data", "--config", str(site)]) == 1  # before: a traceback
    captured = capsys.readouterr()
    assert "re-encrypted 1 rows" in captured.out
    assert f"resources rows: {b.row_id}" in captured.err
    assert "failed authentication" in captured.err


def test_sync_status_reports_the_outbox(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sync", "status", "--config", str(site)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["outbox"] == []
    assert status["dead_letters"] == []


def test_users_add_and_reset_mfa_are_audited_and_remove_the_factor(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from datetime import UTC, datetime

    import pyotp

    from appliance import mfa
    from appliance.keys import load_keyring

    secret_file = tmp_path / "pw"
    secret_file.write_text("correct horse battery staple\n")
    argv = ["users", "add", "admin9", "--role", "admin", "--password-file", str(secret_file)]
    assert main([*argv, "--config", str(site)]) == 0
    database = site.parent / "data" / "appliance.db"
    conn = db.connect_sync(database)
    kek = (site.parent / "data" / "keys" / "kek").read_bytes()
    keyring = load_keyring(conn, kek)
    [user_id] = conn.execute("SELECT id FROM users WHERE username = 'admin9'").fetchone()
    now = datetime.now(UTC)
    secret = mfa.begin_enrolment(conn, keyring, user_id, now=now)
    assert mfa.confirm_enrolment(conn, keyring, user_id, pyotp.TOTP(secret).now(), now=now)
    assert mfa.is_enabled(conn, user_id)
    assert main(["users", "reset-mfa", "admin9", "--config", str(site)]) == 0
    assert not mfa.is_enabled(conn, user_id)
    assert "second factor of admin9 is removed" in capsys.readouterr().out
    rows = conn.execute(
        "SELECT action, detail FROM audit WHERE entity = 'user:admin9' ORDER BY id"
    ).fetchall()
    conn.close()
    assert rows == [
        ("config", "account created at the terminal (admin)"),
        ("config", "second factor removed at the terminal"),
    ]
    assert main(["users", "reset-mfa", "nobody", "--config", str(site)]) == 2


def test_audit_verify_checks_the_local_trail_when_the_upstream_credentials_do_not_load(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with site.open("a") as config:
        config.write(
            '\n[[sync.upstream]]\nname = "ehr"\nbase_url = "https://127.0.0.1:9/fhir"\n'
            'auth = "smart"\nclient_id = "box"\ntoken_url = "https://127.0.0.1:9/token"\n'
            f'private_key_file = "{site.parent / "missing-key.pem"}"\n'
        )
    _audit_rows(site, 3)
    # Before: the missing key file ended the command before the local check.
    assert main(["audit", "verify", "--quiet", "--config", str(site)]) == 0
    captured = capsys.readouterr()
    assert "3 records" in captured.out
    assert "upstream anchors not checked: ehr could not be asked" in captured.err
    assert "missing-key.pem" in captured.err
