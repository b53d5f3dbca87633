"""A Debian bookworm box in a systemd-nspawn container, for the real converge.

The pieces (tests/provisioning/test_nspawn_converge.py puts them together; the tier is
described in docs/provisioning.md, "The container tier"):

- :func:`base_root`: a ``debootstrap`` of bookworm (minbase plus what the roles and the test
  need), built once and kept in the cache directory under a name that carries the hash of
  the package list, so a changed list builds a new one and never reuses a stale root.
- :func:`working_copy`: a copy of that root for one test session (the cache stays pristine).
- :class:`Container`: the copy booted with ``systemd-nspawn --register=no --keep-unit
  --console=passive -b`` in the background, so systemd runs inside as PID 1 and starts the
  units the roles install. It gets a network namespace of its own (``--private-network``):
  only its loopback and a veth pair (a "clinic LAN") whose both ends are inside it. The
  appliance's mDNS advertisement and its nftables ruleset therefore stay inside the
  container instead of reaching the host's real interface and firewall.
- :class:`NetnsRelay`: a TCP relay from a free port on the host's 127.0.0.1 to a port on
  the container's own 127.0.0.1, so Ansible reaches the container's sshd over SSH on
  loopback without any routable address.
- :meth:`Container.stop`: ``SIGRTMIN+4`` (systemd's "power off") sent from bash to the
  container's init, then a wait for ``systemd-nspawn`` to exit. :func:`remove_root` refuses
  to delete a root that any process still uses or that still has something mounted in it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

CACHE_DIR = Path(os.environ.get("TELEHEALTH_TEST_CACHE", "/var/cache/telehealth-test"))
SUITE = "bookworm"
MIRROR = os.environ.get("TELEHEALTH_TEST_MIRROR", "http://deb.debian.org/debian")
# What the box needs before Ansible can reach it (sshd, sudo, Python) plus what the roles
# install (base: chrony ... systemd), so that the converge does not download packages.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "sudo",
    "python3",
    "python3-apt",
    "python3-venv",
    "ca-certificates",
    "openssl",
    "iproute2",
    "procps",
    "chrony",
    "nftables",
    "unattended-upgrades",
    "apt-listchanges",
    "bluez",
    "netbase",
    "python3-packaging",
)
# Bump when _prepare_base changes what it writes into the cached root.
BASE_LAYOUT = "1"
# The account Ansible logs in as (group_vars/all.yml: ansible_user) and becomes root from.
PROVISION_USER = "provision"
COMPLETE_MARKER = ".telehealth-test-complete"

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class ContainerError(RuntimeError):
    """The container could not be built, booted, reached or stopped."""


def missing_tools() -> list[str]:
    """The host programs this tier needs that are not installed (Debian packages in the
    Makefile's deps-provisioning rule)."""
    tools = ("debootstrap", "systemd-nspawn", "ssh", "ssh-keygen", "ip", "openssl", "chroot")
    return [tool for tool in tools if shutil.which(tool) is None]


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a host command; on failure raise with its output."""
    result = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if check and result.returncode != 0:
        raise ContainerError(
            f"{' '.join(argv)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (two sessions never build the same cache at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cache_key(packages: Sequence[str] = PACKAGES) -> str:
    """The hash that names the cached root: suite, mirror, package list, layout."""
    blob = json.dumps([SUITE, MIRROR, sorted(packages), BASE_LAYOUT]).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def base_root(
    log: Callable[[str], None] = print,
    *,
    packages: Sequence[str] = PACKAGES,
    name: str = "bookworm",
) -> Path:
    """The cached bookworm root, built with debootstrap on first use (several minutes).

    ``packages`` and ``name`` make another cached root beside the container tier's (the OS
    image's, images/build.py: these packages plus a kernel, ``name`` "image-bookworm"); a
    root is replaced only by a newer one of the same ``name``.
    """
    key = cache_key(packages)
    final = CACHE_DIR / f"{name}-{key}"
    with _locked(CACHE_DIR / f".{name}-{key}.lock"):
        if (final / COMPLETE_MARKER).exists():
            return final
        for stale in (final, CACHE_DIR / f".build-{name}-{key}"):
            if stale.exists():
                remove_root(stale)
        build = CACHE_DIR / f".build-{name}-{key}"
        started = time.monotonic()
        log(f"debootstrap {SUITE} into {build} (cold cache)")
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(packages)}",
                SUITE,
                str(build),
                MIRROR,
            ],
            timeout=1800,
        )
        _prepare_base(build)
        (build / COMPLETE_MARKER).write_text(f"{time.monotonic() - started:.0f} s\n")
        build.rename(final)
        log(f"cached {final} in {time.monotonic() - started:.0f} s")
    # Roots cached for an older package list are dropped (unless something still uses one).
    for old in CACHE_DIR.glob(f"{name}-*"):
        if old != final and old.is_dir():
            with contextlib.suppress(ContainerError):
                remove_root(old)
    return final


def _prepare_base(root: Path) -> None:
    """What every test box shares: the provisioning account with password-less sudo (as
    the fleet's image would have), no apt timers racing the converge for the dpkg lock."""
    run(
        ["chroot", str(root), "useradd", "--create-home", "--shell", "/bin/bash", PROVISION_USER],
        timeout=60,
    )
    sudoers = root / "etc/sudoers.d" / PROVISION_USER
    sudoers.write_text(f"{PROVISION_USER} ALL=(ALL) NOPASSWD:ALL\n")
    sudoers.chmod(0o440)
    for timer in ("apt-daily.timer", "apt-daily-upgrade.timer"):
        link = root / "etc/systemd/system" / timer
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


def working_copy(base: Path, name: str) -> Path:
    """A copy of the cached root for one session, under ``CACHE_DIR/runs``."""
    runs = CACHE_DIR / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    # Left over by a session that was killed: removed once an hour old and unused (a
    # container that still runs keeps its root; stop it first, see docs/provisioning.md).
    for stale in runs.iterdir():
        if time.time() - stale.stat().st_mtime > 3600:
            with contextlib.suppress(ContainerError, OSError):
                remove_root(stale)
    target = runs / f"{name}-{os.getpid()}-{int(time.time())}"
    run(["cp", "-a", "--reflink=auto", str(base), str(target)], timeout=600)
    (target / COMPLETE_MARKER).unlink(missing_ok=True)
    return target


def _users(root: Path) -> dict[str, tuple[int, int, str]]:
    users: dict[str, tuple[int, int, str]] = {}
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        users[fields[0]] = (int(fields[2]), int(fields[3]), fields[5])
    return users


def authorize_key(root: Path, public_key: str) -> None:
    """Let the key in as root (the test's checks) and as the provisioning account (Ansible)."""
    for user in ("root", PROVISION_USER):
        authorize_key_for(root, user, public_key)


def authorize_key_for(root: Path, user: str, public_key: str) -> None:
    """Let the key in as ``user`` (its ``~/.ssh/authorized_keys`` holds only this key)."""
    uid, gid, home = _users(root)[user]
    ssh_dir = root / home.lstrip("/") / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    keys.write_text(public_key.strip() + "\n")
    keys.chmod(0o600)
    os.chown(ssh_dir, uid, gid)
    os.chown(keys, uid, gid)


def configure_sshd(root: Path, port: int) -> None:
    """sshd on the container's own loopback only, keys only."""
    conf = root / "etc/ssh/sshd_config.d/telehealth-test.conf"
    conf.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUseDNS no\n"
    )


def processes_using(root: Path) -> list[str]:
    """Processes whose root or working directory is inside ``root``, and mounts under it."""
    prefix = str(root.resolve())
    found: list[str] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        for link in ("root", "cwd"):
            try:
                target = os.readlink(proc / link)
            except OSError:
                continue
            if target == prefix or target.startswith(prefix + "/"):
                found.append(f"pid {proc.name} ({link} {target})")
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mountpoint = line.split()[4]
            if mountpoint == prefix or mountpoint.startswith(prefix + "/"):
                found.append(f"mount {mountpoint}")
    return found


def remove_root(root: Path) -> None:
    """Delete a container root, but never one that is in use (a live container's root)."""
    users = processes_using(root)
    if users:
        raise ContainerError(f"refusing to delete {root}: still in use: {users[:5]}")
    shutil.rmtree(root)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def in_netns(netns: str, function: Callable[[], T]) -> T:
    """Call ``function`` in a fresh thread that has entered the network namespace ``netns``.

    setns(CLONE_NEWNET) changes only the calling thread, and the thread ends right after,
    so the test process itself never leaves the host's namespace; a socket made inside
    stays bound to the container's namespace for its whole life.
    """
    box: dict[str, T] = {}
    errors: list[BaseException] = []

    def target() -> None:
        try:
            _setns(netns)
            box["value"] = function()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="netns", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return box["value"]


class NetnsRelay:
    """Relay TCP from ``127.0.0.1:<port>`` on the host to ``127.0.0.1:<target>`` inside the
    network namespace ``netns``."""

    def __init__(self, netns: str, target_port: int) -> None:
        self.netns = netns
        self.target_port = target_port
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="relay", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = in_netns(
                self.netns,
                lambda: socket.create_connection(("127.0.0.1", self.target_port), timeout=10),
            )
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        _pump(client, upstream)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            source.shutdown(socket.SHUT_RD)


class Container:
    """A root directory booted with systemd-nspawn in the background."""

    def __init__(
        self,
        root: Path,
        machine: str,
        *,
        log_path: Path,
        binds_ro: Sequence[tuple[Path, str]] = (),
    ) -> None:
        self.root = root
        self.machine = machine
        self.log_path = log_path
        self.binds_ro = tuple(binds_ro)
        self.process: subprocess.Popen[bytes] | None = None
        self._init_pid: int | None = None

    def start(self) -> None:
        argv = [
            "systemd-nspawn",
            "--register=no",
            "--keep-unit",
            "--console=passive",
            "-b",
            "-D",
            str(self.root),
            f"--machine={self.machine}",
            "--private-network",
            *[f"--bind-ro={source}:{target}" for source, target in self.binds_ro],
        ]
        with self.log_path.open("ab") as log:
            # A session of its own: a Ctrl-C in pytest does not reach the container; the
            # fixture's finaliser stops it properly instead.
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def init_pid(self, timeout: float = 60) -> int:
        """The container's PID 1 as the host sees it (the child of systemd-nspawn)."""
        if self._init_pid is not None:
            return self._init_pid
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise ContainerError(f"systemd-nspawn exited early:\n{self.log_tail()}")
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            with contextlib.suppress(OSError):
                for pid in children.read_text().split():
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                    if comm == "systemd":
                        self._init_pid = int(pid)
                        return self._init_pid
            time.sleep(0.2)
        raise ContainerError(f"no init process in the container:\n{self.log_tail()}")

    @property
    def netns(self) -> str:
        return f"/proc/{self.init_pid()}/ns/net"

    def host_run(self, argv: Sequence[str], *, timeout: float = 60) -> str:
        """Run a host program inside the container's network namespace (``ip``)."""
        return run(["nsenter", f"--net={self.netns}", "--", *argv], timeout=timeout).stdout

    def stop(self, timeout: float = 180) -> float:
        """Power off: SIGRTMIN+4 to the container's init, from bash; wait for nspawn to exit.

        Returns the seconds it took. A container that does not stop in time is killed
        (SIGKILL to systemd-nspawn takes its namespace and every process in it down).
        """
        if self.process is None:
            return 0.0
        started = time.monotonic()
        if self.running:
            pid = self.init_pid()
            run(["bash", "-c", f"kill -s RTMIN+4 {pid}"], timeout=30)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=60)
                raise ContainerError(
                    f"the container did not power off within {timeout:.0f} s; killed\n"
                    f"{self.log_tail()}"
                ) from None
        # The init process is gone with nspawn; wait until nothing is left in the root.
        deadline = time.monotonic() + 30
        while processes_using(self.root) and time.monotonic() < deadline:
            time.sleep(0.5)
        return time.monotonic() - started


class Box:
    """SSH into the container as root through a :class:`NetnsRelay`."""

    def __init__(self, container: Container, relay: NetnsRelay, key: Path) -> None:
        self.container = container
        self.relay = relay
        self.key = key

    def ssh_argv(self, user: str = "root") -> list[str]:
        return [
            "ssh",
            "-i",
            str(self.key),
            "-p",
            str(self.relay.port),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            f"{user}@127.0.0.1",
        ]

    def sh(self, command: str, *, timeout: float = 60, check: bool = True) -> str:
        """Run a shell command in the container as root; its stdout."""
        result = run([*self.ssh_argv(), command], timeout=timeout, check=check)
        return result.stdout

    def wait_booted(self, timeout: float = 300) -> str:
        """Wait until sshd answers and systemd has finished starting up; the system state
        (``running``, or ``degraded`` with the failed units named)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.container.running:
                raise ContainerError(
                    f"the container exited while booting:\n{self.container.log_tail()}"
                )
            result = run(
                [*self.ssh_argv(), "systemctl is-system-running --wait"],
                timeout=max(5.0, deadline - time.monotonic()),
                check=False,
            )
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                if state == "degraded":
                    failed = self.sh("systemctl list-units --failed --plain --no-legend")
                    return f"degraded: {failed.strip()}"
                return state
            last = f"{result.returncode} {state} {result.stderr.strip()}"
            time.sleep(1)
        raise ContainerError(
            f"no boot within {timeout:.0f} s ({last}):\n{self.container.log_tail()}"
        )

    def unit(self, name: str) -> dict[str, str]:
        """``systemctl show`` of one unit as a dict."""
        props = "ActiveState,SubState,Type,NRestarts,MainPID,StatusText,WatchdogUSec,UnitFileState,Result"
        out = self.sh(f"systemctl show --property={props} {name}")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def https_get(self, port: int, path: str, *, cafile: Path, server_name: str) -> tuple[int, str]:
        """GET over HTTPS inside the container's network namespace, verifying the server's
        certificate against ``cafile`` for ``server_name``; status and body."""
        context = ssl.create_default_context(cafile=str(cafile))
        raw = in_netns(
            self.container.netns,
            lambda: socket.create_connection(("127.0.0.1", port), timeout=10),
        )
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(f"GET {path} HTTP/1.0\r\nHost: {server_name}\r\n\r\n".encode())
            chunks = []
            while chunk := tls.recv(65536):
                chunks.append(chunk)
        response = b"".join(chunks).decode(errors="replace")
        head, _, body = response.partition("\r\n\r\n")
        status = int(head.split(" ", 2)[1])
        return status, body


# -- the appliance's wheels ------------------------------------------------------------------

# What goes into a wheel of this checkout ([tool.setuptools.packages.find] and the readme).
SOURCE_ITEMS = (
    "pyproject.toml",
    "README.md",
    "appliance",
    "drivers",
    "services",
    "sync_agent",
    "web",
)


def dependency_wheels(repo: Path, python: str, log: Callable[[str], None] = print) -> Path:
    """The pinned runtime dependencies of ``repo`` as wheels, in a cached wheelhouse named by
    the hash of the pins (the container installs from it with ``--no-index``)."""
    import tomllib

    pins = sorted(tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"])
    key = hashlib.sha256(json.dumps([pins, python]).encode()).hexdigest()[:12]
    final = CACHE_DIR / f"wheels-{key}"
    with _locked(CACHE_DIR / f".wheels-{key}.lock"):
        if (final / COMPLETE_MARKER).exists():
            return final
        build = CACHE_DIR / f".build-wheels-{key}"
        if build.exists():
            shutil.rmtree(build)
        started = time.monotonic()
        run(
            [python, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(build), *pins],
            timeout=1200,
        )
        (build / COMPLETE_MARKER).write_text("")
        if final.exists():
            shutil.rmtree(final)
        build.rename(final)
        log(f"dependency wheels in {final} ({time.monotonic() - started:.0f} s)")
    # Wheelhouses of older pins go once they are an hour old (a session that started before
    # the pins changed may still have one bind-mounted).
    for old in CACHE_DIR.glob("wheels-*"):
        if old != final and time.time() - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True)
    return final


def build_wheel(
    repo: Path,
    out: Path,
    python: str,
    *,
    version: str | None = None,
    patch: Callable[[Path], None] | None = None,
) -> Path:
    """A wheel of this checkout (built from a copy, so nothing lands in the work tree),
    optionally at another ``version`` and with ``patch`` applied to the copy first."""
    source = out / f"src-{version or 'checkout'}"
    if source.exists():
        shutil.rmtree(source)
    source.mkdir(parents=True)
    for item in SOURCE_ITEMS:
        path = repo / item
        if path.is_dir():
            shutil.copytree(path, source / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / item)
    if version is not None:
        pyproject = source / "pyproject.toml"
        text = pyproject.read_text()
        current = text.split('version = "', 1)[1].split('"', 1)[0]
        pyproject.write_text(text.replace(f'version = "{current}"', f'version = "{version}"', 1))
        init = source / "appliance/__init__.py"
        init.write_text(init.read_text().replace(f'"{current}"', f'"{version}"', 1))
    if patch is not None:
        patch(source)
    dist = out / f"dist-{version or 'checkout'}"
    run(
        [
            python,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--wheel-dir",
            str(dist),
            str(source),
        ],
        timeout=600,
    )
    wheels = sorted(dist.glob("telehealth_appliance-*.whl"))
    if len(wheels) != 1:
        raise ContainerError(f"expected one wheel in {dist}, found {wheels}")
    return wheels[0]


# The container's "clinic LAN": a veth pair with both ends in the container's own network
# namespace (this kernel has no dummy driver), the address from TEST-NET-2, one of the
# example inventory's base_lan_cidrs. Nothing sent on it leaves the namespace.
LAN_ADDRESS = "198.51.100.10/24"
# Where the dependency wheels are bound (read-only) inside the container.
WHEELHOUSE = "/var/cache/appliance-wheels"


@contextlib.contextmanager
def boot_box(
    root: Path, machine: str, work: Path, *, wheels: Path, comment: str
) -> Iterator[tuple[Box, str]]:
    """Boot ``root`` as ``machine`` for a converge over SSH: a fresh SSH key in ``work``
    authorised for root and the provision account, sshd on the container's port 22, the
    wheelhouse bound at :data:`WHEELHOUSE`, the veth "clinic LAN" at :data:`LAN_ADDRESS`, a
    relay from the host's loopback. Yields the box and its boot state. On the way out the
    journal is kept in ``work/journal.log``, the relay closed and the container powered off
    (its root is left for the caller: :func:`remove_root` once nothing uses it)."""
    key = work / "id_ed25519"
    run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
        timeout=60,
    )
    authorize_key(root, key.with_suffix(".pub").read_text())
    configure_sshd(root, 22)
    (root / "etc/hostname").write_text(f"{machine}\n")
    container = Container(
        root, machine, log_path=work / "nspawn.log", binds_ro=[(wheels, WHEELHOUSE)]
    )
    relay: NetnsRelay | None = None
    try:
        container.start()
        container.init_pid()
        for argv in (
            ["ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan1"],
            ["ip", "link", "set", "lan1", "up"],
            ["ip", "link", "set", "lan0", "up"],
            ["ip", "address", "add", LAN_ADDRESS, "dev", "lan0"],
        ):
            container.host_run(argv)
        relay = NetnsRelay(container.netns, 22)
        box = Box(container, relay, key)
        yield box, box.wait_booted()
    finally:
        if relay is not None:
            if container.running:
                journal = run(
                    [*Box(container, relay, key).ssh_argv(), "journalctl -b --no-pager"],
                    timeout=120,
                    check=False,
                )
                (work / "journal.log").write_text(journal.stdout + journal.stderr)
            relay.close()
        stopped = container.stop()
        (work / "poweroff.log").write_text(f"{stopped:.1f} s\n")


def converge_vars(box: Box, wheel: Path) -> dict[str, object]:
    """The extra variables of a converge of a booted box (:func:`boot_box`): its SSH key,
    the wheel and the wheelhouse instead of PyPI, no apt list refresh (the container has no
    route out and the cached root has every package), no kiosk (no display)."""
    return {
        "ansible_ssh_private_key_file": str(box.key),
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
        "ansible_python_interpreter": "/usr/bin/python3",
        "appliance_wheel": str(wheel),
        "appliance_pip_extra_args": f"--no-index --find-links={WHEELHOUSE}",
        # Never refresh apt's lists there, however old the cache is (they would be refreshed
        # on a real box after an hour).
        "base_apt_cache_valid_s": 10 * 365 * 86400,
        # No display in a container: the kiosk role's files are checked by the file-only
        # converge (test_ansible.py); cage and Chromium need a DRM device.
        "kiosk_enabled": False,
    }
