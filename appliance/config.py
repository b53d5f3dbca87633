"""The site configuration: one TOML file, parsed once into frozen dataclasses.

One schema (``_SCHEMA`` below: a table of field specs per section) drives validation,
defaults and the key reference in ``docs/site-config.md`` (rendered by :func:`reference`;
a test keeps the document in step). Every problem is collected and reported at once as
``"<dotted.path>: <message>"``, borgmatic-style. Unknown keys are errors, because a typo in
a key name must not silently fall back to a default. Secrets never appear here, only the
paths of the files that hold them; files are not opened here but where they are used.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from appliance.errors import ConfigError
from drivers import line_protocol
from drivers.line_protocol import LineProtocolSpec


class SiteType(StrEnum):
    """Kinds of originating site (they decide the claim form and place of service later)."""

    OFFICE = "office"
    HOSPITAL_OUTPATIENT = "hospital_outpatient"
    RHC = "rhc"
    FQHC = "fqhc"
    CAH = "cah"


class AuthKind(StrEnum):
    """How the box authenticates to an upstream FHIR server."""

    NONE = "none"
    BEARER = "bearer"
    SMART = "smart"
    MTLS = "mtls"


@dataclass(frozen=True, slots=True)
class Address:
    """The site's postal address (the billing provider address on claims)."""

    lines: tuple[str, ...]
    city: str
    state: str
    postal_code: str


@dataclass(frozen=True, slots=True)
class SiteConfig:
    """Who this site is."""

    id: str
    name: str
    type: SiteType
    npi: str
    tax_id: str
    timezone: str
    address: Address
    rural: bool = False


@dataclass(frozen=True, slots=True)
class PathsConfig:
    """Where the box keeps its data (absolute paths)."""

    data_dir: Path
    database: Path
    backups: Path


@dataclass(frozen=True, slots=True)
class KeysConfig:
    """Where the key-encryption key is read from (absolute path)."""

    kek_file: Path


@dataclass(frozen=True, slots=True)
class WebConfig:
    """The web process's listener and sessions."""

    host: str
    port: int
    public_url: str
    tls_cert: Path | None
    tls_key: Path | None
    session_idle_timeout_s: int


@dataclass(frozen=True, slots=True)
class DevicesConfig:
    """The devices process."""

    simulated: bool = False
    simulated_interval_s: float = 5.0
    clock_tolerance_s: float = 300.0
    line_protocols: tuple[LineProtocolSpec, ...] = ()

    def line_protocol(self, name: str) -> LineProtocolSpec | None:
        """The ``[[devices.line_protocol]]`` called ``name``, if declared."""
        return next((spec for spec in self.line_protocols if spec.name == name), None)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One upstream FHIR server the sync agent delivers to."""

    name: str
    base_url: str
    auth: AuthKind = AuthKind.NONE
    token_file: Path | None = None
    client_id: str | None = None
    token_url: str | None = None
    private_key_file: Path | None = None
    algorithm: str = "RS384"
    scope: str = "system/*.rs system/*.cu"
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    ca_file: Path | None = None
    max_bundle_entries: int = 8
    timeout_s: float = 30.0
    location: str | None = None
    also_known_as: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SyncConfig:
    """The sync process."""

    interval_s: float = 5.0
    backoff_cap_s: float = 300.0
    upstreams: tuple[UpstreamConfig, ...] = ()


class PayerKind(StrEnum):
    """Kinds of payer a Q3014 claim can go to (the eligibility rules differ per kind)."""

    MEDICARE = "medicare"
    MEDICAID = "medicaid"
    COMMERCIAL = "commercial"


@dataclass(frozen=True, slots=True)
class PayerConfig:
    """One payer the site bills (``[[claims.payer]]``); ``id`` is its X12 payer id."""

    id: str
    name: str
    kind: PayerKind
    state: str | None = None
    pays_q3014: bool | None = None
    geography_rule: bool | None = None
    fee: Decimal | None = None
    timely_filing_days: int | None = None
    filing_indicator: str | None = None


@dataclass(frozen=True, slots=True)
class ClaimsConfig:
    """Originating-site facility-fee claims (Q3014): who submits, who receives, how."""

    enabled: bool = False
    auto_ready: bool = False
    charge: Decimal | None = None
    usage: str = "test"
    submitter_name: str | None = None
    submitter_id: str | None = None
    contact_name: str | None = None
    contact_phone: str | None = None
    receiver_name: str | None = None
    receiver_id: str | None = None
    attending_npi: str | None = None
    attending_family: str | None = None
    attending_given: str | None = None
    endpoint_kind: str = "x12"
    endpoint_url: str | None = None
    auth: AuthKind = AuthKind.NONE
    token_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    ca_file: Path | None = None
    timeout_s: float = 30.0
    batch_size: int = 100
    poll_responses: bool = True
    payers: tuple[PayerConfig, ...] = ()

    def payer(self, payer_id: str) -> PayerConfig | None:
        """The ``[[claims.payer]]`` with this payer id, if declared."""
        return next((p for p in self.payers if p.id == payer_id), None)

    def payer_of_kind(self, kind: PayerKind) -> PayerConfig | None:
        """The first declared payer of a kind (the Medicare MAC, typically)."""
        return next((p for p in self.payers if p.kind is kind), None)


@dataclass(frozen=True, slots=True)
class RpmConfig:
    """Remote-monitoring alerts (the engine in the devices process; docs/rpm.md)."""

    poll_s: float = 0.25
    tick_s: float = 60.0
    escalate_critical_min: int = 15
    escalate_high_min: int = 60  # 0: high alerts never escalate
    escalate_to_role: str = "provider"
    sync_backlog_hours: float = 24.0  # 0: the sync-backlog rule is off
    quiet_days: float = 3.0
    device_silent_hours: float = 48.0


@dataclass(frozen=True, slots=True)
class ExamCameraConfig:
    """A camera attached to the box (``[[video.exam_camera]]``; services/video/exam_camera.py)."""

    name: str = "exam camera"
    device: str = "/dev/video0"
    format: str = "v4l2"
    size: str = "1280x720"
    framerate: int = 30


@dataclass(frozen=True, slots=True)
class IceServerConfig:
    """A STUN or TURN server for video visits (``[[video.ice_server]]``)."""

    urls: tuple[str, ...]
    username: str | None = None
    credential_file: Path | None = None
    secret_file: Path | None = None
    credential_ttl_s: int = 14_400


@dataclass(frozen=True, slots=True)
class VideoConfig:
    """The video relay's WAN leg and its codec fallback (``[video]``; services/video/)."""

    uplink_kbps: int = 2500
    audio_only_kbps: int = 150
    transcode_encoders: int = 1
    ice_servers: tuple[IceServerConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    """The whole site configuration; ``source`` is the file it came from, if any."""

    site: SiteConfig
    paths: PathsConfig
    keys: KeysConfig
    web: WebConfig
    devices: DevicesConfig
    sync: SyncConfig
    source: Path | None
    rpm: RpmConfig = dataclass_field(default_factory=RpmConfig)
    claims: ClaimsConfig = dataclass_field(default_factory=ClaimsConfig)
    exam_cameras: tuple[ExamCameraConfig, ...] = ()
    video: VideoConfig = dataclass_field(default_factory=VideoConfig)

    def exam_camera(self, name: str) -> ExamCameraConfig | None:
        """The ``[[video.exam_camera]]`` called ``name``, if declared."""
        return next((c for c in self.exam_cameras if c.name == name), None)


def npi_is_valid(npi: str) -> bool:
    """Whether ``npi`` is 10 digits whose last is the Luhn check digit with prefix 80840.

    The prefix is the NPI's ISO 7812 issuer identifier (CMS, "NPI check digit" note); the
    doubled and plain digits of "80840" always add 24 to the Luhn sum.
    """
    if not re.fullmatch(r"[0-9]{10}", npi):
        return False
    total = 24
    for index, char in enumerate(reversed(npi[:9])):
        digit = int(char) * (2 if index % 2 == 0 else 1)
        total += digit - 9 if digit > 9 else digit
    return (10 - total % 10) % 10 == int(npi[9])


# --- value types: how the docs name a value, and how a raw TOML value becomes ours --------


@dataclass(frozen=True, slots=True)
class _Type:
    describe: str
    convert: Callable[[object], object]  # raises ValueError(message) for a wrong value


def _expect(
    describe: str, ok: Callable[[Any], bool], convert: Callable[[Any], object] = lambda v: v
) -> _Type:
    def run(value: object) -> object:
        if not ok(value):
            raise ValueError(f"expected {describe}, got {value!r}")
        return convert(value)

    return _Type(describe, run)


def _is_text(value: object) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _int(low: int, high: int) -> _Type:
    return _expect(
        f"an integer from {low} to {high}", lambda v: type(v) is int and low <= v <= high
    )


def _number(low: float, high: float) -> _Type:
    return _expect(
        f"a number from {low:g} to {high:g}",
        lambda v: type(v) in (int, float) and low <= v <= high,
        float,
    )


def _pattern(describe: str, regex: str, convert: Callable[[str], object] = str) -> _Type:
    return _expect(describe, lambda v: isinstance(v, str) and bool(re.fullmatch(regex, v)), convert)


def _one_of(values: tuple[str, ...], convert: Callable[[str], object] = str) -> _Type:
    def run(value: object) -> object:
        if value not in values:
            raise ValueError(f"unknown value {value!r}; expected one of {', '.join(values)}")
        return convert(str(value))

    return _Type(f"one of {', '.join(values)}", run)


def _is_url(value: object) -> bool:
    if not isinstance(value, str) or re.search(r"\s", value):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _check_npi(value: object) -> object:
    npi = _pattern("a 10-digit NPI", r"[0-9]{10}").convert(value)
    if not npi_is_valid(str(npi)):
        raise ValueError(f"{npi!r} fails the NPI check digit (Luhn with prefix 80840)")
    return npi


def _check_zone(value: object) -> object:
    name = _TEXT.convert(value)
    try:
        ZoneInfo(str(name))
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"{name!r} is not an IANA time zone (e.g. America/Chicago)") from None
    return name


# USPS codes: the states, DC, the territories, the freely associated states and APO/FPO.
_USPS_CODES = (
    "AL AK AZ AR CA CO CT DE FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH "
    "NJ NM NY NC ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY DC AS GU MP PR VI FM MH "
    "PW AA AE AP"
)
_USPS_STATES = frozenset(_USPS_CODES.split())

_TEXT = _expect("a non-empty string", _is_text)
_BOOL = _expect("true or false", lambda v: isinstance(v, bool))
_PATH = _expect("a file path", _is_text, Path)
_URL = _expect("an http:// or https:// URL", _is_url, lambda v: v.rstrip("/"))
_URLS = _expect(
    "a list of http:// or https:// URLs",
    lambda v: isinstance(v, list) and all(_is_url(url) for url in v),
    lambda v: tuple(url.rstrip("/") for url in v),
)
_NPI = _Type("a 10-digit NPI with a valid check digit", _check_npi)
_MONEY = _expect(
    'an amount in dollars as a string ("31.85")',
    lambda v: isinstance(v, str) and bool(re.fullmatch(r"[0-9]{1,7}(\.[0-9]{1,2})?", v)),
    Decimal,
)
_X12_ID = _pattern("2-15 letters or digits", r"[A-Za-z0-9]{2,15}")
_X12_NAME = _pattern(
    "1-60 characters of letters, digits, spaces and .,&'-", r"[A-Za-z0-9 .,&'-]{1,60}"
)
_ZONE = _Type("an IANA time zone name", _check_zone)
_ICE_URLS = _expect(
    "a list of stun:, stuns:, turn: or turns: URLs",
    lambda v: (
        isinstance(v, list)
        and len(v) > 0
        and all(isinstance(u, str) and re.fullmatch(r"(stuns?|turns?):[^\s]{1,250}", u) for u in v)
    ),
    tuple,
)
_LINES = _expect(
    "a list of one or more address lines",
    lambda v: isinstance(v, list) and len(v) > 0 and all(_is_text(line) for line in v),
    tuple,
)
_STATE = _expect(
    "a 2-letter USPS state code",
    lambda v: isinstance(v, str) and v.upper() in _USPS_STATES,
    str.upper,
)


# --- the schema -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Computed:
    """A default worked out from other values; ``text`` is how the docs show it."""

    text: str


_REQUIRED = _Computed("required")


@dataclass(frozen=True, slots=True)
class _Field:
    key: str
    type: _Type
    default: object
    help: str


_F = _Field
# fmt: off
_SCHEMA: dict[str, tuple[_Field, ...]] = {
    "site": (
        _F("id", _pattern("a site id (3-64 of a-z, 0-9, -; starts with a letter or digit)",
                          r"[a-z0-9][a-z0-9-]{2,63}"), _REQUIRED,
           "Stable identifier of the site, used in resource identifiers and upstream tags."),
        _F("name", _TEXT, _REQUIRED, "Name shown to staff and patients."),
        _F("type", _one_of(tuple(SiteType), SiteType), _REQUIRED,
           "Kind of originating site; decides place of service and claim rules."),
        _F("npi", _NPI, _REQUIRED, "Organisation NPI (type 2), billing provider on claims."),
        _F("tax_id", _pattern("an EIN (12-3456789 or 123456789)", r"[0-9]{2}-?[0-9]{7}",
                              lambda v: v.replace("-", "")), _REQUIRED,
           "Employer identification number; stored as 9 digits."),
        _F("timezone", _ZONE, _REQUIRED, "Local time zone for schedules and reading times."),
        _F("rural", _BOOL, False, "The site is in a non-MSA county or a rural HPSA."),
    ),
    "site.address": (
        _F("lines", _LINES, _REQUIRED, "Street address lines."),
        _F("city", _TEXT, _REQUIRED, "City."),
        _F("state", _STATE, _REQUIRED, "USPS state or territory code."),
        _F("postal_code", _pattern("a ZIP code (12345, 12345-6789 or 123456789)",
                                   r"[0-9]{5}(-?[0-9]{4})?"), _REQUIRED, "ZIP or ZIP+4."),
    ),
    "paths": (
        _F("data_dir", _PATH, _REQUIRED, "Folder for the database, backups and dev keys."),
        _F("database", _PATH, _Computed("data_dir/appliance.db"), "The SQLite database."),
        _F("backups", _PATH, _Computed("data_dir/backups"), "Where `backup create` writes."),
    ),
    "keys": (
        _F("kek_file", _PATH, _Computed("$CREDENTIALS_DIRECTORY/kek, else data_dir/keys/kek"),
           "The key-encryption key file (a systemd credential in production)."),
    ),
    "web": (
        _F("host", _TEXT, "127.0.0.1", "Address the web process listens on."),
        _F("port", _int(1, 65535), 8443, "TCP port the web process listens on."),
        _F("public_url", _URL, _Computed("https://host:port with TLS, else http://host:port"),
           "The URL staff and remote providers use (links, banner, SMART redirects)."),
        _F("tls_cert", _PATH, None, "PEM server certificate chain (give with tls_key)."),
        _F("tls_key", _PATH, None, "PEM private key of tls_cert (give with tls_cert)."),
        _F("session_idle_timeout_s", _int(60, 86400), 900,
           "Seconds of inactivity before a staff session ends."),
    ),
    "devices": (
        _F("simulated", _BOOL, False, "Run simulated devices at demo stations (demo, testing)."),
        _F("simulated_interval_s", _number(0.05, 3600), 5.0,
           "Seconds between simulated readings."),
        _F("clock_tolerance_s", _number(0, 86400), 300.0,
           "A device time later than its receipt by more than this is not trusted."),
    ),
    "sync": (
        _F("interval_s", _number(0.1, 3600), 5.0, "Seconds between outbox polls when idle."),
        _F("backoff_cap_s", _number(1, 3600), 300.0,
           "Longest wait, in seconds, between tries while the upstream answers with errors "
           "(the wait doubles from 1 s up to this, with jitter; a server's Retry-After is "
           "still honoured up to an hour). Shorten it for an EHR on the same campus network."),
    ),
    "sync.upstream": (
        _F("name", _TEXT, _REQUIRED, "Unique name of the upstream (logs, sync status)."),
        _F("base_url", _URL, _REQUIRED,
           "FHIR R4 base URL (a trailing slash is dropped; https with bearer, smart or a "
           "client certificate, unless on loopback: the sync process refuses to start "
           "otherwise)."),
        _F("auth", _one_of(tuple(AuthKind), AuthKind), AuthKind.NONE, "How the box authenticates."),
        _F("token_file", _PATH, None, "File holding the bearer token (required for bearer)."),
        _F("client_id", _TEXT, None, "SMART Backend Services client id (required for smart)."),
        _F("token_url", _expect("an http:// or https:// URL", _is_url), None,
           "SMART token endpoint (required for smart)."),
        _F("private_key_file", _PATH, None,
           "PEM key signing SMART client assertions (required for smart)."),
        _F("algorithm", _one_of(("RS384", "ES384")), "RS384", "SMART client assertion algorithm."),
        _F("scope", _pattern("space-separated SMART scopes such as system/Observation.cu",
                             r"[!#-\[\]-~]+( [!#-\[\]-~]+)*"),
           "system/*.rs system/*.cu",
           "SMART scopes asked for (smart only); the EHR grants what the registration allows."),
        _F("client_cert_file", _PATH, None,
           "PEM client certificate (required for mtls; presented beside bearer or smart too, "
           "with client_key_file)."),
        _F("client_key_file", _PATH, None, "PEM key of client_cert_file (required with it)."),
        _F("ca_file", _PATH, None, "PEM CA bundle to verify the server (default: the Mozilla CA bundle of certifi)."),
        _F("max_bundle_entries", _int(1, 1000), 8, "Most entries in one transaction Bundle."),
        _F("timeout_s", _number(1, 600), 30.0, "Seconds to wait for one HTTP exchange."),
        _F("location", _pattern("a reference Location/<id>", r"Location/[A-Za-z0-9.-]{1,64}"),
           None, "This site's Location on this upstream: Appointments with it as a participant "
           "(`actor`) are pulled, with their Patients. Unset: no Appointments are pulled."),
        _F("also_known_as", _URLS, (),
           "Other base URLs the server writes for itself, as a server behind a gateway or "
           "proxy that does not know its public address does (http://localhost:8080/fhir): "
           "references at them are its own, and its next links at them are followed at "
           "base_url (nothing is ever sent to these addresses). Records pulled before it "
           "is set keep such a reference until the EHR changes them."),
    ),
    "claims": (
        _F("enabled", _BOOL, False, "Draft a Q3014 facility-fee claim for each eligible visit."),
        _F("auto_ready", _BOOL, False,
           "A draft that passes every check becomes ready without a biller's review."),
        _F("charge", _MONEY, _Computed("the fee schedule amount on the date of service"),
           "The site's charge for Q3014 (CLM02); Medicare pays 80 % of the lesser of "
           "charge and fee."),
        _F("usage", _one_of(("test", "production")), "test",
           "ISA15: interchanges marked as test (T) or production (P) data."),
        _F("submitter_name", _X12_NAME, _Computed("site.name"), "1000A submitter name."),
        _F("submitter_id", _X12_ID, None,
           "1000A submitter id (ETIN) the clearinghouse gave you (required when enabled)."),
        _F("contact_name", _X12_NAME, None, "1000A PER contact (required when enabled)."),
        _F("contact_phone", _pattern("10 digits", r"[0-9]{10}"), None,
           "1000A PER telephone, 10 digits (required when enabled)."),
        _F("receiver_name", _X12_NAME, None, "1000B receiver (clearinghouse) name "
           "(required when enabled)."),
        _F("receiver_id", _X12_ID, None, "1000B receiver id, also ISA08/GS03 "
           "(required when enabled)."),
        _F("attending_npi", _NPI, None,
           "837I 2310A attending provider NPI (required for every site type but office)."),
        _F("attending_family", _X12_NAME, None, "Attending provider's family name."),
        _F("attending_given", _X12_NAME, None, "Attending provider's given name."),
        _F("endpoint_kind", _one_of(("x12", "fhir")), "x12",
           "Where ready claims go: X12 837 to a clearinghouse, or FHIR Claim to a FHIR payer."),
        _F("endpoint_url", _URL, None,
           "The clearinghouse (x12: POST {url}/submissions, GET {url}/responses) or FHIR payer "
           "base URL (POST {url}/Claim). Unset: claims are not submitted (docs/claims.md)."),
        _F("auth", _one_of((AuthKind.NONE, AuthKind.BEARER, AuthKind.MTLS), AuthKind),
           AuthKind.NONE, "How the box authenticates to the endpoint: none, bearer or mtls."),
        _F("token_file", _PATH, None, "File holding the bearer token (required for bearer)."),
        _F("client_cert_file", _PATH, None, "PEM client certificate (required for mtls)."),
        _F("client_key_file", _PATH, None, "PEM key of client_cert_file (required for mtls)."),
        _F("ca_file", _PATH, None,
           "PEM CA bundle to verify the endpoint (default: the Mozilla CA bundle of certifi)."),
        _F("timeout_s", _number(1, 600), 30.0, "Seconds to wait for one HTTP exchange."),
        _F("batch_size", _int(1, 500), 100, "Most claims in one interchange (x12)."),
        _F("poll_responses", _BOOL, True,
           "Poll the clearinghouse for 999/277CA/835 files after each submission pass (x12)."),
    ),
    "claims.payer": (
        _F("id", _X12_ID, _REQUIRED, "Payer id (2010BB NM1*PR ... PI), e.g. the MAC's id."),
        _F("name", _X12_NAME, _REQUIRED, "Payer name."),
        _F("kind", _one_of(tuple(PayerKind), PayerKind), _REQUIRED,
           "medicare, medicaid or commercial: which eligibility rules apply."),
        _F("state", _STATE, None, "For medicaid: the state whose program this is "
           "(default site.address.state)."),
        _F("pays_q3014", _BOOL, _Computed("the data table's rule for the kind"),
           "Whether this payer pays the originating-site fee (required for commercial)."),
        _F("geography_rule", _BOOL, _Computed("the data table's rule for the kind"),
           "Whether the rural (non-MSA or rural HPSA) requirement applies."),
        _F("fee", _MONEY, _Computed("the Medicare fee schedule"),
           "This payer's own fee for Q3014."),
        _F("timely_filing_days", _int(30, 1095), _Computed("365"),
           "Days after the date of service within which a claim must be filed."),
        _F("filing_indicator", _pattern("a claim filing indicator code (2 characters)",
                                        r"[0-9A-Z]{2}"), _Computed("by kind: MB/MA, MC, CI"),
           "SBR09 claim filing indicator."),
    ),
    "video": (
        _F("uplink_kbps", _int(100, 1_000_000), 2500,
           "Uplink budget (kbit/s) for the video the box sends to remote providers, shared "
           "among their streams; each publisher is capped to it and to what its remote "
           "viewers report they can take (REMB). Leave room for the rest of the site's traffic."),
        _F("audio_only_kbps", _int(30, 10_000), 150,
           "Below this estimate (kbit/s), on a congested path, a remote viewer gets audio "
           "only; the box probes from 3 s on and restores video once the path carries 1.5 "
           "times this (or all the video sends) for 3 s (docs/video.md, The WAN leg)."),
        _F("transcode_encoders", _int(0, 4), 1,
           "Decode + re-encode copies the box may run at once, for viewers whose browser "
           "cannot take the publisher's video codec (VP8/H.264); each costs 15-60 % of a "
           "core. 0: such a viewer gets audio only (docs/video.md, Codecs)."),
    ),
    "video.ice_server": (
        _F("urls", _ICE_URLS, _REQUIRED,
           "STUN or TURN server URLs (stun:, turns: or turn:host:port?transport=udp), given "
           "to the box's peer connections and to every browser in the visit."),
        _F("username", _TEXT, None,
           "TURN username of one static account (turn: and turns: URLs need it and "
           "credential_file, or secret_file instead)."),
        _F("credential_file", _PATH, None,
           "File holding that account's TURN credential; every browser in every visit is "
           "given it, so prefer secret_file."),
        _F("secret_file", _PATH, None,
           "File holding the secret shared with the TURN server (coturn use-auth-secret, "
           "static-auth-secret): each participant gets its own credential that expires "
           "(docs/video.md, The WAN leg)."),
        _F("credential_ttl_s", _int(600, 86_400), 14_400,
           "Lifetime (seconds) of a credential made from secret_file: longer than a visit."),
    ),
    "video.exam_camera": (
        _F("name", _pattern("a name of letters, digits, spaces and - (1-40)",
                            r"[A-Za-z0-9][A-Za-z0-9 -]{0,39}"), _REQUIRED,
           "Shown on the nurse's video page and in each still's Media, e.g. \"otoscope\". "
           "Not yet usable on a provisioned box (docs/video.md, Exam cameras)."),
        _F("device", _TEXT, "/dev/video0",
           "The V4L2 device (with format lavfi: a libav test source, e.g. testsrc2)."),
        _F("format", _one_of(("v4l2", "lavfi")), "v4l2",
           "v4l2: a USB camera; lavfi: libav's test pattern instead (demo, testing)."),
        _F("size", _pattern("WIDTHxHEIGHT", r"[1-9][0-9]{1,4}x[1-9][0-9]{1,4}"), "1280x720",
           "The frame size asked of the camera."),
        _F("framerate", _int(1, 60), 30, "Frames per second asked of the camera."),
    ),
    # Ranges of quiet_days and device_silent_hours: those of the rules' own parameters
    # (services/rpm_rules.py RULE_PARAMS; a test keeps them equal). Roles: users.Role.
    "rpm": (
        _F("poll_s", _number(0.05, 60), 0.25,
           "Seconds between looks for newly committed readings to evaluate."),
        _F("tick_s", _number(1, 3600), 60.0,
           "Seconds between runs of the time-based rules, snooze ends and escalation."),
        _F("escalate_critical_min", _int(1, 1440), 15,
           "Minutes a critical alert may stay unacknowledged before it escalates."),
        _F("escalate_high_min", _int(0, 1440), 60,
           "Minutes a high alert may stay unacknowledged before it escalates (0: never)."),
        _F("escalate_to_role", _one_of(("provider", "nurse", "admin")), "provider",
           "The role an alert escalates to (shown on the worklist)."),
        _F("sync_backlog_hours", _number(0, 720), 24.0,
           "A site alert when an item has waited this long to go upstream (0: off)."),
        _F("quiet_days", _number(1, 30), 3.0,
           "Days without a reading before a patient is quiet (a patient's own value wins)."),
        _F("device_silent_hours", _number(1, 720), 48.0,
           "Hours a patient's home device may go unseen (a patient's own value wins)."),
    ),
}
# fmt: on
_TOP_LEVEL = ("site", "paths", "keys", "web", "devices", "sync", "claims", "rpm", "video")
_REQUIRED_WHEN_CLAIMS = (
    "submitter_id",
    "contact_name",
    "contact_phone",
    "receiver_name",
    "receiver_id",
)
_REQUIRED_BY_AUTH = {
    AuthKind.BEARER: ("token_file",),
    AuthKind.SMART: ("client_id", "token_url", "private_key_file"),
    AuthKind.MTLS: ("client_cert_file", "client_key_file"),
}


def _whole_number_text(text: str) -> object:
    return int(text) if re.fullmatch(r"\s*-?[0-9]+\s*", text) else text


def _path_from_cwd(text: str) -> object:
    return str(Path(text).absolute()) if text.strip() else text


# Environment variable -> (section, key, how its text becomes a TOML-like value).
_ENV_OVERRIDES: dict[str, tuple[str, str, Callable[[str], object]]] = {
    "APPLIANCE_WEB_PORT": ("web", "port", _whole_number_text),
    "APPLIANCE_WEB_HOST": ("web", "host", str),
    "APPLIANCE_DATA_DIR": ("paths", "data_dir", _path_from_cwd),
}


class _Reader:
    """Reads tables against the schema, collecting every problem instead of stopping."""

    def __init__(self, base_dir: Path, environ: Mapping[str, str]) -> None:
        self.base_dir = base_dir
        self.problems: list[str] = []
        self.overrides = {
            (section, key): (f"env {name}", parse_text(environ[name]))
            for name, (section, key, parse_text) in _ENV_OVERRIDES.items()
            if name in environ
        }

    def table(
        self, schema: str, raw: object, where: str | None = None, nested: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """The converted values of one table; an absent table reads as an empty one."""
        where = where or schema
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            self.problems.append(f"{where}: expected a table, got {raw!r}")
            raw = {}
        fields = _SCHEMA[schema]
        known = {field.key for field in fields} | set(nested)
        self.problems.extend(f"{where}.{key}: unknown key" for key in raw if key not in known)
        values: dict[str, Any] = {}
        for field in fields:
            path, value = f"{where}.{field.key}", raw.get(field.key)
            if (where, field.key) in self.overrides:
                path, value = self.overrides[where, field.key]
            values[field.key] = None if isinstance(field.default, _Computed) else field.default
            if value is None:
                if field.default is _REQUIRED:
                    self.problems.append(f"{path}: required")
                continue
            try:
                values[field.key] = field.type.convert(value)
            except ValueError as exc:
                self.problems.append(f"{path}: {exc}")
            if isinstance(values[field.key], Path):
                values[field.key] = self.base_dir / values[field.key]
        return values

    def upstreams(self, raw: object) -> list[dict[str, Any]]:
        """The ``[[sync.upstream]]`` tables, with the rules that span their keys."""
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.problems.append("sync.upstream: expected an array of tables ([[sync.upstream]])")
            return []
        result: list[dict[str, Any]] = []
        first_with_name: dict[str, str] = {}
        for index, item in enumerate(raw):
            where = f"sync.upstream[{index}]"
            up = self.table("sync.upstream", item, where)
            name = up["name"]
            if name in first_with_name:
                self.problems.append(
                    f"{where}.name: {name!r} is already used by {first_with_name[name]}"
                )
            elif name is not None:
                first_with_name[name] = where
            auth = up["auth"]
            for key in _REQUIRED_BY_AUTH.get(auth, ()):
                if up[key] is None:
                    self.problems.append(f"{where}.{key}: required when auth is {auth.value!r}")
            result.append(up)
        if len(result) > 1:
            # One outbox, one delivery state per record: a second EHR would silently get
            # nothing. Payer endpoints for claims are configured with the claims, not here.
            self.problems.append(
                "sync.upstream: one upstream EHR per site is supported "
                f"({len(result)} are configured); keep the one this site's records belong to"
            )
        return result

    def exam_cameras(self, raw: object) -> list[ExamCameraConfig]:
        """The ``[video]`` table: its ``[[video.exam_camera]]`` tables, names unique."""
        if raw is None:
            return []
        if not isinstance(raw, Mapping):
            self.problems.append(f"video: expected a table, got {raw!r}")
            return []
        # Unknown keys of [video] itself: reported by ``table("video", ...)``.
        tables = raw.get("exam_camera")
        if tables is None:
            return []
        if not isinstance(tables, list):
            self.problems.append(
                "video.exam_camera: expected an array of tables ([[video.exam_camera]])"
            )
            return []
        cameras: list[ExamCameraConfig] = []
        for index, item in enumerate(tables):
            where = f"video.exam_camera[{index}]"
            camera = self.table("video.exam_camera", item, where)
            if camera["name"] is None:
                continue
            if any(c.name == camera["name"] for c in cameras):
                self.problems.append(f"{where}.name: {camera['name']!r} is declared twice")
                continue
            cameras.append(ExamCameraConfig(**camera))
        return cameras

    def ice_servers(self, raw: object) -> list[IceServerConfig]:
        """The ``[[video.ice_server]]`` tables; a TURN server needs its credentials."""
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.problems.append(
                "video.ice_server: expected an array of tables ([[video.ice_server]])"
            )
            return []
        servers: list[IceServerConfig] = []
        for index, item in enumerate(raw):
            where = f"video.ice_server[{index}]"
            server = self.table("video.ice_server", item, where)
            if server["urls"] is None:
                continue
            turn = any(url.startswith("turn") for url in server["urls"])
            static = server["username"] is not None or server["credential_file"] is not None
            if server["secret_file"] is not None and static:
                self.problems.append(
                    f"{where}.secret_file: give either secret_file or username and "
                    "credential_file, not both"
                )
            elif turn and server["secret_file"] is None:
                for key in ("username", "credential_file"):
                    if server[key] is None:
                        self.problems.append(
                            f"{where}.{key}: required for a TURN server (or secret_file)"
                        )
            servers.append(IceServerConfig(**server))
        return servers

    def line_protocols(self, raw: object) -> list[LineProtocolSpec]:
        """The ``[[devices.line_protocol]]`` tables (checked by drivers/line_protocol.py)."""
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.problems.append(
                "devices.line_protocol: expected an array of tables ([[devices.line_protocol]])"
            )
            return []
        specs: list[LineProtocolSpec] = []
        for index, item in enumerate(raw):
            where = f"devices.line_protocol[{index}]"
            if not isinstance(item, Mapping):
                self.problems.append(f"{where}: expected a table")
                continue
            try:
                spec = line_protocol.from_mapping(item)
            except line_protocol.SpecError as exc:
                self.problems.extend(f"{where}.{problem}" for problem in exc.problems)
                continue
            if any(s.name == spec.name for s in specs):
                self.problems.append(f"{where}.name: {spec.name!r} is declared twice")
            specs.append(spec)
        return specs

    def claims(self, raw: object, payers_raw: object) -> tuple[dict[str, Any], list[PayerConfig]]:
        """The ``[claims]`` table and its ``[[claims.payer]]`` tables."""
        claims = self.table("claims", raw, nested=("payer",))
        if claims["enabled"]:
            for key in _REQUIRED_WHEN_CLAIMS:
                if claims[key] is None:
                    self.problems.append(f"claims.{key}: required when claims.enabled is true")
        if claims["endpoint_url"] is not None:
            for key in _REQUIRED_BY_AUTH.get(claims["auth"], ()):
                if claims[key] is None:
                    self.problems.append(
                        f"claims.{key}: required when claims.auth is {claims['auth'].value!r}"
                    )
        payers: list[PayerConfig] = []
        if payers_raw is None:
            return claims, payers
        if not isinstance(payers_raw, list):
            self.problems.append("claims.payer: expected an array of tables ([[claims.payer]])")
            return claims, payers
        for index, item in enumerate(payers_raw):
            where = f"claims.payer[{index}]"
            payer = self.table("claims.payer", item, where)
            if payer["id"] is not None and any(p.id == payer["id"] for p in payers):
                self.problems.append(f"{where}.id: {payer['id']!r} is declared twice")
            if payer["kind"] is PayerKind.COMMERCIAL and payer["pays_q3014"] is None:
                self.problems.append(f"{where}.pays_q3014: required when kind is 'commercial'")
            if None not in (payer["id"], payer["name"], payer["kind"]):
                payers.append(PayerConfig(**payer))
        return claims, payers


def _subtable(data: Mapping[str, object], section: str, key: str) -> object:
    table = data.get(section)
    return table.get(key) if isinstance(table, Mapping) else None


def parse(
    data: Mapping[str, object],
    *,
    source: str = "<config>",
    base_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Validate a parsed TOML document into a :class:`Config`.

    Relative paths resolve against ``base_dir`` (default: the current directory).
    ``environ`` (default ``os.environ``) supplies ``APPLIANCE_WEB_PORT``,
    ``APPLIANCE_WEB_HOST`` and ``APPLIANCE_DATA_DIR`` overrides and
    ``CREDENTIALS_DIRECTORY``. Raises :class:`ConfigError` listing every problem.
    """
    env = os.environ if environ is None else environ
    reader = _Reader(base_dir or Path.cwd(), env)
    reader.problems.extend(f"{key}: unknown key" for key in data if key not in _TOP_LEVEL)
    site = reader.table("site", data.get("site"), nested=("address",))
    address = reader.table("site.address", _subtable(data, "site", "address"))
    paths = reader.table("paths", data.get("paths"))
    keys = reader.table("keys", data.get("keys"))
    web = reader.table("web", data.get("web"))
    devices = reader.table("devices", data.get("devices"), nested=("line_protocol",))
    line_protocols = reader.line_protocols(_subtable(data, "devices", "line_protocol"))
    sync = reader.table("sync", data.get("sync"), nested=("upstream",))
    upstreams = reader.upstreams(_subtable(data, "sync", "upstream"))
    rpm = reader.table("rpm", data.get("rpm"))
    claims, payers = reader.claims(data.get("claims"), _subtable(data, "claims", "payer"))
    exam_cameras = reader.exam_cameras(data.get("video"))
    raw_video = data.get("video")  # not a table: exam_cameras reported it
    video = reader.table(
        "video",
        raw_video if isinstance(raw_video, Mapping) else None,
        nested=("exam_camera", "ice_server"),
    )
    ice_servers = reader.ice_servers(_subtable(data, "video", "ice_server"))
    for present, missing in (("tls_cert", "tls_key"), ("tls_key", "tls_cert")):
        if web[present] is not None and web[missing] is None:
            reader.problems.append(f"web.{missing}: required when web.{present} is set")
    if reader.problems:
        raise ConfigError(reader.problems, source)

    data_dir: Path = paths["data_dir"]
    credentials = env.get("CREDENTIALS_DIRECTORY")
    default_kek = Path(credentials) / "kek" if credentials else data_dir / "keys" / "kek"
    return Config(
        site=SiteConfig(**site, address=Address(**address)),
        paths=PathsConfig(
            data_dir=data_dir,
            database=paths["database"] or data_dir / "appliance.db",
            backups=paths["backups"] or data_dir / "backups",
        ),
        keys=KeysConfig(kek_file=keys["kek_file"] or default_kek),
        web=WebConfig(**{**web, "public_url": web["public_url"] or _default_url(web)}),
        devices=DevicesConfig(**devices, line_protocols=tuple(line_protocols)),
        sync=SyncConfig(**sync, upstreams=tuple(UpstreamConfig(**up) for up in upstreams)),
        source=None,
        rpm=RpmConfig(**rpm),
        claims=ClaimsConfig(
            **{**claims, "submitter_name": claims["submitter_name"] or site["name"]},
            payers=tuple(payers),
        ),
        exam_cameras=tuple(exam_cameras),
        video=VideoConfig(**video, ice_servers=tuple(ice_servers)),
    )


def _default_url(web: Mapping[str, Any]) -> str:
    host = f"[{web['host']}]" if ":" in web["host"] else web["host"]
    scheme = "https" if web.get("tls_cert") else "http"
    return f"{scheme}://{host}:{web['port']}"


def _toml_problem(exc: tomllib.TOMLDecodeError) -> str:
    # Python 3.11's TOMLDecodeError has no lineno attribute; the place ends the message.
    message = str(exc)
    found = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message)
    if found is None:
        return f"malformed TOML: {message}"
    text, line, column = found.groups()
    return f"line {line}, column {column}: malformed TOML: {text}"


def load(path: Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate the TOML file at ``path``; raises :class:`ConfigError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = "copy docs/site.example.toml there and edit it, or pass --config FILE"
        raise ConfigError([f"{path}: no such file; {hint}"], str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        hint = "check that it is a UTF-8 text file the appliance user can read"
        raise ConfigError([f"{path}: cannot read ({why}); {hint}"], str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_toml_problem(exc)], str(path)) from None
    config = parse(data, source=str(path), base_dir=path.parent.absolute(), environ=environ)
    return replace(config, source=path)


# A synthetic site for demo mode: the NPI passes the check digit but is nobody's.
_DEMO_SITE: dict[str, object] = {
    "id": "demo-clinic",
    "name": "Demo Rural Health Clinic",
    "type": "rhc",
    "npi": "1234567893",
    "tax_id": "123456789",
    "timezone": "America/Chicago",
    "rural": True,
    "address": {
        "lines": ["100 Example Road"],
        "city": "Prairie Bend",
        "state": "KS",
        "postal_code": "67000",
    },
}


def demo_config(data_dir: Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """The embedded configuration of ``make run``: a synthetic RHC with a simulated cuff.

    HTTPS on 127.0.0.1:8443 with the development certificate of :mod:`appliance.tls`
    under ``data_dir/tls/``; the key-encryption key is always ``data_dir/keys/kek`` (never
    a systemd credential). ``APPLIANCE_DEMO_UPSTREAM=<base url>`` adds an upstream named
    ``ehr`` without authentication; the usual environment overrides apply.
    """
    env = dict(os.environ if environ is None else environ)
    env.pop("CREDENTIALS_DIRECTORY", None)
    data = Path(env.get("APPLIANCE_DATA_DIR") or data_dir)
    doc: dict[str, object] = {
        "site": _DEMO_SITE,
        "paths": {"data_dir": str(data_dir)},
        "web": {
            "host": "127.0.0.1",
            "port": 8443,
            "tls_cert": str(data / "tls" / "server.pem"),
            "tls_key": str(data / "tls" / "server-key.pem"),
        },
        "devices": {"simulated": True, "simulated_interval_s": 3.0},
        # No camera on a developer's machine: libav's test pattern stands in for one.
        "video": {
            "exam_camera": [
                {
                    "name": "demo exam camera",
                    "device": "testsrc2=size=1280x720:rate=30",
                    "format": "lavfi",
                }
            ]
        },
    }
    if env.get("APPLIANCE_DEMO_UPSTREAM"):
        upstream = {"name": "ehr", "base_url": env["APPLIANCE_DEMO_UPSTREAM"], "auth": "none"}
        doc["sync"] = {"upstream": [upstream]}
    return parse(doc, source="<demo>", base_dir=Path.cwd(), environ=env)


def _shown(default: object) -> str:
    if isinstance(default, _Computed):
        return default.text
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "`true`" if default else "`false`"
    if default == ():
        return "`[]`"
    return f'`"{default}"`' if isinstance(default, str) else f"`{default}`"


def reference() -> str:
    """The key reference of ``docs/site-config.md`` (Markdown), rendered from the schema."""
    out: list[str] = []
    for schema, fields in _SCHEMA.items():
        arrays = ("sync.upstream", "claims.payer", "video.exam_camera", "video.ice_server")
        title = f"[[{schema}]]" if schema in arrays else f"[{schema}]"
        out += [f"### `{title}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += [
            f"| `{f.key}` | {f.type.describe} | {_shown(f.default)} | {f.help} |" for f in fields
        ]
        out.append("")
        if schema == "devices":
            out += _LINE_PROTOCOL_REFERENCE
    return "\n".join(out)


# [[devices.line_protocol]] is validated by drivers/line_protocol.py (from_mapping); its keys:
_LINE_PROTOCOL_REFERENCE = [
    "### `[[devices.line_protocol]]`",
    "",
    "A serial device that prints one result per line, added without code; register it with",
    "`appliance devices add ID --transport serial --profile line:<name> --address /dev/ttyUSB0`.",
    "",
    "| key | type | default | meaning |",
    "|---|---|---|---|",
    "| `name` | a non-empty string | required | Referred to as profile `line:<name>`. |",
    '| `delimiter` | a string (U+0000-U+00FF) | required | Ends each line, e.g. `"\\r\\n"` or ETX `"\\u0003"`. |',
    "| `start` | a string (U+0000-U+00FF) | unset | Begins each line (e.g. STX); bytes before it are skipped. |",
    '| `encoding` | a text encoding name | `"ascii"` | How the line\'s bytes become text. |',
    "| `max_line_length` | an integer 1-65536 | `256` | Longer lines are dropped whole and counted. |",
    "| `pattern` | a regular expression | required | Matches a whole line; each named group is a value. |",
    "| `fields.<group>` | a table | required per group | `loinc`, `unit` (UCUM), `display`, optional `scale` (e.g. 0.1). |",
    "",
]
