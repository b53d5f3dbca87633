"""mDNS advertisement of the box on the clinic LAN, and the browser ``appliance discover`` uses.

The discovery process (``python -m appliance.discovery --config FILE``, unit
``appliance-discovery.service``) registers one DNS-SD service of type
:data:`SERVICE_TYPE` whose TXT record carries the site id, the appliance version, the HTTPS
port and the SHA-256 fingerprint of the web certificate, so a kiosk or nurse tablet can
find its box and pin the certificate it is about to trust. It never opens the store: it
needs neither the key-encryption key nor the data directory.

The service type is the one issue 9 names. Its service name (``telehealth-appliance``, 20
characters) is longer than the 15 that RFC 6763 section 7.2 allows; python-zeroconf
registers it only with ``strict=False`` and other mDNS stacks may refuse to browse it.
See docs/provisioning.md, "Discovery".
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import ipaddress
import json
import logging
import signal
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import ifaddr
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from appliance import __version__, sdnotify
from appliance.errors import ApplianceError
from appliance.numbers import small_int

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_telehealth-appliance._tcp.local."
# TXT keys (RFC 6763 section 6.4: short, lower case, ASCII).
TXT_SITE = "site"
TXT_VERSION = "version"
TXT_HTTPS_PORT = "https_port"
TXT_CERT_SHA256 = "cert_sha256"


class DiscoveryError(ApplianceError):
    """The box cannot be advertised (no certificate, no address, a bad site id)."""


@dataclass(frozen=True, slots=True)
class Advertisement:
    """What one box says about itself on the LAN."""

    site_id: str
    version: str
    https_port: int
    cert_sha256: str
    hostname: str
    addresses: tuple[str, ...]

    @property
    def instance_name(self) -> str:
        """The DNS-SD instance name: unique per box (site id and host name)."""
        return f"{self.site_id}@{self.hostname}.{SERVICE_TYPE}"

    def txt(self) -> dict[str, str]:
        """The TXT record (no patient data, nothing secret: the fingerprint is public)."""
        return {
            TXT_SITE: self.site_id,
            TXT_VERSION: self.version,
            TXT_HTTPS_PORT: str(self.https_port),
            TXT_CERT_SHA256: self.cert_sha256,
        }

    def service_info(self) -> AsyncServiceInfo:
        """The zeroconf record for this advertisement."""
        return AsyncServiceInfo(
            SERVICE_TYPE,
            self.instance_name,
            parsed_addresses=list(self.addresses),
            port=self.https_port,
            properties=self.txt(),
            server=f"{self.hostname}.local.",
        )


@dataclass(frozen=True, slots=True)
class FoundBox:
    """A box seen on the LAN by :func:`async_browse`."""

    name: str
    site_id: str
    version: str
    https_port: int | None
    cert_sha256: str
    addresses: tuple[str, ...]
    server: str


def certificate_fingerprint(pem: bytes) -> str:
    """Lower-case hex SHA-256 of the certificate's DER form (what browsers show)."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise DiscoveryError(f"not a PEM certificate: {exc}") from exc
    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()


def _text(properties: Mapping[bytes, bytes | None], key: str) -> str:
    value = properties.get(key.encode())
    return value.decode("utf-8", errors="replace") if value else ""


def _port(text: str, default: int | None) -> int | None:
    """A TXT port as a neighbour advertised it; anything but 1..65535 in digits: ``default``."""
    port = small_int(text, 5)
    return port if port is not None and 0 < port < 65536 else default


def found_box(info: AsyncServiceInfo) -> FoundBox:
    """Translate a resolved zeroconf record; a malformed TXT becomes empty fields."""
    port_text = _text(info.properties, TXT_HTTPS_PORT)
    return FoundBox(
        name=info.name.removesuffix("." + SERVICE_TYPE),
        site_id=_text(info.properties, TXT_SITE),
        version=_text(info.properties, TXT_VERSION),
        https_port=_port(port_text, info.port),
        cert_sha256=_text(info.properties, TXT_CERT_SHA256),
        addresses=tuple(info.parsed_scoped_addresses()),
        server=info.server or "",
    )


def _zeroconf(interfaces: Sequence[str] | None) -> AsyncZeroconf:
    if interfaces is None:
        return AsyncZeroconf()
    return AsyncZeroconf(interfaces=list(interfaces), ip_version=IPVersion.V4Only)


class Advertiser:
    """Registers one :class:`Advertisement` until :meth:`async_close`.

    ``interfaces`` limits the sockets zeroconf binds (``["127.0.0.1"]`` in tests); the
    default is every interface.
    """

    def __init__(self, advertisement: Advertisement, interfaces: Sequence[str] | None = None):
        self.advertisement = advertisement
        self._interfaces = interfaces
        self._zc: AsyncZeroconf | None = None

    async def async_start(self) -> None:
        """Announce the record (goodbye packets follow on :meth:`async_close`)."""
        self._zc = _zeroconf(self._interfaces)
        # strict=False: the service name is over RFC 6763's 15 characters (module docstring).
        await self._zc.async_register_service(
            self.advertisement.service_info(), allow_name_change=True, strict=False
        )
        logger.info(
            "advertising %s on port %d",
            self.advertisement.instance_name,
            self.advertisement.https_port,
        )

    def is_running(self) -> bool:
        """Whether the zeroconf engine is still up (what the watchdog pings on)."""
        return self._zc is not None and not self._zc.zeroconf.done

    async def async_close(self) -> None:
        """Withdraw the record and close the sockets."""
        if self._zc is not None:
            await self._zc.async_unregister_all_services()
            await self._zc.async_close()
            self._zc = None


async def async_browse(listen_s: float, interfaces: Sequence[str] | None = None) -> list[FoundBox]:
    """Every box that answers within ``listen_s`` seconds, sorted by site and name."""
    azc = _zeroconf(interfaces)
    names: set[str] = set()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is not ServiceStateChange.Removed:
            names.add(name)

    browser = AsyncServiceBrowser(azc.zeroconf, [SERVICE_TYPE], handlers=[on_change])
    try:
        await asyncio.sleep(listen_s)
        found = []
        for name in sorted(names):
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if await info.async_request(azc.zeroconf, 1000):
                found.append(found_box(info))
            else:
                logger.info("%s did not resolve in time", name)
    finally:
        await browser.async_cancel()
        await azc.async_close()
    return sorted(found, key=lambda box: (box.site_id, box.name))


def format_table(boxes: Sequence[FoundBox]) -> str:
    """A plain-text table for a terminal (no colours, fixed columns)."""
    header = ("SITE", "NAME", "ADDRESSES", "PORT", "VERSION", "CERT SHA-256")
    rows = [header] + [
        (
            box.site_id,
            box.name,
            " ".join(box.addresses),
            str(box.https_port or ""),
            box.version,
            box.cert_sha256[:16] + ("…" if len(box.cert_sha256) > 16 else ""),
        )
        for box in boxes
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def host_addresses(adapters: Iterable[ifaddr.Adapter]) -> tuple[str, ...]:
    """The IPv4 and global IPv6 addresses kiosks can reach (no loopback, no link-local v6).

    Link-local IPv6 is left out because an address without its scope is unusable to a peer.
    """
    out: list[str] = []
    for adapter in adapters:
        for ip in adapter.ips:
            if isinstance(ip.ip, str):  # IPv4
                address = ipaddress.ip_address(ip.ip)
            else:  # IPv6: (address, flowinfo, scope_id)
                address = ipaddress.ip_address(ip.ip[0])
            if address.is_loopback or (address.version == 6 and address.is_link_local):
                continue
            if str(address) not in out:
                out.append(str(address))
    return tuple(out)


def advertisement_from_config(config_path: Path) -> Advertisement:
    """Build this box's advertisement from the site configuration and its certificate."""
    from appliance.config import load

    config = load(config_path)
    if config.web.tls_cert is None:
        raise DiscoveryError("web.tls_cert is not set: a box is advertised only over HTTPS")
    try:
        pem = config.web.tls_cert.read_bytes()
    except OSError as exc:
        raise DiscoveryError(f"{config.web.tls_cert}: {exc.strerror}") from exc
    addresses = host_addresses(ifaddr.get_adapters())
    if not addresses:
        raise DiscoveryError("no non-loopback address to advertise")
    return Advertisement(
        site_id=config.site.id,
        version=__version__,
        https_port=config.web.port,
        cert_sha256=certificate_fingerprint(pem),
        hostname=socket.gethostname().split(".")[0],
        addresses=addresses,
    )


async def async_serve(advertisement: Advertisement) -> None:
    """Advertise until SIGTERM/SIGINT: READY=1 once registered, WATCHDOG=1 while running."""
    advertiser = Advertiser(advertisement)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await advertiser.async_start()
    sdnotify.ready()
    watchdog = asyncio.create_task(sdnotify.run_watchdog(advertiser.is_running))
    try:
        await stop.wait()
    finally:
        sdnotify.stopping()
        watchdog.cancel()
        await asyncio.gather(watchdog, return_exceptions=True)
        await advertiser.async_close()


def cmd_discover(args: argparse.Namespace, config: object) -> int:
    """``appliance discover``: list the boxes that answer on the LAN."""
    boxes = asyncio.run(async_browse(args.timeout, args.interface or None))
    if args.format == "json":
        out = json.dumps([dataclasses.asdict(box) for box in boxes], indent=2)
    elif boxes:
        out = format_table(boxes)
    else:
        out = f"no appliance answered within {args.timeout:g} s"
    sys.stdout.write(out + "\n")
    return 0 if boxes else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m appliance.discovery --config FILE``: the discovery process."""
    from appliance.runtime import setup_logging
    from appliance.supervisor import EX_CONFIG

    parser = argparse.ArgumentParser(
        prog="appliance-discovery", description="Advertise this box on the LAN (mDNS)."
    )
    parser.add_argument(
        "--config", type=Path, default=Path("/etc/appliance/site.toml"), help="site TOML"
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        advertisement = advertisement_from_config(args.config)
        asyncio.run(async_serve(advertisement))
    except ApplianceError as exc:
        sys.stderr.write(f"appliance-discovery: {exc}\n")
        return EX_CONFIG  # the unit's RestartPreventExitStatus stops a restart loop
    return 0


if __name__ == "__main__":
    sys.exit(main())
