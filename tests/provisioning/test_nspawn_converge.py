"""The real converge: provisioning/site.yml over SSH into a booted Debian bookworm container.

A cached ``debootstrap`` root (tests/provisioning/nspawn.py) is copied for this session and
booted with ``systemd-nspawn -b``, so systemd is PID 1 inside and the units the roles install
really start under their hardening. Ansible logs in as the example inventory's ``provision``
account over SSH on 127.0.0.1 (a relay into the container's own network namespace) and
converges ``pv-box-1`` of the example fleet with its group_vars and vault. Then: a second
run changes nothing, every appliance service is active after ``READY=1``, ``/healthz``
answers over HTTPS with the fleet CA, the files have their modes, the watchdog restarts a
hung service, and a rolling update to a deliberately broken release rolls back by itself.
The container is powered off with SIGRTMIN+4 and its root deleted only once it is gone.

Part of ``make test``; alone: ``make test-container`` (docs/provisioning.md, "The container
tier").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.provisioning import nspawn
from tests.provisioning.test_ansible import (
    PROVISIONING,
    REPO,
    _env,
    _tool,
    make_control_files,
)

pytestmark = [pytest.mark.slow, pytest.mark.container, pytest.mark.timeout(2400)]

HOST = "pv-box-1"
PUBLIC_NAME = "pv-box-1.prairieview.example.org"
EXAMPLE = PROVISIONING / "inventories/example"
SERVICES = (
    "appliance-web.service",
    "appliance-devices.service",
    "appliance-sync.service",
    "appliance-discovery.service",
)
WEB_PORT = 8443
BROKEN_VERSION = "0.1.1"


@dataclass
class Converged:
    box: nspawn.Box
    work: Path
    inventory: Path
    extra: dict[str, object]
    boot_state: str
    runs: list[tuple[int, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _log(message: str) -> None:
    sys.stderr.write(f"[nspawn] {message}\n")


def _write_inventory(directory: Path, port: int) -> Path:
    """pv-box-1 of the example fleet at 127.0.0.1:<relay port>; the example's group_vars
    (with the vault) and host_vars are used as they are."""
    directory.mkdir()
    hosts = {
        "all": {
            "children": {
                "appliances": {
                    "children": {
                        "region_mountain": {
                            "children": {
                                "site_prairie_view": {
                                    "hosts": {
                                        HOST: {"ansible_host": "127.0.0.1", "ansible_port": port}
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    (directory / "hosts.yml").write_text(json.dumps(hosts, indent=2) + "\n")
    (directory / "group_vars").symlink_to(EXAMPLE / "group_vars")
    (directory / "host_vars").symlink_to(EXAMPLE / "host_vars")
    make_control_files(directory / "ca")
    return directory / "hosts.yml"


def _playbook(
    converged_or_parts: tuple[Path, Path, dict[str, object]],
    playbook: str,
    *more: str,
    timeout: float = 1500,
) -> subprocess.CompletedProcess[str]:
    work, inventory, extra = converged_or_parts
    env = _env()
    env["ANSIBLE_HOME"] = str(work / "ansible-home")
    env["ANSIBLE_SSH_CONTROL_PATH_DIR"] = str(work / "ansible-cp")
    return subprocess.run(
        [
            _tool("ansible-playbook"),
            "-i",
            str(inventory),
            playbook,
            "-e",
            json.dumps(extra),
            *more,
        ],
        cwd=PROVISIONING,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _recap(output: str) -> tuple[int, int]:
    match = re.search(
        rf"{HOST}\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", output
    )
    assert match, output[-4000:]
    assert match.group(3) == "0", output[-4000:]
    return int(match.group(2)), int(match.group(4))


def _changed_tasks(output: str) -> list[str]:
    """The task headers followed by a 'changed:' line (to say what broke idempotence)."""
    found: list[str] = []
    task = ""
    for line in output.splitlines():
        if line.startswith("TASK ["):
            task = line
        elif line.startswith("changed:") and task:
            found.append(task)
    return found


def _keep_logs(work: Path) -> None:
    """Copy the session's logs to ``<cache>/last-run`` (docs/provisioning.md: debugging)."""
    keep = nspawn.CACHE_DIR / "last-run"
    if keep.exists():
        shutil.rmtree(keep)
    keep.mkdir(parents=True)
    for log in work.glob("*.log"):
        shutil.copy2(log, keep / log.name)


@pytest.fixture(scope="module")
def converged() -> Iterator[Converged]:
    missing = nspawn.missing_tools()
    if missing:
        pytest.fail(f"missing host tools {missing}: `make deps-provisioning` installs them")
    # The control node's files (key, inventory, CA, wheels, logs) live beside the working
    # copy, not in pytest's basetemp, which a concurrent pytest session may prune.
    work = nspawn.CACHE_DIR / "runs" / f"control-{os.getpid()}-{int(time.time())}"
    work.mkdir(parents=True)
    timings: dict[str, float] = {}
    started = time.monotonic()
    base = nspawn.base_root(_log)
    timings["base_root"] = time.monotonic() - started
    started = time.monotonic()
    wheels = nspawn.dependency_wheels(REPO, sys.executable, _log)
    wheel = nspawn.build_wheel(REPO, work / "wheels", sys.executable)
    timings["wheels"] = time.monotonic() - started
    started = time.monotonic()
    root = nspawn.working_copy(base, HOST)
    timings["copy"] = time.monotonic() - started
    try:
        started = time.monotonic()
        with nspawn.boot_box(root, HOST, work, wheels=wheels, comment="nspawn-test") as (
            box,
            boot_state,
        ):
            timings["boot"] = time.monotonic() - started
            _log(f"booted: {boot_state}")
            inventory = _write_inventory(work / "inventory", box.relay.port)
            extra = nspawn.converge_vars(box, wheel)
            result = Converged(box, work, inventory, extra, boot_state, timings=timings)
            for run in ("converge", "reconverge"):
                started = time.monotonic()
                done = _playbook((work, inventory, extra), "site.yml")
                timings[run] = time.monotonic() - started
                output = done.stdout + done.stderr
                (work / f"{run}.log").write_text(output)
                assert done.returncode == 0, output[-6000:]
                result.runs.append((_recap(output)[0], output))
            yield result
    finally:
        _log(f"container powered off; timings {timings}")
        (work / "timings.log").write_text(json.dumps(timings, indent=2) + "\n")
        _keep_logs(work)
        # Only now that systemd-nspawn has exited (remove_root refuses a root still in use).
        nspawn.remove_root(root)
        shutil.rmtree(work)


def test_boots_and_second_converge_changes_nothing(converged: Converged) -> None:
    assert converged.boot_state.startswith(("running", "degraded")), converged.boot_state
    (first, _), (second, output) = converged.runs
    assert first > 0
    assert second == 0, _changed_tasks(output)


def test_every_appliance_service_is_active_after_ready(converged: Converged) -> None:
    box = converged.box
    for service in SERVICES:
        unit = box.unit(service)
        # Type=notify: "active (running)" is reached only after READY=1 was received.
        assert unit["Type"] == "notify", (service, unit)
        assert (unit["ActiveState"], unit["SubState"]) == ("active", "running"), (
            service,
            unit,
            box.sh(f"journalctl -u {service} --no-pager -n 30", check=False),
        )
        assert unit["UnitFileState"] == "enabled", (service, unit)
        assert unit["WatchdogUSec"] == "30s", (service, unit)
    assert box.unit("appliance.target")["ActiveState"] == "active"
    timer = box.unit("appliance-backup.timer")
    assert (timer["ActiveState"], timer["UnitFileState"]) == ("active", "enabled"), timer
    # The firewall is really loaded (in the container's own network namespace).
    assert box.unit("nftables.service")["ActiveState"] == "active"
    ruleset = box.sh("nft list ruleset")
    assert "table inet appliance" in ruleset
    assert "tcp dport 8443 accept" in ruleset
    failed = box.sh("systemctl list-units --failed --plain --no-legend")
    assert "appliance" not in failed, failed
    # The services run as the appliance account, not root.
    for service in SERVICES:
        pid = box.unit(service)["MainPID"]
        assert box.sh(f"ps -o user= -p {pid}").strip() == "appliance", service


def test_healthz_answers_over_https_with_the_fleet_ca(converged: Converged) -> None:
    ca = converged.inventory.parent / "ca/fleet-ca.pem"
    deadline = time.monotonic() + 60
    while True:
        status, body = converged.box.https_get(
            WEB_PORT, "/healthz", cafile=ca, server_name=PUBLIC_NAME
        )
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert status == 200, body
    assert json.loads(body)["status"] == "ok", body


def _stat(box: nspawn.Box, path: str) -> str:
    return box.sh(f"stat -c '%a %U %G' {path}").strip()


def test_config_files_have_their_modes_and_owners(converged: Converged) -> None:
    box = converged.box
    expected = {
        "/etc/appliance": "750 root appliance",
        "/etc/appliance/site.toml": "640 root appliance",
        "/etc/appliance/credentials": "700 root root",
        "/etc/appliance/credentials/kek.cred": "600 root root",
        "/etc/appliance/tls": "750 root appliance",
        "/etc/appliance/tls/server-key.pem": "640 root appliance",
        "/etc/appliance/tls/server.pem": "644 root appliance",
        "/etc/nftables.conf": "600 root root",
        "/var/lib/appliance": "700 appliance appliance",
        "/usr/local/lib/appliance/appliance-backup": "755 root root",
        "/etc/appliance/smart": "750 root appliance",
        "/etc/appliance/smart/client-key.pem": "600 appliance appliance",
    }
    actual = {path: _stat(box, path) for path in expected}
    assert actual == expected
    assert box.sh("readlink /opt/appliance/current").strip() == "releases/0.1.0"
    # The KEK is sealed (systemd-creds), not 32 plaintext bytes.
    assert int(box.sh("stat -c %s /etc/appliance/credentials/kek.cred")) > 32
    # The database exists and is private to the appliance account.
    assert _stat(box, "/var/lib/appliance/appliance.db").startswith("600 appliance")


def test_watchdog_restarts_a_hung_service(converged: Converged) -> None:
    box = converged.box
    service = "appliance-sync.service"
    before = box.unit(service)
    old_pid = before["MainPID"]
    assert before["ActiveState"] == "active", before
    assert old_pid != "0", before
    started = time.monotonic()
    # SIGSTOP: the process still exists but no longer pings WATCHDOG=1.
    box.sh(f"kill -STOP {old_pid}")
    after = before
    while time.monotonic() - started < 150:
        time.sleep(2)
        after = box.unit(service)
        if after["MainPID"] not in (old_pid, "0") and after["ActiveState"] == "active":
            break
    elapsed = time.monotonic() - started
    converged.timings["watchdog_restart"] = elapsed
    _log(f"watchdog: {service} hung at t=0, active again with a new PID after {elapsed:.1f} s")
    assert after["MainPID"] not in (old_pid, "0"), (after, elapsed)
    assert after["ActiveState"] == "active", after
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1, after
    # WatchdogSec=30 counts from the last ping, and the service pings every 15 s (half the
    # timeout, appliance.sdnotify.watchdog_interval): the stop lands 0-15 s after a ping, so
    # the kill comes 15-30 s after it, then RestartSec=2 and the start. (A run saw 26.1 s.)
    assert 15 <= elapsed <= 120, elapsed
    journal = box.sh(f"journalctl -u {service} --no-pager --since=-5min")
    assert "Watchdog timeout" in journal, journal[-3000:]


def _break_web(source: Path) -> None:
    """The broken release: its web process exits at start (never READY=1, no /healthz)."""
    main = source / "web/main.py"
    text = main.read_text()
    anchor = "from __future__ import annotations\n"
    assert anchor in text
    main.write_text(
        text.replace(
            anchor,
            anchor + 'raise SystemExit("appliance-web: deliberately broken release (test)")\n',
            1,
        )
    )


def test_rolling_update_to_a_broken_release_rolls_back_by_itself(converged: Converged) -> None:
    box = converged.box
    broken = nspawn.build_wheel(
        REPO, converged.work / "wheels", sys.executable, version=BROKEN_VERSION, patch=_break_web
    )
    extra = {
        **converged.extra,
        "appliance_version": BROKEN_VERSION,
        "appliance_wheel": str(broken),
        "rolling_update_healthz_retries": 10,
        "rolling_update_healthz_delay": 2,
    }
    started = time.monotonic()
    done = _playbook((converged.work, converged.inventory, extra), "rolling_update.yml")
    converged.timings["rolling_update"] = time.monotonic() - started
    output = done.stdout + done.stderr
    (converged.work / "rolling_update.log").write_text(output)
    assert done.returncode != 0, output[-6000:]
    _, failed = _recap(output)
    assert failed == 1, output[-6000:]
    assert f"release {BROKEN_VERSION} was unhealthy" in output, output[-6000:]
    assert "rolled back to releases/0.1.0, which is healthy again" in output, output[-6000:]
    # The new release was installed beside the old one, and current points back at the old.
    assert (
        box.sh(f"test -x /opt/appliance/releases/{BROKEN_VERSION}/bin/python && echo yes").strip()
        == "yes"
    )
    assert box.sh("readlink /opt/appliance/current").strip() == "releases/0.1.0"
    for service in SERVICES:
        unit = box.unit(service)
        assert (unit["ActiveState"], unit["SubState"]) == ("active", "running"), (service, unit)
    ca = converged.inventory.parent / "ca/fleet-ca.pem"
    status, body = box.https_get(WEB_PORT, "/healthz", cafile=ca, server_name=PUBLIC_NAME)
    assert status == 200, body
    # The code behind current is the previous release's again.
    version = box.sh(
        "/opt/appliance/current/bin/python -c 'import appliance; print(appliance.__version__)'"
    )
    assert version.strip() == "0.1.0"


HEALTHY_VERSION = "0.1.2"
# What identifies the box's database: its wrapped data keys (made when the store was first
# opened; a new database would have new ones) and how many audit records it holds.
_DATABASE_SNAPSHOT = (
    '/opt/appliance/current/bin/python -c "import hashlib, sqlite3; '
    "c = sqlite3.connect('file:/var/lib/appliance/appliance.db?mode=ro', uri=True); "
    "keys = c.execute('SELECT version, wrapped FROM data_keys ORDER BY version').fetchall(); "
    "print(len(keys), hashlib.sha256(repr(keys).encode()).hexdigest(), "
    "c.execute('SELECT count(*) FROM audit').fetchone()[0])\""
)


def test_rolling_update_to_a_healthy_release_switches_and_keeps_the_data(
    converged: Converged,
) -> None:
    """After the broken release was rolled back: a healthy one goes in, ``current`` moves,
    the services answer from the new code, and the database (the audit chain here) is the
    same one, carried over untouched."""
    box = converged.box
    keys_before, digest_before, audit_before = box.sh(_DATABASE_SNAPSHOT).split()
    healthy = nspawn.build_wheel(
        REPO, converged.work / "wheels", sys.executable, version=HEALTHY_VERSION
    )
    extra = {
        **converged.extra,
        "appliance_version": HEALTHY_VERSION,
        "appliance_wheel": str(healthy),
    }
    started = time.monotonic()
    done = _playbook((converged.work, converged.inventory, extra), "rolling_update.yml")
    converged.timings["rolling_update_healthy"] = time.monotonic() - started
    output = done.stdout + done.stderr
    (converged.work / "rolling_update_healthy.log").write_text(output)
    assert done.returncode == 0, output[-6000:]
    assert _recap(output)[1] == 0, output[-6000:]
    assert box.sh("readlink /opt/appliance/current").strip() == f"releases/{HEALTHY_VERSION}"
    for service in SERVICES:
        unit = box.unit(service)
        assert (unit["ActiveState"], unit["SubState"]) == ("active", "running"), (service, unit)
        # Restarted onto the new release: its extension modules are mapped from there.
        pid = unit["MainPID"]
        mapped = box.sh(f"grep -c 'releases/{HEALTHY_VERSION}/' /proc/{pid}/maps", check=False)
        assert int(mapped.strip() or 0) > 0, (service, pid)
    version = box.sh(
        "/opt/appliance/current/bin/python -c 'import appliance; print(appliance.__version__)'"
    )
    assert version.strip() == HEALTHY_VERSION
    # The same database, carried over: the same data keys, and every audit record of before.
    keys_after, digest_after, audit_after = box.sh(_DATABASE_SNAPSHOT).split()
    assert int(keys_before) > 0
    assert (keys_after, digest_after) == (keys_before, digest_before)
    assert int(audit_after) >= int(audit_before)


def test_molecule_scenario_verify_passes_on_the_converged_box(converged: Converged) -> None:
    """provisioning/molecule/default/verify.yml: the scenario's own checks, run by Ansible
    against the box this tier created and converged (create/destroy are nspawn's here)."""
    done = _playbook(
        (converged.work, converged.inventory, converged.extra),
        "molecule/default/verify.yml",
        timeout=600,
    )
    output = done.stdout + done.stderr
    (converged.work / "verify.log").write_text(output)
    assert done.returncode == 0, output[-6000:]
    changed, failed = _recap(output)
    assert (changed, failed) == (0, 0), output[-6000:]
    assert "The box says it is healthy" in output
