"""The site configuration: one TOML file, parsed once into frozen dataclasses.

One schema (the ``_FIELDS`` tables below) drives validation, defaults and the reference in
``docs/site-config.md``. Every problem is collected and reported at once with its dotted
path (``site.npi: ...``), borgmatic-style; unknown keys are errors too, because a typo in a
key name must not silently fall back to a default. Secrets never appear here: only the
paths of files that hold them.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from appliance.errors import ConfigError


class SiteType(StrEnum):
    """Kinds of originating site (they decide the claim form later)."""

    OFFICE = "office"
    HOSPITAL_OUTPATIENT = "hospital_outpatient"
    RHC = "rhc"
    FQHC = "fqhc"
    CAH = "cah"


class AuthKind(StrEnum):
    """How the box authenticates to an upstream."""

    NONE = "none"
    BEARER = "bearer"
    SMART = "smart"
    MTLS = "mtls"


@dataclass(frozen=True, slots=True)
class Address:
    """The site's postal address (billing provider address on claims)."""

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
    """Where data lives."""

    data_dir: Path
    database: Path
    backups: Path


@dataclass(frozen=True, slots=True)
class KeysConfig:
    """Where the key-encryption key is read from."""

    kek_file: Path


@dataclass(frozen=True, slots=True)
class WebConfig:
    """The web process's listener."""

    host: str
    port: int
    public_url: str
    tls_cert: Path | None
    tls_key: Path | None
    session_idle_timeout_s: int


@dataclass(frozen=True, slots=True)
class DevicesConfig:
    """The devices process."""

    simulated: bool
    simulated_interval_s: float


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One upstream FHIR server."""

    name: str
    base_url: str
    auth: AuthKind = AuthKind.NONE
    token_file: Path | None = None
    client_id: str | None = None
    token_url: str | None = None
    private_key_file: Path | None = None
    algorithm: str = "RS384"
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    ca_file: Path | None = None
    max_bundle_entries: int = 8
    timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class SyncConfig:
    """The sync process."""

    interval_s: float
    upstreams: tuple[UpstreamConfig, ...]


@dataclass(frozen=True, slots=True)
class Config:
    """The whole site configuration."""

    site: SiteConfig
    paths: PathsConfig
    keys: KeysConfig
    web: WebConfig
    devices: DevicesConfig
    sync: SyncConfig
    source: Path | None


def npi_is_valid(npi: str) -> bool:
    """NPI check digit: Luhn over the 9 digits with the 80840 prefix (CMS NPI standard)."""
    if not re.fullmatch(r"\d{10}", npi):
        return False
    total = 24  # the constant contribution of the "80840" prefix
    for index, char in enumerate(reversed(npi[:9])):
        digit = int(char)
        if index % 2 == 0:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return (10 - total % 10) % 10 == int(npi[9])


# --- the schema -------------------------------------------------------------------------

Check = Callable[[Any], Any]  # returns the normalised value or raises ValueError(message)


def _str(pattern: str | None = None, what: str = "text") -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"expected {what}, got {value!r}")
        if pattern is not None and not re.fullmatch(pattern, value):
            raise ValueError(f"{value!r} is not valid {what}")
        return value

    return check


def _int(low: int, high: int) -> Check:
    def check(value: Any) -> int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}, got {value!r}")
        return value

    return check


def _float(low: float, high: float) -> Check:
    def check(value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise ValueError(f"expected a number from {low} to {high}, got {value!r}")
        return float(value)

    return check


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _enum(kind: type[StrEnum]) -> Check:
    def check(value: Any) -> StrEnum:
        try:
            return kind(value)
        except ValueError:
            choices = ", ".join(m.value for m in kind)
            raise ValueError(f"unknown value {value!r}; expected one of {choices}") from None

    return check


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a file path, got {value!r}")
    return value


def _url(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


def _npi(value: Any) -> str:
    text = _str(r"\d{10}", "a 10-digit NPI")(value)
    if not npi_is_valid(text):
        raise ValueError(f"{text!r} fails the NPI check digit (Luhn with prefix 80840)")
    return text


def _ein(value: Any) -> str:
    text = _str(r"\d{2}-?\d{7}", "an EIN (12-3456789)")(value)
    return text.replace("-", "")


def _zone(value: Any) -> str:
    text = _str(None, "an IANA time zone")(value)
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{text!r} is not a known IANA time zone (e.g. America/Chicago)") from None
    return text


def _lines(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError("expected a list of one or more address lines")
    return tuple(value)


REQUIRED = object()
# section -> key -> (check, default). A default of REQUIRED means the key must be given;
# None means optional with no value.
_FIELDS: dict[str, dict[str, tuple[Check, Any]]] = {
    "site": {
        "id": (_str(r"[a-z0-9][a-z0-9-]{2,63}", "a site id (lowercase letters, digits, dashes; 3-64)"), REQUIRED),
        "name": (_str(), REQUIRED),
        "type": (_enum(SiteType), REQUIRED),
        "npi": (_npi, REQUIRED),
        "tax_id": (_ein, REQUIRED),
        "timezone": (_zone, REQUIRED),
        "rural": (_bool, False),
    },
    "site.address": {
        "lines": (_lines, REQUIRED),
        "city": (_str(), REQUIRED),
        "state": (_str(r"[A-Z]{2}", "a 2-letter USPS state code"), REQUIRED),
        "postal_code": (_str(r"\d{5}(-?\d{4})?", "a ZIP code (12345 or 12345-6789)"), REQUIRED),
    },
    "paths": {"data_dir": (_path, REQUIRED), "database": (_path, None), "backups": (_path, None)},
    "keys": {"kek_file": (_path, None)},
    "web": {
        "host": (_str(), "127.0.0.1"),
        "port": (_int(1, 65535), 8443),
        "public_url": (_url, None),
        "tls_cert": (_path, None),
        "tls_key": (_path, None),
        "session_idle_timeout_s": (_int(60, 86400), 900),
    },
    "devices": {"simulated": (_bool, False), "simulated_interval_s": (_float(0.05, 3600), 5.0)},
    "sync": {"interval_s": (_float(0.1, 3600), 5.0), "upstream": (lambda v: v, ())},
    "sync.upstream": {
        "name": (_str(r"[a-z0-9][a-z0-9_-]{0,31}", "an upstream name (lowercase, digits, - and _)"), REQUIRED),
        "base_url": (_url, REQUIRED),
        "auth": (_enum(AuthKind), AuthKind.NONE),
        "token_file": (_path, None),
        "client_id": (_str(), None),
        "token_url": (_url, None),
        "private_key_file": (_path, None),
        "algorithm": (_enum(StrEnum("Alg", {"RS384": "RS384", "ES384": "ES384"})), "RS384"),
        "client_cert_file": (_path, None),
        "client_key_file": (_path, None),
        "ca_file": (_path, None),
        "max_bundle_entries": (_int(1, 1000), 8),
        "timeout_s": (_float(1, 600), 30.0),
    },
}
_REQUIRED_BY_AUTH = {
    AuthKind.BEARER: ("token_file",),
    AuthKind.SMART: ("client_id", "token_url", "private_key_file"),
    AuthKind.MTLS: ("client_cert_file", "client_key_file"),
}
_ENV = {"APPLIANCE_WEB_PORT": ("web", "port"), "APPLIANCE_WEB_HOST": ("web", "host"), "APPLIANCE_DATA_DIR": ("paths", "data_dir")}


class _Reader:
    """Collects problems while reading sections against the schema."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def section(self, schema: str, where: str, raw: Any, *, nested: tuple[str, ...] = ()) -> dict[str, Any]:
        if not isinstance(raw, Mapping):
            self.problems.append(f"{where}: expected a table")
            raw = {}
        fields = _FIELDS[schema]
        for key in raw:
            if key not in fields and key not in nested:
                self.problems.append(f"{where}.{key}: unknown key")
        out: dict[str, Any] = {}
        for key, (check, default) in fields.items():
            if key not in raw:
                if default is REQUIRED:
                    self.problems.append(f"{where}.{key}: required")
                out[key] = None if default is REQUIRED else default
                continue
            try:
                out[key] = check(raw[key])
            except ValueError as exc:
                self.problems.append(f"{where}.{key}: {exc}")
                out[key] = None if default is REQUIRED else default
        return out


def _resolve(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def parse(
    data: Mapping[str, Any],
    *,
    source: str = "<config>",
    base_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Validate a parsed TOML document; raises :class:`ConfigError` listing every problem."""
    env = os.environ if environ is None else environ
    base = base_dir or Path.cwd()
    reader = _Reader()
    doc = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for name, (section, key) in _ENV.items():
        if name in env:
            doc.setdefault(section, {})
            if isinstance(doc[section], dict):
                doc[section][key] = env[name]
    for key in doc:
        if key not in ("site", "paths", "keys", "web", "devices", "sync"):
            reader.problems.append(f"{key}: unknown section")
    site = reader.section("site", "site", doc.get("site", {}), nested=("address",))
    address = reader.section("site.address", "site.address", (doc.get("site") or {}).get("address", {}) if isinstance(doc.get("site"), Mapping) else {})
    paths = reader.section("paths", "paths", doc.get("paths", {}))
    keys = reader.section("keys", "keys", doc.get("keys", {}))
    web = reader.section("web", "web", doc.get("web", {}))
    devices = reader.section("devices", "devices", doc.get("devices", {}))
    sync = reader.section("sync", "sync", doc.get("sync", {}))
    upstreams = []
    raw_upstreams = sync["upstream"]
    if not isinstance(raw_upstreams, list | tuple):
        reader.problems.append("sync.upstream: expected an array of tables ([[sync.upstream]])")
        raw_upstreams = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_upstreams):
        where = f"sync.upstream[{index}]"
        up = reader.section("sync.upstream", where, raw)
        if up["name"] in seen:
            reader.problems.append(f"{where}.name: {up['name']!r} is used by another upstream")
        seen.add(up["name"])
        for key in _REQUIRED_BY_AUTH.get(up["auth"], ()):
            if up[key] is None:
                reader.problems.append(f"{where}.{key}: required when auth = {up['auth'].value!r}")
        upstreams.append(up)
    if (web["tls_cert"] is None) != (web["tls_key"] is None):
        reader.problems.append("web.tls_cert: tls_cert and tls_key go together (give both or neither)")
    if reader.problems:
        raise ConfigError(reader.problems, source)

    data_dir = _resolve(base, paths["data_dir"])
    assert data_dir is not None
    if keys["kek_file"] is not None:
        kek = _resolve(base, keys["kek_file"])
    elif env.get("CREDENTIALS_DIRECTORY"):
        kek = Path(env["CREDENTIALS_DIRECTORY"]) / "kek"
    else:
        kek = data_dir / "keys" / "kek"
    assert kek is not None
    scheme = "https" if web["tls_cert"] else "http"
    return Config(
        site=SiteConfig(
            id=site["id"], name=site["name"], type=site["type"], npi=site["npi"], tax_id=site["tax_id"],
            timezone=site["timezone"], rural=site["rural"],
            address=Address(address["lines"], address["city"], address["state"], address["postal_code"]),
        ),
        paths=PathsConfig(
            data_dir=data_dir,
            database=_resolve(base, paths["database"]) or data_dir / "appliance.db",
            backups=_resolve(base, paths["backups"]) or data_dir / "backups",
        ),
        keys=KeysConfig(kek_file=kek),
        web=WebConfig(
            host=web["host"], port=web["port"],
            public_url=web["public_url"] or f"{scheme}://{web['host']}:{web['port']}",
            tls_cert=_resolve(base, web["tls_cert"]), tls_key=_resolve(base, web["tls_key"]),
            session_idle_timeout_s=web["session_idle_timeout_s"],
        ),
        devices=DevicesConfig(simulated=devices["simulated"], simulated_interval_s=devices["simulated_interval_s"]),
        sync=SyncConfig(
            interval_s=sync["interval_s"],
            upstreams=tuple(
                UpstreamConfig(
                    **{
                        k: (_resolve(base, v) if k.endswith("_file") else v)
                        for k, v in up.items()
                    }
                )
                for up in upstreams
            ),
        ),
        source=None if source.startswith("<") else Path(source),
    )


def load(path: Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the TOML file at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"file not found; create it from docs/site.example.toml or pass --config"], str(path)) from None
    except OSError as exc:
        raise ConfigError([f"cannot read the file ({exc.strerror})"], str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"malformed TOML: {exc}"], str(path)) from None
    return parse(data, source=str(path), base_dir=path.parent.resolve(), environ=environ)


# A synthetic site for demo mode; the NPI passes the check digit but belongs to nobody.
DEMO_SITE: dict[str, Any] = {
    "id": "demo-clinic",
    "name": "Demo Rural Health Clinic",
    "type": "rhc",
    "npi": "1234567893",
    "tax_id": "12-3456789",
    "timezone": "America/Chicago",
    "rural": True,
    "address": {"lines": ["100 Demo Road"], "city": "Pine Valley", "state": "TX", "postal_code": "79999"},
}


def demo_config(data_dir: Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """The embedded defaults of ``make run``: synthetic site, simulated cuff, dev TLS and keys."""
    env = os.environ if environ is None else environ
    data_dir = Path(env.get("APPLIANCE_DATA_DIR", data_dir)).resolve()
    doc: dict[str, Any] = {
        "site": DEMO_SITE,
        "paths": {"data_dir": str(data_dir)},
        "keys": {"kek_file": str(data_dir / "keys" / "kek")},
        "web": {
            "port": 8443,
            "tls_cert": str(data_dir / "tls" / "server.pem"),
            "tls_key": str(data_dir / "tls" / "server-key.pem"),
        },
        "devices": {"simulated": True, "simulated_interval_s": 3.0},
        "sync": {},
    }
    if env.get("APPLIANCE_DEMO_UPSTREAM"):
        doc["sync"] = {"upstream": [{"name": "ehr", "base_url": env["APPLIANCE_DEMO_UPSTREAM"]}]}
    if env.get("APPLIANCE_DEMO_INTERVAL"):
        doc["devices"]["simulated_interval_s"] = env["APPLIANCE_DEMO_INTERVAL"]
    if env.get("APPLIANCE_DEMO_NO_TLS"):
        del doc["web"]["tls_cert"], doc["web"]["tls_key"]
    return parse(doc, source="<demo>", base_dir=data_dir, environ={k: v for k, v in env.items() if k != "CREDENTIALS_DIRECTORY"})
