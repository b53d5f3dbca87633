"""API keys: device vendors posting readings (``web/ingest.py``) and local read integrations.

A key has one scope (migration 0015): ``ingest``, a device vendor's hub posting readings to
the ingest endpoint (the default, and every key issued before scopes existed), or ``read``,
a local integration (the clinic's own scripts, a local EHR interface) reading and searching
the local FHIR API (``web/fhir_api.py``, ``docs/fhir-api.md``). An ingest key cannot read and
a read key cannot post readings; the web layer refuses either with 403.

One key per vendor, made by ``appliance vendors add VENDOR`` and shown once: 32 random bytes,
URL-safe base64, behind the prefix ``thv_`` so a leaked key is recognisable in a scanner's
report. Only its SHA-256 is stored (``vendor_keys.key_hash``, migration 0005): a key has
256 bits of entropy, so a fast hash is enough — there is nothing to brute-force, unlike a
password. A presented key is hashed and compared with every stored hash in constant time
(:func:`hmac.compare_digest`, and no early exit), so the answer's timing says nothing about
which vendor, or how much of a hash, matched. A disabled key is refused like an unknown one.

A vendor name is the actor of everything the vendor writes (``vendor:<name>`` in the audit
trail) and the code of the vendor tag on its readings, so it is short, lower-case and
carries no patient data. Every change here is audited as configuration.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from appliance import fhir
from appliance.audit import AuditAction, AuditEvent
from appliance.errors import ApplianceError, NotFoundError
from appliance.store import Store

KEY_PREFIX = "thv_"
KEY_BYTES = 32
_VENDOR_NAME = re.compile(r"[a-z0-9][a-z0-9-]{1,39}")

TokenSource = Callable[[int], str]


class KeyScope(StrEnum):
    """What a key may do (persisted as its value in ``vendor_keys.scope``)."""

    INGEST = "ingest"  # post readings: POST /fhir/Observation, POST /fhir
    READ = "read"  # read and search under /fhir/


class VendorKeyError(ApplianceError):
    """A vendor key cannot be issued or changed (bad name, vendor already has a key)."""


@dataclass(frozen=True, slots=True)
class VendorKey:
    """A vendor's key as listed (never the key itself: only its hash is kept)."""

    vendor: str
    created_at: str
    created_by: str
    disabled_at: str | None
    scope: KeyScope = KeyScope.INGEST

    @property
    def active(self) -> bool:
        """Whether the key is accepted."""
        return self.disabled_at is None


@dataclass(frozen=True, slots=True)
class KeyCheck:
    """Whose key a presented one is; ``vendor`` None when it matches no stored key."""

    vendor: str | None
    active: bool
    scope: KeyScope = KeyScope.INGEST


def check_vendor_name(vendor: str) -> str:
    """``vendor`` if it is a valid vendor name, else :class:`VendorKeyError`."""
    if not _VENDOR_NAME.fullmatch(vendor):
        raise VendorKeyError(
            "a vendor name is 2-40 characters: lower-case letters, digits and '-', "
            "starting with a letter or digit"
        )
    return vendor


def generate_key(token: TokenSource = secrets.token_urlsafe) -> str:
    """A new API key (``token`` is the randomness, a parameter for tests)."""
    return KEY_PREFIX + token(KEY_BYTES)


def key_hash(key: str) -> bytes:
    """What is stored of a key: its SHA-256."""
    return hashlib.sha256(key.encode()).digest()


def match_key(presented: str, stored: list[tuple[str, bytes, str | None, str]]) -> KeyCheck:
    """Which of ``(vendor, key_hash, disabled_at, scope)`` rows ``presented`` is, in constant time.

    Every row is compared (no early exit) so the time taken does not depend on which row,
    if any, matched.
    """
    digest = key_hash(presented)
    found: KeyCheck = KeyCheck(None, False)
    for vendor, stored_hash, disabled_at, scope in stored:
        if hmac.compare_digest(digest, stored_hash):
            found = KeyCheck(vendor, disabled_at is None, KeyScope(scope))
    return found


class VendorKeys:
    """The ``vendor_keys`` table: issue, list, disable and check keys."""

    def __init__(self, store: Store, *, token: TokenSource = secrets.token_urlsafe) -> None:
        self._store = store
        self._token = token

    async def add(
        self,
        vendor: str,
        actor: str,
        *,
        replace: bool = False,
        scope: KeyScope | None = None,
    ) -> str:
        """Issue a key for ``vendor`` and return it (it is not stored: show it once).

        A vendor that already has a key keeps it unless ``replace``: then the new key
        replaces the old one at once (and re-enables a disabled vendor). ``scope`` is what
        the key may do: a new key is ``ingest`` unless told; a replaced one keeps its scope
        unless told.
        """
        check_vendor_name(vendor)
        given = None if scope is None else KeyScope(scope).value
        key = generate_key(self._token)
        now = fhir.utc_text(self._store.now())

        def work(conn: sqlite3.Connection) -> None:
            exists = conn.execute(
                "SELECT 1 FROM vendor_keys WHERE vendor = ?", (vendor,)
            ).fetchone()
            if exists and not replace:
                raise VendorKeyError(
                    f"vendor {vendor!r} already has a key; --replace issues a new one "
                    "(the old one stops working at once)"
                )
            conn.execute(
                "INSERT INTO vendor_keys (vendor, key_hash, created_at, created_by, scope) "
                "VALUES (?, ?, ?, ?, coalesce(?, 'ingest')) ON CONFLICT (vendor) DO UPDATE SET "
                "key_hash = excluded.key_hash, created_at = excluded.created_at, "
                "created_by = excluded.created_by, disabled_at = NULL, "
                "scope = coalesce(?, vendor_keys.scope)",
                (vendor, key_hash(key), now, actor, given, given),
            )

        detail = "key replaced" if replace else "key issued"
        if given is not None:
            detail += f", scope {given}"
        event = AuditEvent(actor, AuditAction.CONFIG, entity=f"vendor/{vendor}", detail=detail)
        await self._store.transact(work, [event])
        return key

    async def disable(self, vendor: str, actor: str) -> None:
        """Stop accepting ``vendor``'s key (kept, so the audit trail's actor stays known)."""
        now = fhir.utc_text(self._store.now())

        def work(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE vendor_keys SET disabled_at = coalesce(disabled_at, ?) WHERE vendor = ?",
                (now, vendor),
            )
            if cur.rowcount != 1:
                raise NotFoundError(f"no vendor {vendor!r} has a key")

        event = AuditEvent(actor, AuditAction.CONFIG, entity=f"vendor/{vendor}", detail="disabled")
        await self._store.transact(work, [event])

    async def vendors(self) -> list[VendorKey]:
        """Every vendor with a key, by name."""
        rows = await self._store.query(
            "SELECT vendor, created_at, created_by, disabled_at, scope FROM vendor_keys "
            "ORDER BY vendor"
        )
        return [VendorKey(v, c, b, d, KeyScope(s)) for v, c, b, d, s in rows]

    async def check(self, presented: str) -> KeyCheck:
        """Whose key ``presented`` is (constant-time comparison against every stored hash)."""
        rows = await self._store.query(
            "SELECT vendor, key_hash, disabled_at, scope FROM vendor_keys"
        )
        return match_key(presented, [(str(v), bytes(h), d, str(s)) for v, h, d, s in rows])
