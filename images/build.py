"""Build the appliance OS image: Debian bookworm with the appliance installed by the roles.

    .venv/bin/python -m images.build --output build/image      # or: make image

The recipe (images/README.md):

1. **Root**: ``debootstrap --variant=minbase bookworm`` with the container tier's packages
   (tests/provisioning/nspawn.py ``PACKAGES``: what the roles install, so the converge
   downloads nothing) plus a kernel and its initramfs (``IMAGE_PACKAGES``), cached in
   ``/var/cache/telehealth-test/image-bookworm-<hash>`` like the container tier's root.
2. **Converge**: a copy of that root is booted with ``systemd-nspawn -b
   --private-network`` and converged over SSH with ``provisioning/site.yml``, exactly as
   the container tier does (pv-box-1 of the example inventory, a throwaway fleet CA, a
   wheel of this checkout, the pinned dependencies from a wheelhouse, the kiosk off), then
   powered off with SIGRTMIN+4.
3. **Generalise**: what one box must not share with a fleet is taken out (SSH host keys,
   machine ID, random seed, the build's SSH key, the appliance's per-box keys and the
   database sealed under them, the journal); the image's own files are added from
   ``images/overlay`` (the first-boot SSH host key unit, the smoke unit, a preset that
   enables nothing), ``/etc/fstab`` is written.
4. **Image**: ``mkfs.ext4 -d`` of the root into ``image.ext4`` (sized from the root plus
   headroom), the kernel and initramfs copied beside it for direct kernel boot, and
   ``image.json`` describing it all.

The per-box keys are deleted, or with ``--box-secrets DIR`` moved into ``DIR`` with a
manifest of their owners and modes, so that a test can put them back into a copy of the
image (:func:`inject`) and boot it as the box it was converged as
(tests/provisioning/test_image.py).

Needs root, debootstrap, systemd-nspawn, ssh, openssl (``make deps-provisioning``) and
mkfs.ext4, debugfs (``make deps-image``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from tests.provisioning import nspawn
from tests.provisioning.test_ansible import REPO
from tests.provisioning.test_nspawn_converge import (
    HOST,
    _playbook,
    _recap,
    _write_inventory,
)

IMAGES = Path(__file__).resolve().parent
OVERLAY = IMAGES / "overlay"
# The container tier's packages plus what a machine that boots its own kernel needs: the
# kernel, its initramfs (initramfs-tools' MODULES=most carries virtio_blk, ext4, ...) with
# zstd to compress it, udev, kmod, and e2fsprogs for the root's fsck.
IMAGE_PACKAGES = (
    *nspawn.PACKAGES,
    "linux-image-amd64",
    "initramfs-tools",
    "udev",
    "kmod",
    "zstd",
    "e2fsprogs",
)
ROOT_NAME = "image-bookworm"
LABEL = "telehealth-root"
HOSTNAME = "telehealth-appliance"
SMOKE_UNIT = "telehealth-smoke.service"
HOST_KEYS_UNIT = "telehealth-ssh-host-keys.service"
# Per-box secrets made by the converge. A fleet image must not carry one box's: the first
# converge on each real box makes its own (the role's tasks create them when absent; the
# TLS certificate is then signed for that box). Kept aside only with --box-secrets.
BOX_SECRETS = (
    # The sealed key-encryption key (role appliance, kek.yml) and the host key it is sealed
    # with (systemd-creds --with-key=auto without a TPM2; made again by the next seal).
    "etc/appliance/credentials/kek.cred",
    "var/lib/systemd/credential.secret",
    # The box's TLS key, its request and its certificate (tls.yml), and its SMART client
    # key pair (smart.yml).
    "etc/appliance/tls/server-key.pem",
    "etc/appliance/tls/server.csr",
    "etc/appliance/tls/server.pem",
    "etc/appliance/smart/client-key.pem",
    "etc/appliance/smart/client-key.pub.pem",
)
# Removed and never kept: per-machine identity and the build's own traces.
SCRUB = (
    "etc/ssh/ssh_host_*",
    "etc/ssh/sshd_config.d/telehealth-test.conf",
    "root/.ssh",
    f"home/{nspawn.PROVISION_USER}/.ssh",
    "root/.ansible",
    f"home/{nspawn.PROVISION_USER}/.ansible",
    "root/.cache",
    "root/.bash_history",
    "var/lib/systemd/random-seed",
    # The database (and anything else the services wrote) is sealed under the KEK that goes.
    "var/lib/appliance/*",
    "var/log/journal/*",
    "tmp/*",
    "var/tmp/*",
    # The mount point of the wheelhouse nspawn bound in.
    nspawn.WHEELHOUSE.lstrip("/"),
)
# What goes into the cache key of a built image (tests/provisioning/test_image.py): the
# roles, the units, this directory, the recipe's helpers and the wheel's sources.
INPUTS = (
    "provisioning",
    "systemd",
    "images",
    "tests/provisioning/nspawn.py",
    "tests/provisioning/test_nspawn_converge.py",
    "tests/provisioning/test_ansible.py",
    *nspawn.SOURCE_ITEMS,
)


class ImageError(RuntimeError):
    """The image could not be built."""


def _log(message: str) -> None:
    sys.stderr.write(f"[image] {message}\n")
    sys.stderr.flush()


def missing_tools() -> list[str]:
    """Host programs the build needs that are not installed (``make deps-provisioning``
    and ``make deps-image``)."""
    tools = ("mkfs.ext4", "debugfs", "e2fsck")
    return [*nspawn.missing_tools(), *(tool for tool in tools if shutil.which(tool) is None)]


def input_key(repo: Path = REPO) -> str:
    """A hash of everything the image is built from (the packages, the roles, the units,
    the overlay, the recipe and the appliance's sources and pins)."""
    digest = hashlib.sha256()
    digest.update(nspawn.cache_key(IMAGE_PACKAGES).encode())
    for item in INPUTS:
        path = repo / item
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in files:
            parts = file.relative_to(repo).parts
            if (
                not file.is_file()
                or file.suffix == ".md"
                or any(part in ("__pycache__", ".ansible", ".mypy_cache") for part in parts)
            ):
                continue
            digest.update(str(file.relative_to(repo)).encode() + b"\0")
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:12]


# -- 2. converge -----------------------------------------------------------------------------


def converge(root: Path, work: Path, log: Callable[[str], None] = _log) -> dict[str, float]:
    """Boot ``root`` in nspawn, converge it with site.yml as the container tier does, power
    it off. Returns the timings; the logs are left in ``work``."""
    timings: dict[str, float] = {}
    started = time.monotonic()
    wheels = nspawn.dependency_wheels(REPO, sys.executable, log)
    wheel = nspawn.build_wheel(REPO, work / "wheels", sys.executable)
    timings["wheels"] = time.monotonic() - started
    started = time.monotonic()
    with nspawn.boot_box(root, HOST, work, wheels=wheels, comment="image-build") as (
        box,
        boot_state,
    ):
        log(f"booted in nspawn: {boot_state}")
        timings["boot"] = time.monotonic() - started
        inventory = _write_inventory(work / "inventory", box.relay.port)
        # No display at build time; a box's own converge adds the kiosk (README.md).
        extra = nspawn.converge_vars(box, wheel)
        started = time.monotonic()
        done = _playbook((work, inventory, extra), "site.yml")
        timings["converge"] = time.monotonic() - started
        output = done.stdout + done.stderr
        (work / "converge.log").write_text(output)
        if done.returncode != 0:
            raise ImageError(f"the converge failed (build-converge.log):\n{output[-6000:]}")
        changed, failed = _recap(output)
        log(f"converged in {timings['converge']:.0f} s ({changed} changed, {failed} failed)")
        states = box.sh(
            "systemctl is-active appliance-web appliance-devices appliance-sync "
            "appliance-discovery",
            check=False,
        )
        if states.split() != ["active"] * 4:
            raise ImageError(
                f"the appliance services are not all active after the converge:\n"
                f"{states}\n{box.container.log_tail()}"
            )
    timings["poweroff"] = float((work / "poweroff.log").read_text().split()[0])
    return timings


# -- 3. generalise ---------------------------------------------------------------------------


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _matches(root: Path, patterns: Iterable[str]) -> list[Path]:
    found: list[Path] = []
    for pattern in patterns:
        found.extend(sorted(root.glob(pattern)))
    return found


def generalise(root: Path, box_secrets: Path | None, provision_key: str | None = None) -> list[str]:
    """Make the converged ``root`` an image for any box; the relative paths removed."""
    removed: list[str] = []
    manifest: list[dict[str, object]] = []
    if box_secrets is not None:
        box_secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
    for relative in BOX_SECRETS:
        path = root / relative
        if not path.exists():
            continue
        if box_secrets is not None:
            status = path.lstat()
            target = box_secrets / relative
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.copy2(path, target)
            manifest.append(
                {
                    "path": relative,
                    "mode": status.st_mode & 0o7777,
                    "uid": status.st_uid,
                    "gid": status.st_gid,
                }
            )
        path.unlink()
        removed.append(relative)
    if box_secrets is not None:
        # The machine ID goes with them: systemd-creds binds its host key to it, so the KEK
        # opens only on a machine with this ID (a box that keeps its keys keeps its ID).
        (box_secrets / "etc").mkdir(mode=0o700, exist_ok=True)
        shutil.copy2(root / "etc/machine-id", box_secrets / "etc/machine-id")
        manifest.append({"path": "etc/machine-id", "mode": 0o444, "uid": 0, "gid": 0})
        (box_secrets / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for path in _matches(root, SCRUB):
        _remove(path)
        removed.append(str(path.relative_to(root)))
    # An empty machine ID: each box makes its own on its first boot (and that boot counts as
    # the first: ConditionFirstBoot=, presets, see the overlay's preset file).
    (root / "etc/machine-id").write_text("")
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.exists() or dbus_id.is_symlink():
        dbus_id.unlink()
        dbus_id.symlink_to("/etc/machine-id")
    (root / "etc/hostname").write_text(f"{HOSTNAME}\n")
    # debootstrap copied the build host's name server; the site sets its own.
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text("# No name server in the image: the site sets one (images/README.md).\n")
    resolv.chmod(0o644)
    (root / "etc/fstab").write_text(
        "# The appliance OS image (images/README.md): one ext4 file system.\n"
        f"LABEL={LABEL} / ext4 defaults,errors=remount-ro 0 1\n"
    )
    # The image's own files (units, smoke script, preset), owned by root.
    for source in sorted(OVERLAY.rglob("*")):
        if "__pycache__" in source.parts:
            continue
        target = root / source.relative_to(OVERLAY)
        if source.is_dir():
            target.mkdir(mode=0o755, exist_ok=True)
        else:
            shutil.copy2(source, target)
        os.chown(target, 0, 0)
    # The first-boot SSH host keys, and DHCP on wired ports (overlay's .network file). Not
    # systemd-networkd-wait-online (enabled along with networkd): the appliance works
    # offline, and a box without a cable would wait two minutes for network-online.target.
    systemctl = ["systemctl", f"--root={root}", "--quiet"]
    nspawn.run([*systemctl, "enable", HOST_KEYS_UNIT, "systemd-networkd.service"], timeout=120)
    nspawn.run([*systemctl, "disable", "systemd-networkd-wait-online.service"], timeout=120)
    # Never a prompt on the console of an appliance (first boot, empty machine ID).
    firstboot = root / "etc/systemd/system/systemd-firstboot.service"
    firstboot.unlink(missing_ok=True)
    firstboot.symlink_to("/dev/null")
    if provision_key:
        nspawn.authorize_key_for(root, nspawn.PROVISION_USER, provision_key)
    return removed


# -- 4. the image ----------------------------------------------------------------------------


def _du(root: Path) -> tuple[int, int]:
    """Bytes used and number of inodes of ``root``."""
    used = int(nspawn.run(["du", "-s", "-B1", "-x", str(root)], timeout=600).stdout.split()[0])
    inodes = int(
        nspawn.run(["du", "-s", "--inodes", "-x", str(root)], timeout=600).stdout.split()[0]
    )
    return used, inodes


def make_filesystem(root: Path, image: Path) -> dict[str, int]:
    """``mkfs.ext4 -d root`` into a sparse file: the root's size plus a quarter plus 512
    MiB, rounded up to 64 MiB; inodes for twice the root's files (at least 64k)."""
    used, inodes = _du(root)
    mib = 1 << 20
    size = (used + used // 4 + 512 * mib + 64 * mib - 1) // (64 * mib) * (64 * mib)
    image.unlink(missing_ok=True)
    with image.open("wb") as handle:
        handle.truncate(size)
    nspawn.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            LABEL,
            "-N",
            str(max(2 * inodes, 65536)),
            "-E",
            "root_owner=0:0",
            "-d",
            str(root),
            str(image),
        ],
        timeout=1800,
    )
    return {"root_bytes": used, "root_inodes": inodes, "image_bytes": size}


def _kernel(root: Path) -> tuple[Path, Path, str]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageError(f"expected one kernel in {root}/boot, found {kernels}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    initrd = root / "boot" / f"initrd.img-{version}"
    if not initrd.exists():
        raise ImageError(f"no initramfs for {version} in {root}/boot")
    return kernels[0], initrd, version


def build(
    output: Path,
    *,
    box_secrets: Path | None = None,
    provision_key: str | None = None,
    log: Callable[[str], None] = _log,
) -> dict[str, object]:
    """Build the image into ``output`` (image.ext4, vmlinuz, initrd.img, image.json); the
    description that is written to image.json."""
    missing = missing_tools()
    if missing:
        raise ImageError(
            f"missing host tools {missing}: `make deps-provisioning deps-image` installs them"
        )
    if os.geteuid() != 0:
        raise ImageError("building the image needs root (debootstrap, systemd-nspawn)")
    output.mkdir(parents=True, exist_ok=True)
    key = input_key()
    timings: dict[str, float] = {}
    started = time.monotonic()
    base = nspawn.base_root(log, packages=IMAGE_PACKAGES, name=ROOT_NAME)
    timings["base_root"] = time.monotonic() - started
    work = Path(tempfile.mkdtemp(prefix="image-control-", dir=nspawn.CACHE_DIR / "runs"))
    root: Path | None = None
    try:
        started = time.monotonic()
        root = nspawn.working_copy(base, "image")
        timings["copy"] = time.monotonic() - started
        timings.update(converge(root, work, log))
        started = time.monotonic()
        removed = generalise(root, box_secrets, provision_key)
        kernel, initrd, version = _kernel(root)
        shutil.copyfile(kernel, output / "vmlinuz")
        shutil.copyfile(initrd, output / "initrd.img")
        timings["generalise"] = time.monotonic() - started
        started = time.monotonic()
        sizes = make_filesystem(root, output / "image.ext4")
        timings["mkfs"] = time.monotonic() - started
        log(
            f"image.ext4: {sizes['image_bytes'] >> 20} MiB for a {sizes['root_bytes'] >> 20} "
            f"MiB root in {timings['mkfs']:.0f} s"
        )
    finally:
        # The build's logs, also (above all) when it failed.
        for name in ("converge.log", "nspawn.log", "journal.log"):
            if (work / name).exists():
                shutil.copy2(work / name, output / f"build-{name}")
        if root is not None and root.exists():
            nspawn.remove_root(root)
        shutil.rmtree(work, ignore_errors=True)
    description: dict[str, object] = {
        "kernel_version": version,
        "image": "image.ext4",
        "kernel": "vmlinuz",
        "initrd": "initrd.img",
        "label": LABEL,
        "kernel_cmdline": f"root=/dev/vda rw console=ttyS0 systemd.wants={SMOKE_UNIT}",
        "input_key": key,
        "converged_as": HOST,
        "removed": removed,
        "box_secrets_kept": box_secrets is not None,
        "timings_s": {name: round(value, 1) for name, value in timings.items()},
        **sizes,
    }
    (output / "image.json").write_text(json.dumps(description, indent=2) + "\n")
    return description


# -- for the test: the box's secrets back into a copy ---------------------------------------


def debugfs(image: Path, *commands: str, write: bool = False, timeout: float = 300) -> str:
    """Run debugfs commands against ``image`` (read-only unless ``write``); its stdout."""
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as script:
        script.write("\n".join(commands) + "\n")
        script.flush()
        argv = ["debugfs", *(["-w"] if write else []), "-f", script.name, str(image)]
        return nspawn.run(argv, timeout=timeout).stdout


def inject(image: Path, box_secrets: Path) -> list[str]:
    """Write the box's secrets kept by ``build(box_secrets=...)`` back into ``image`` (an
    unmounted copy) with their owners and modes, as the box's own first converge would
    have made them. The paths written."""
    manifest = json.loads((box_secrets / "manifest.json").read_text())
    commands: list[str] = []
    for entry in manifest:
        relative = Path(entry["path"])
        name = relative.name
        commands += [
            f"cd /{relative.parent}",
            f"rm {name}",
            f"write {box_secrets / relative} {name}",
            f"sif {name} mode 0{0o100000 | entry['mode']:o}",
            f"sif {name} uid {entry['uid']}",
            f"sif {name} gid {entry['gid']}",
        ]
    debugfs(image, *commands, write=True)
    return [str(entry["path"]) for entry in manifest]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m images.build", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output", type=Path, default=REPO / "build/image", help="directory")
    parser.add_argument(
        "--box-secrets",
        type=Path,
        help="keep the converged box's keys here (tests only; never ship them)",
    )
    parser.add_argument(
        "--provision-key",
        type=Path,
        help="a public key file to authorize for the provisioning account (the fleet's "
        "control node); without it the image lets nobody in over SSH",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    key = args.provision_key.read_text() if args.provision_key else None
    try:
        description = build(args.output, box_secrets=args.box_secrets, provision_key=key)
    except (ImageError, nspawn.ContainerError, subprocess.SubprocessError) as exc:
        _log(f"failed: {exc}")
        return 1
    _log(f"built {args.output} in {time.monotonic() - started:.0f} s: {description['timings_s']}")
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.write(json.dumps(description, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
