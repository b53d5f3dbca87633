"""The Ansible in ``provisioning/``: lint, syntax, and a real converge of the file tasks.

What runs here is what can run safely on a CI machine that is not a box (PID 1 is not
systemd, no users may be created): the roles converge into a temporary root directory with
``connection: local``, twice; the second run must report ``changed=0``. The full converge
over SSH into a booted systemd-nspawn container is test_nspawn_converge.py; the OS image,
booted under qemu, is test_image.py (docs/provisioning.md).
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from appliance.config import load

REPO = Path(__file__).resolve().parents[2]
PROVISIONING = REPO / "provisioning"
INVENTORY = PROVISIONING / "inventories/example/hosts.yml"
VAULT_PASSWORD = PROVISIONING / "inventories/example/vault-password.TEST-ONLY.txt"
BIN = Path(sys.executable).parent
PLAYBOOKS = (
    "site.yml",
    "rolling_update.yml",
    "decommission.yml",
    # The Molecule-style scenario (verify.yml runs in the container tier).
    "molecule/default/converge.yml",
    "molecule/default/verify.yml",
)
# The CA key passphrase stored in the example vault (encrypted with the test-only password).
VAULT_CA_PASSPHRASE = "example-ca-passphrase-test-only"


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN} (make test installs the dev extras)")
    return str(path)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(PROVISIONING / "ansible.cfg"),
        ANSIBLE_VAULT_PASSWORD_FILE=str(VAULT_PASSWORD),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        # Ansible's own state (~/.ansible) goes to a temporary directory, not the host's home.
        ANSIBLE_HOME=str(Path(tempfile.gettempdir()) / "appliance-tests-ansible-home"),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def test_ansible_lint_production_profile_reports_nothing(tmp_path: Path) -> None:
    # On a copy: ansible-lint keeps its cache in <project>/.ansible, which must not appear in
    # the work tree.
    project = tmp_path / "provisioning"
    shutil.copytree(PROVISIONING, project, ignore=shutil.ignore_patterns(".ansible"))
    env = _env()
    env.update(
        ANSIBLE_CONFIG=str(project / "ansible.cfg"),
        ANSIBLE_VAULT_PASSWORD_FILE=str(project / VAULT_PASSWORD.relative_to(PROVISIONING)),
    )
    result = subprocess.run(
        [_tool("ansible-lint"), "--profile", "production", "--offline", "--nocolor"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "0 failure(s), 0 warning(s)" in output, output
    assert "Decryption failed" not in output, output
    assert "Profile 'production' was required, and it passed" in output, output


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_playbook_syntax(playbook: str) -> None:
    result = subprocess.run(
        [_tool("ansible-playbook"), "--syntax-check", "-i", str(INVENTORY), playbook],
        cwd=PROVISIONING,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_vault_file_is_encrypted_and_opens_with_the_test_password() -> None:
    vault = PROVISIONING / "inventories/example/group_vars/appliances/vault.yml"
    assert vault.read_text().startswith("$ANSIBLE_VAULT;1.1;AES256")
    result = subprocess.run(
        [_tool("ansible-vault"), "view", "--vault-password-file", str(VAULT_PASSWORD), str(vault)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"vault_appliance_tls_ca_key_passphrase: {VAULT_CA_PASSPHRASE}" in result.stdout


# -- the converge ------------------------------------------------------------------------


def _openssl(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        ["openssl", *args], capture_output=True, text=True, check=False, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def make_control_files(ca: Path) -> None:
    """The fleet CA (key locked with the vault's passphrase) and the backup recipient, where
    group_vars/all.yml looks for them (``<inventory_dir>/ca``; here or in the container tier)."""
    (ca / "issued").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PASS": VAULT_CA_PASSPHRASE}
    common = ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-days", "2"]
    _openssl(
        *common,
        "-passout",
        "env:PASS",
        "-keyout",
        str(ca / "fleet-ca-key.pem"),
        "-out",
        str(ca / "fleet-ca.pem"),
        "-subj",
        "/CN=Test fleet CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        env=env,
    )
    _openssl(
        *common,
        "-nodes",
        "-keyout",
        str(ca / "backup-recipient-key.pem"),
        "-out",
        str(ca / "backup-recipient.pem"),
        "-subj",
        "/CN=Test backup recipient",
    )


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The control node's files: a fleet CA (key locked with the vault's passphrase) and the
    backup recipient certificate."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is missing (Debian package openssl)")
    ca = tmp_path_factory.mktemp("control")
    make_control_files(ca)
    return ca


def _converge(root: Path, control: Path) -> tuple[int, str]:
    extra = {
        "ansible_become": False,
        "ansible_python_interpreter": sys.executable,
        "base_root": str(root),
        "base_manage_system": False,
        "appliance_root": str(root),
        "appliance_manage_system": False,
        "appliance_file_group": "root",
        "appliance_kek_seal_command": "cp /dev/stdin",
        "appliance_tls_ca_cert": str(control / "fleet-ca.pem"),
        "appliance_tls_ca_key": str(control / "fleet-ca-key.pem"),
        "appliance_tls_issued_dir": str(control / "issued"),
        "appliance_wheel": "",
        "kiosk_root": str(root),
        "kiosk_manage_system": False,
        "backup_root": str(root),
        "backup_manage_system": False,
        "backup_recipient_cert": str(control / "backup-recipient.pem"),
    }
    env = _env()
    env["ANSIBLE_ROLES_PATH"] = str(PROVISIONING / "roles")
    result = subprocess.run(
        [
            _tool("ansible-playbook"),
            "-i",
            str(INVENTORY),
            str(Path(__file__).with_name("converge_local.yml")),
            "-e",
            json.dumps(extra),
        ],
        cwd=PROVISIONING,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    recap = re.search(r"pv-box-1\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=0\s+failed=0", output)
    assert recap, output
    return int(recap.group(2)), output


def _mode(path: Path) -> int:
    return path.lstat().st_mode & 0o7777


@pytest.fixture(scope="module")
def converged(
    tmp_path_factory: pytest.TempPathFactory, control: Path
) -> tuple[Path, int, int, bytes, str]:
    root = tmp_path_factory.mktemp("box-root")
    first, _ = _converge(root, control)
    kek = (root / "etc/appliance/credentials/kek.cred").read_bytes()
    second, output = _converge(root, control)
    return root, first, second, kek, output


@pytest.mark.slow
def test_second_converge_changes_nothing(converged: tuple[Path, int, int, bytes, str]) -> None:
    _, first, second, _, output = converged
    assert first > 0
    assert second == 0, output


@pytest.mark.slow
def test_release_is_a_virtualenv_behind_the_current_link(
    converged: tuple[Path, int, int, bytes, str],
) -> None:
    root = converged[0]
    release = root / "opt/appliance/releases/0.1.0"
    assert (release / "bin/python").exists()
    assert (release / "pyvenv.cfg").exists()
    current = root / "opt/appliance/current"
    assert current.is_symlink()
    assert os.readlink(current) == "releases/0.1.0"


@pytest.mark.slow
def test_kek_made_once_private_and_never_overwritten(
    converged: tuple[Path, int, int, bytes, str],
) -> None:
    root, _, _, kek_after_first_run, _ = converged
    kek = root / "etc/appliance/credentials/kek.cred"
    assert len(kek_after_first_run) == 32
    assert kek.read_bytes() == kek_after_first_run
    assert _mode(kek) == 0o600
    assert _mode(kek.parent) == 0o700


@pytest.mark.slow
def test_site_toml_is_rendered_from_the_inventory_and_loads(
    converged: tuple[Path, int, int, bytes, str],
) -> None:
    root = converged[0]
    site = root / "etc/appliance/site.toml"
    assert _mode(site) == 0o640
    assert _mode(site.parent) == 0o750
    config = load(site, environ={"CREDENTIALS_DIRECTORY": "/run/credentials/appliance-web.service"})
    assert config.site.id == "prairie-view-hopd"
    assert config.site.npi == "1987654328"
    assert config.web.port == 8443
    assert config.web.public_url == "https://pv-box-1.prairieview.example.org:8443"
    assert config.keys.kek_file == Path("/run/credentials/appliance-web.service/kek")
    assert config.sync.upstreams[0].base_url == "https://fhir.prairieview.example.org/api/FHIR/R4"


@pytest.mark.slow
def test_tls_certificate_is_signed_by_the_fleet_ca(
    converged: tuple[Path, int, int, bytes, str], control: Path
) -> None:
    root = converged[0]
    tls = root / "etc/appliance/tls"
    _openssl("verify", "-CAfile", str(control / "fleet-ca.pem"), str(tls / "server.pem"))
    text = _openssl("x509", "-in", str(tls / "server.pem"), "-noout", "-ext", "subjectAltName")
    assert "DNS:pv-box-1.prairieview.example.org" in text
    assert "DNS:pv-box-1.local" in text
    assert _mode(tls / "server-key.pem") == 0o640
    # The key stayed on the box: the control node holds only the request and the certificate.
    assert sorted(p.name for p in (control / "issued").iterdir() if "pv-box-1" in p.name) == [
        "pv-box-1.cnf",
        "pv-box-1.csr",
        "pv-box-1.pem",
    ]


@pytest.mark.slow
def test_units_firewall_kiosk_and_backup_files(
    converged: tuple[Path, int, int, bytes, str],
) -> None:
    root = converged[0]
    units = root / "etc/systemd/system"
    for unit in (REPO / "systemd").iterdir():
        assert filecmp.cmp(unit, units / unit.name, shallow=False), unit.name
    nft = (root / "etc/nftables.conf").read_text()
    assert "policy drop" in nft
    assert "ip saddr @lan4 tcp dport 8443 accept" in nft
    assert "ip saddr @it4 tcp dport 22 accept" in nft
    assert "udp dport 5353" in nft
    assert _mode(root / "etc/nftables.conf") == 0o600
    assert "SystemMaxUse=500M" in (root / "etc/systemd/journald.conf.d/appliance.conf").read_text()
    policy = json.loads((root / "etc/chromium/policies/managed/appliance-kiosk.json").read_text())
    assert policy["URLBlocklist"] == ["*"]
    assert policy["URLAllowlist"] == ["https://localhost:8443"]
    # The video visit's camera and microphone, without a prompt, for the box's pages only.
    assert policy["VideoCaptureAllowedUrls"] == ["https://localhost:8443"]
    assert policy["AudioCaptureAllowedUrls"] == ["https://localhost:8443"]
    assert "--kiosk" in (units / "appliance-kiosk.service").read_text()
    assert _mode(root / "usr/local/lib/appliance/appliance-backup") == 0o755
    assert (root / "etc/appliance/backup/recipient.pem").exists()


@pytest.mark.slow
def test_backup_program_output_decrypts_to_the_database(control: Path, tmp_path: Path) -> None:
    """The installed backup program on a real SQLite file, then the documented restore."""
    import sqlite3

    db = tmp_path / "appliance.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x TEXT)")
        conn.execute("INSERT INTO t VALUES ('ciphertext stand-in')")
    conn.close()
    program = PROVISIONING / "roles/backup/files/appliance-backup"
    backups = tmp_path / "backups"
    for _ in range(3):
        result = subprocess.run(
            ["sh", str(program), str(db), str(backups), str(control / "backup-recipient.pem"), "2"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    kept = sorted(backups.iterdir())
    assert 1 <= len(kept) <= 2  # names have one-second resolution; the newest 2 are kept
    assert all(_mode(p) == 0o600 for p in kept)
    restored = tmp_path / "restored.db"
    _openssl(
        "cms",
        "-decrypt",
        "-binary",
        "-inform",
        "DER",
        "-in",
        str(kept[-1]),
        "-inkey",
        str(control / "backup-recipient-key.pem"),
        "-recip",
        str(control / "backup-recipient.pem"),
        "-out",
        str(restored),
    )
    with sqlite3.connect(restored) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [("ciphertext stand-in",)]
    conn.close()
