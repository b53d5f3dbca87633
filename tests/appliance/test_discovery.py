"""mDNS advertisement and browsing, for real, on loopback.

Two zeroconf instances bound to 127.0.0.1: one advertises the box, the other browses and
resolves it, over real multicast sockets. Multicast on ``lo`` was checked to work on the
CI machine (Debian, root, no systemd as PID 1); the loopback tests skip with the reason if
a machine cannot open the multicast socket at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import ifaddr
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance import discovery
from appliance.discovery import Advertisement, Advertiser, FoundBox, async_browse

LOOPBACK = ["127.0.0.1"]


def _certificate() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "box.test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _advertisement(site_id: str = "prairie-view", hostname: str = "box-1") -> Advertisement:
    return Advertisement(
        site_id=site_id,
        version="0.1.0",
        https_port=8443,
        cert_sha256=discovery.certificate_fingerprint(_certificate()),
        hostname=hostname,
        addresses=("127.0.0.1",),
    )


async def _advertiser(advertisement: Advertisement) -> Advertiser:
    advertiser = Advertiser(advertisement, interfaces=LOOPBACK)
    try:
        await advertiser.async_start()
    except OSError as exc:  # no multicast socket at all on this machine
        await advertiser.async_close()
        pytest.skip(f"cannot open a multicast socket on 127.0.0.1: {exc}")
    return advertiser


def test_fingerprint_is_sha256_of_the_der_certificate() -> None:
    pem = _certificate()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    assert discovery.certificate_fingerprint(pem) == hashlib.sha256(der).hexdigest()


def test_fingerprint_of_garbage_is_a_discovery_error() -> None:
    with pytest.raises(discovery.DiscoveryError):
        discovery.certificate_fingerprint(b"not a certificate")


def test_txt_record_carries_site_version_port_and_fingerprint() -> None:
    ad = _advertisement()
    assert ad.txt() == {
        "site": "prairie-view",
        "version": "0.1.0",
        "https_port": "8443",
        "cert_sha256": ad.cert_sha256,
    }
    assert ad.instance_name == "prairie-view@box-1._telehealth-appliance._tcp.local."


def test_host_addresses_leave_out_loopback_and_link_local_v6() -> None:
    adapter = ifaddr.Adapter(
        "eth0",
        "eth0",
        [
            ifaddr.IP("192.0.2.7", 24, "eth0"),
            ifaddr.IP(("fe80::1", 0, 2), 64, "eth0"),
            ifaddr.IP(("2001:db8::7", 0, 0), 64, "eth0"),
        ],
    )
    lo = ifaddr.Adapter(
        "lo", "lo", [ifaddr.IP("127.0.0.1", 8, "lo"), ifaddr.IP(("::1", 0, 0), 128, "lo")]
    )
    assert discovery.host_addresses([lo, adapter, adapter]) == ("192.0.2.7", "2001:db8::7")


def test_table_lists_each_box() -> None:
    box = FoundBox(
        "prairie-view@box-1",
        "prairie-view",
        "0.1.0",
        8443,
        "ab" * 32,
        ("10.0.0.5",),
        "box-1.local.",
    )
    lines = discovery.format_table([box]).splitlines()
    assert lines[0].split() == ["SITE", "NAME", "ADDRESSES", "PORT", "VERSION", "CERT", "SHA-256"]
    assert lines[1].split()[:5] == [
        "prairie-view",
        "prairie-view@box-1",
        "10.0.0.5",
        "8443",
        "0.1.0",
    ]


async def test_browser_finds_the_advertised_box_on_loopback() -> None:
    ad = _advertisement()
    advertiser = await _advertiser(ad)
    try:
        assert advertiser.is_running()
        boxes = await async_browse(2.0, interfaces=LOOPBACK)
    finally:
        await advertiser.async_close()
    assert boxes == [
        FoundBox(
            name="prairie-view@box-1",
            site_id="prairie-view",
            version="0.1.0",
            https_port=8443,
            cert_sha256=ad.cert_sha256,
            addresses=("127.0.0.1",),
            server="box-1.local.",
        )
    ]
    assert not advertiser.is_running()


async def test_two_boxes_are_both_listed_and_a_withdrawn_one_is_gone() -> None:
    first = await _advertiser(_advertisement("site-a", "box-a"))
    second = await _advertiser(_advertisement("site-b", "box-b"))
    try:
        boxes = await async_browse(2.0, interfaces=LOOPBACK)
        assert [box.site_id for box in boxes] == ["site-a", "site-b"]
        await second.async_close()  # sends goodbye packets (TTL 0)
        await asyncio.sleep(0.5)
        boxes = await async_browse(2.0, interfaces=LOOPBACK)
        assert [box.site_id for box in boxes] == ["site-a"]
    finally:
        await first.async_close()
        await second.async_close()


@pytest.mark.slow
async def test_appliance_discover_command_lists_the_box(tmp_path: Path) -> None:
    """The real CLI in a child process, browsing loopback while this test advertises."""
    ad = _advertisement()
    advertiser = await _advertiser(ad)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "appliance.cli",
            "discover",
            "--timeout",
            "2",
            "--interface",
            "127.0.0.1",
            "--format",
            "json",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await advertiser.async_close()
    assert proc.returncode == 0, err.decode()
    [box] = json.loads(out)
    assert box["site_id"] == "prairie-view"
    assert box["cert_sha256"] == ad.cert_sha256
    assert box["https_port"] == 8443


def test_discover_command_says_when_nobody_answers() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance.cli",
            "discover",
            "--timeout",
            "0.5",
            "--interface",
            "127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "no appliance answered" in result.stdout
