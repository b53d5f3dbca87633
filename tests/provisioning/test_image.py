"""The OS image (images/): built, checked with debugfs, booted under qemu with a smoke unit.

The image is built by ``images.build`` (debootstrap root with a kernel, converged in nspawn
with ``provisioning/site.yml`` like the container tier, per-box secrets and identity taken
out, ``mkfs.ext4 -d``) and cached in ``/var/cache/telehealth-test/os-image-<hash>`` under a
hash of everything it is built from (``images.build.input_key``; set
``TELEHEALTH_IMAGE_REBUILD=1`` to build anew regardless).

The boot: a copy of ``image.ext4`` gets back the keys of the box the build converged
(``images.build.inject``: what that box's own first converge would have made; the image
itself carries none), then ``qemu-system-x86_64 -accel tcg`` boots it with the kernel and
initramfs passed directly, no network device at all, and ``systemd.wants=
telehealth-smoke.service`` on the kernel command line: that unit, installed but not enabled
in the image, waits for the appliance services, writes
``/var/lib/telehealth-smoke/result.json`` and powers off. The test reads it back with
``debugfs``.

Not part of ``make test`` (minutes of emulation): ``make test-image`` (docs/provisioning.md,
"The OS image").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from images import build
from tests.provisioning import nspawn
from tests.provisioning.test_nspawn_converge import SERVICES

pytestmark = [pytest.mark.slow, pytest.mark.image, pytest.mark.timeout(5400)]

QEMU = "qemu-system-x86_64"
# Emulated (TCG) boot to the smoke result and power-off; measured in docs/provisioning.md.
QEMU_TIMEOUT_S = float(os.environ.get("TELEHEALTH_IMAGE_BOOT_TIMEOUT", "2400"))
RESULT = "/var/lib/telehealth-smoke/result.json"
COMPLETE = ".telehealth-image-complete"
CMDLINE = (
    "root=/dev/vda rw console=ttyS0 panic=-1 "
    f"systemd.wants={build.SMOKE_UNIT} "
    # Everything is many times slower under TCG than on a box: no start job may time out.
    "systemd.default_timeout_start_sec=900 systemd.show_status=1"
)


def _log(message: str) -> None:
    sys.stderr.write(f"[image] {message}\n")


@dataclass
class Built:
    directory: Path
    description: dict[str, object]
    seconds: float

    @property
    def image(self) -> Path:
        return self.directory / "image.ext4"


@dataclass
class Booted:
    built: Built
    disk: Path
    returncode: int
    console: str
    fsck: subprocess.CompletedProcess[str]
    result: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def _missing() -> list[str]:
    return [*build.missing_tools(), *([QEMU] if shutil.which(QEMU) is None else [])]


@pytest.fixture(scope="module")
def built() -> Built:
    missing = _missing()
    if missing:
        pytest.fail(f"missing host tools {missing}: `make deps-provisioning deps-image`")
    key = build.input_key()
    final = nspawn.CACHE_DIR / f"os-image-{key}"
    started = time.monotonic()
    with nspawn._locked(nspawn.CACHE_DIR / f".os-image-{key}.lock"):
        if os.environ.get("TELEHEALTH_IMAGE_REBUILD") == "1" and final.exists():
            shutil.rmtree(final)
        if not (final / COMPLETE).exists():
            partial = nspawn.CACHE_DIR / f".build-os-image-{key}"
            if partial.exists():
                shutil.rmtree(partial)
            if final.exists():
                shutil.rmtree(final)
            build.build(partial, box_secrets=partial / "box-secrets", log=_log)
            (partial / COMPLETE).write_text("")
            partial.rename(final)
    # Images of older inputs go (a session booting one boots its own copy of it).
    for old in nspawn.CACHE_DIR.glob("os-image-*"):
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    description = json.loads((final / "image.json").read_text())
    return Built(final, description, time.monotonic() - started)


def _fs(image: Path, command: str) -> str:
    """One debugfs request against the image, read-only; its output (``-R``: unlike a
    ``-f`` script, the command is not echoed)."""
    return nspawn.run(["debugfs", "-R", command, str(image)], timeout=120).stdout


def _exists(image: Path, path: str) -> bool:
    out = subprocess.run(
        ["debugfs", "-R", f"stat {path}", str(image)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return "File not found" not in out.stderr + out.stdout and out.returncode == 0


def _cat(image: Path, path: str) -> str:
    return _fs(image, f"cat {path}")


def _names(image: Path, directory: str) -> list[str]:
    """The entries of a directory in the image (``ls -p``: /ino/mode/uid/gid/name/size/)."""
    names = []
    for line in _fs(image, f"ls -p {directory}").splitlines():
        parts = line.strip().strip("/").split("/")
        if len(parts) >= 5 and parts[4] not in (".", ".."):
            names.append(parts[4])
    return names


def _boot(built: Built, name: str, *, inject: bool, cmdline: str = "") -> Booted:
    """Boot a copy of the image under qemu (TCG, kernel passed directly, no network device)
    until the smoke unit powers it off; its result read back with debugfs. With ``inject``,
    the copy first gets back the keys and machine ID of the box the build converged."""
    work = nspawn.CACHE_DIR / "runs" / f"image-{name}-{os.getpid()}-{int(time.time())}"
    work.mkdir(parents=True)
    timings: dict[str, float] = {}
    console_log = work / "console.log"
    keep = nspawn.CACHE_DIR / "last-image-run" / name
    if keep.exists():
        shutil.rmtree(keep)
    keep.mkdir(parents=True)
    try:
        disk = work / "boot.ext4"
        started = time.monotonic()
        nspawn.run(["cp", "--sparse=always", str(built.image), str(disk)], timeout=600)
        if inject:
            injected = build.inject(disk, built.directory / "box-secrets")
            _log(f"{name}: the box's keys put back into the copy: {injected}")
        timings["copy"] = time.monotonic() - started
        argv = [
            QEMU,
            "-accel",
            "tcg",
            "-smp",
            "2",
            "-m",
            "2048",
            "-nographic",
            "-no-reboot",
            "-kernel",
            str(built.directory / "vmlinuz"),
            "-initrd",
            str(built.directory / "initrd.img"),
            "-append",
            f"{CMDLINE} {cmdline}".strip(),
            "-drive",
            f"file={disk},format=raw,if=virtio",
            "-nic",
            "none",
        ]
        started = time.monotonic()
        with console_log.open("wb") as console:
            qemu = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT
            )
            try:
                returncode = qemu.wait(timeout=QEMU_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                qemu.kill()
                qemu.wait(timeout=60)
                tail = "\n".join(console_log.read_text(errors="replace").splitlines()[-60:])
                pytest.fail(
                    f"{name}: qemu did not power off within {QEMU_TIMEOUT_S:.0f} s:\n{tail}"
                )
        timings["qemu_boot_to_poweroff"] = time.monotonic() - started
        console_text = console_log.read_text(errors="replace")
        # e2fsck -n reports, changes nothing: 0 only if the power-off left a clean file system.
        fsck = subprocess.run(
            ["e2fsck", "-fn", str(disk)], capture_output=True, text=True, timeout=600, check=False
        )
        raw = _cat(disk, RESULT)
        (keep / "result.json").write_text(raw)
        try:
            result = json.loads(raw)
        except json.JSONDecodeError:
            tail = "\n".join(console_text.splitlines()[-80:])
            pytest.fail(f"{name}: no smoke result in the image (qemu exit {returncode}):\n{tail}")
        _log(f"{name}: qemu exited {returncode}; timings {timings}")
        return Booted(built, disk, returncode, console_text, fsck, result, timings)
    finally:
        if console_log.exists():
            shutil.copy2(console_log, keep / "console.log")
        (keep / "timings.json").write_text(
            json.dumps({"build_or_cache": built.seconds, **timings}, indent=2) + "\n"
        )
        shutil.rmtree(work)


@pytest.fixture(scope="module")
def booted(built: Built) -> Booted:
    """The image as a provisioned box boots it: with that box's keys and machine ID."""
    return _boot(built, "provisioned", inject=True)


@pytest.fixture(scope="module")
def shipped(built: Built) -> Booted:
    """The image exactly as built, on its first boot: no keys yet, so the services that need
    the KEK cannot start; the smoke unit waits one minute only."""
    return _boot(
        built,
        "shipped",
        inject=False,
        cmdline="systemd.setenv=TELEHEALTH_SMOKE_WAIT_S=60 systemd.setenv=TELEHEALTH_SMOKE_STABLE_S=0",
    )


# -- the image as built ---------------------------------------------------------------------


def test_image_carries_no_box_secrets_and_no_machine_identity(built: Built) -> None:
    image = built.image
    for relative in build.BOX_SECRETS:
        assert not _exists(image, f"/{relative}"), relative
    assert [name for name in _names(image, "/etc/ssh") if name.startswith("ssh_host_")] == []
    assert _cat(image, "/etc/machine-id") == ""
    assert not _exists(image, "/var/lib/systemd/random-seed")
    assert not _exists(image, "/root/.ssh/authorized_keys")
    assert not _exists(image, f"/home/{nspawn.PROVISION_USER}/.ssh/authorized_keys")
    assert not _exists(image, "/etc/ssh/sshd_config.d/telehealth-test.conf")
    # No database sealed under the build's KEK, no journal of the build box.
    assert _names(image, "/var/lib/appliance") == []
    assert _names(image, "/var/log/journal") == []
    assert _cat(image, "/etc/hostname").strip() == build.HOSTNAME
    # The directories the role made stay, empty, with their modes.
    assert _exists(image, "/etc/appliance/credentials")
    assert built.description["box_secrets_kept"] is True
    kept = json.loads((built.directory / "box-secrets/manifest.json").read_text())
    assert {entry["path"] for entry in kept} >= {
        "etc/appliance/credentials/kek.cred",
        "etc/appliance/tls/server-key.pem",
    }


def test_image_carries_the_release_units_kernel_and_fstab(built: Built) -> None:
    image = built.image
    assert "releases/0.1.0" in _fs(image, "stat /opt/appliance/current")
    assert _exists(image, "/opt/appliance/releases/0.1.0/bin/python")
    assert _exists(image, "/opt/appliance/releases/0.1.0/bin/appliance") or _exists(
        image, "/opt/appliance/releases/0.1.0/lib/python3.11/site-packages/web"
    )
    for unit in (*SERVICES, "appliance.target", "appliance-backup.timer", build.SMOKE_UNIT):
        assert _exists(image, f"/etc/systemd/system/{unit}"), unit
    # Enabled by the roles as on a box; the smoke unit is installed but enabled nowhere.
    assert set(_names(image, "/etc/systemd/system/appliance.target.wants")) >= set(SERVICES)
    assert "appliance.target" in _names(image, "/etc/systemd/system/multi-user.target.wants")
    assert build.HOST_KEYS_UNIT in _names(image, "/etc/systemd/system/multi-user.target.wants")
    wants = [
        name
        for name in _names(image, "/etc/systemd/system")
        if name.endswith((".wants", ".requires"))
    ]
    for directory in wants:
        assert build.SMOKE_UNIT not in _names(image, f"/etc/systemd/system/{directory}")
    assert f"LABEL={build.LABEL} / ext4" in _cat(image, "/etc/fstab")
    assert "[site]" in _cat(image, "/etc/appliance/site.toml")
    assert "BEGIN CERTIFICATE" in _cat(image, "/etc/appliance/tls/fleet-ca.pem")
    assert built.description["kernel_version"], built.description
    assert (built.directory / "vmlinuz").stat().st_size > 1 << 20
    assert (built.directory / "initrd.img").stat().st_size > 1 << 20
    label = subprocess.run(
        ["e2label", str(image)], capture_output=True, text=True, timeout=60, check=False
    )
    assert label.stdout.strip() == build.LABEL


# -- the smoke boot -------------------------------------------------------------------------


def test_smoke_boot_every_appliance_service_active(booted: Booted) -> None:
    result = booted.result
    services = result["services"]
    assert isinstance(services, dict)
    summary = json.dumps(
        {
            unit: {k: props.get(k) for k in ("ActiveState", "SubState", "Result", "NRestarts")}
            for unit, props in services.items()
        },
        indent=1,
    )
    assert result["all_active"] is True, (summary, result.get("journals"))
    for unit in SERVICES:
        props = services[unit]
        # Type=notify: "active (running)" only after READY=1.
        assert props["Type"] == "notify", (unit, props)
        assert (props["ActiveState"], props["SubState"]) == ("active", "running"), (unit, props)
        assert props["NRestarts"] == "0", (unit, props, result.get("journals"))
        assert props["UnitFileState"] == "enabled", (unit, props)
    # Still the same processes a watchdog period and more later.
    assert result["stable"] is True, summary
    other = result["other_units"]
    assert isinstance(other, dict)
    for unit in (
        "appliance.target",
        "appliance-backup.timer",
        "nftables.service",
        "ssh.service",
        "systemd-networkd.service",
    ):
        assert other[unit]["ActiveState"] == "active", (unit, other[unit])
    healthz = result["healthz"]
    assert isinstance(healthz, dict)
    assert healthz["status"] == 200, healthz
    assert json.loads(str(healthz["body"]))["status"] == "ok", healthz


def test_smoke_boot_ran_on_the_image_as_the_provisioned_box(booted: Booted) -> None:
    result = booted.result
    assert result["virtualization"] == "qemu", result["virtualization"]
    assert result["kernel"] == booted.built.description["kernel_version"]
    assert f"systemd.wants={build.SMOKE_UNIT}" in str(result["cmdline"])
    # The machine ID put back with the keys (systemd-creds' host key is bound to it).
    kept = (booted.built.directory / "box-secrets/etc/machine-id").read_text().strip()
    assert result["machine_id"] == kept
    # Host keys made on this boot (the image has none).
    assert "ssh_host_ed25519_key" in result["ssh_host_keys"], result["ssh_host_keys"]
    assert result["other_units"]["telehealth-ssh-host-keys.service"]["Result"] == "success"
    assert result["failed_units"] == [], result["failed_units"]


def test_smoke_boot_powered_off_cleanly(booted: Booted) -> None:
    assert booted.returncode == 0, booted.console[-3000:]
    assert "reboot: Power down" in booted.console, booted.console[-3000:]
    # e2fsck -n: 0 means clean (the root was remounted read-only and synced at power-off).
    assert booted.fsck.returncode == 0, booted.fsck.stdout + booted.fsck.stderr


# -- the image as shipped: its first boot, before the box's first converge ----------------


def test_shipped_image_first_boot_makes_its_identity_and_waits_for_its_keys(
    shipped: Booted,
) -> None:
    result = shipped.result
    # A machine ID of its own (the image's is empty) and SSH host keys of its own.
    assert re.fullmatch(r"[0-9a-f]{32}", str(result["machine_id"])), result["machine_id"]
    kept = (shipped.built.directory / "box-secrets/etc/machine-id").read_text().strip()
    assert result["machine_id"] != kept
    assert "ssh_host_ed25519_key" in result["ssh_host_keys"], result["ssh_host_keys"]
    assert result["other_units"]["ssh.service"]["ActiveState"] == "active"
    # None of the appliance's services runs before the box's first converge, and none
    # fails or restart-loops: web, devices and sync wait for the KEK (kek.cred), discovery
    # for the TLS certificate whose fingerprint it advertises (ConditionPathExists=).
    services = result["services"]
    for unit in SERVICES:
        props = services[unit]
        assert (props["ActiveState"], props["ConditionResult"]) == ("inactive", "no"), (
            unit,
            props,
        )
        assert props["NRestarts"] == "0", (unit, props)
        assert props["Result"] == "success", (unit, props)
    assert shipped.returncode == 0, shipped.console[-3000:]
    assert shipped.fsck.returncode == 0, shipped.fsck.stdout + shipped.fsck.stderr
