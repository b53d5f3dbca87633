"""The encrypted resource store: FHIR resources in, outbox rows and audit records alongside.

One write is one ``BEGIN IMMEDIATE`` transaction that inserts the encrypted resources, their
blind-index rows, one outbox row per resource and the audit record(s); it runs as a single
function on the connection's thread (one hop from the event loop), and the call returns only
after ``COMMIT`` — with ``synchronous=FULL`` that is the acknowledgement (DESIGN.md,
"Durability"). Every read of PHI appends an audit record before the data is returned.

Resources made on the box are append-only (DESIGN.md, "Data"). Two writes replace a
resource in place, each keeping the version it replaces (sealed, in ``resource_history``):
:meth:`Store.update`, a person's edit of demographics, which queues a version-checked update
(outbox ``kind='update'``, ``if_match`` = the upstream version it was based on); and
:meth:`Store.import_upstream`, a copy pulled from the upstream, which writes no outbox row and
never replaces a local edit still on its way up or waiting for a nurse's review.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import orjson

from appliance import audit, db, fhir
from appliance.audit import AuditAction, AuditEvent, Outcome
from appliance.errors import (
    ApplianceError,
    InvalidResourceError,
    NotFoundError,
    StoreError,
    TamperedDataError,
    WrongKeyError,
)
from appliance.keys import Keyring, ensure_keys, load_keyring, read_kek_file

logger = logging.getLogger(__name__)

TABLE = "resources"
Clock = Callable[[], datetime]
T = TypeVar("T")


class Lane(IntEnum):
    """Outbox lanes, delivered in this priority order (DESIGN.md, "Sync")."""

    ALERTS = 0
    CLAIMS = 1
    CLINICAL = 2
    AUDIT = 3


@dataclass(frozen=True, slots=True)
class StoredResource:
    """A decrypted resource with its local row id (for change feeds) and logical id."""

    row_id: int
    logical_id: str
    type: str
    resource: fhir.FhirJson


@dataclass(frozen=True, slots=True)
class Changes:
    """What :meth:`Store.changes_since` found: the readable resources, and how far it read.

    ``last_row_id`` is the caller's next cursor. It counts rows left out because their
    stored copy failed authentication, so one such row never stops a feed (the alert engine,
    the nurse screen) at itself.
    """

    resources: list[StoredResource]
    last_row_id: int
    scanned: int  # rows read, readable or not: ``limit`` of them means more may follow


@dataclass(frozen=True, slots=True)
class PatientPage:
    """One page of a patient's resources (:meth:`Store.patient_page`)."""

    resources: list[fhir.FhirJson]
    total: int  # every match, on every page
    more: bool  # whether a page follows this one
    left_out: int = 0  # rows of this page whose stored copy failed authentication
    last_read: str | None = None  # logical id of the page's last row, readable or not


@dataclass(frozen=True, slots=True)
class _Prepared:
    logical_id: str
    type: str
    patient_key: bytes | None
    code: str | None
    effective: str | None
    payload: bytes
    blind: tuple[tuple[str, bytes], ...]
    body: fhir.FhirJson


def _validate_all(resources: Sequence[Mapping[str, Any]]) -> None:
    for resource in resources:
        fhir.validate(resource)


def _utcnow() -> datetime:
    return datetime.now(UTC)


# -- upstream copies, local edits and their history (issue 5) ----------------------------

# Demographics belong to the upstream EHR (DESIGN.md, "Data"): the only resources a person
# edits in place. Everything else made here is append-only.
UPDATABLE_TYPES = frozenset({"Patient"})
HISTORY_LABEL = "resource_history"
# The audit detail of a row left out of a read because its stored copy failed authentication.
UNREADABLE_LEFT_OUT = "stored copy failed authentication; left out of the read"
# The audit detail of an upstream copy that replaced a stored copy failing authentication.
UNREADABLE_REPLACED = (
    "the stored copy failed authentication and was replaced (kept in unreadable_copies)"
)


class ReviewPendingError(StoreError):
    """A resource with a conflict waiting for a nurse's review cannot be edited meanwhile."""


class ChangedSinceReadError(ApplianceError):
    """An edit built on a copy that is no longer the stored one (the pull brought the EHR's
    newer version, or another edit landed, in between): nothing was written; read again."""


class ImportOutcome(StrEnum):
    """What :meth:`Store.import_upstream` did with one upstream copy."""

    CREATED = "created"
    UPDATED = "updated"
    CURRENT = "current"  # the local copy already is that upstream version
    HELD = "held"  # a local edit is on its way up or waiting for review: not overwritten
    OWN = "own"  # a resource this box made (append-only): never replaced by a copy of it
    INVALID = "invalid"  # refused by validation: not stored
    # Carries our identifier of a resource the upstream holds under another id (an EHR merge
    # or a copy of the record): not stored over that one, audited, for a person to look at.
    ELSEWHERE = "elsewhere"


@dataclass(frozen=True, slots=True)
class UpstreamCopy:
    """A resource as the upstream holds it: ``reference`` is ``<Type>/<upstream id>``."""

    reference: str
    version_id: str | None
    last_updated: str | None
    resource: fhir.FhirJson

    @property
    def type(self) -> str:
        """The resource type (the reference's first part)."""
        return self.reference.partition("/")[0]


@dataclass(frozen=True, slots=True)
class Imported:
    """The outcome of importing one upstream copy (no PHI: ids and versions only)."""

    reference: str
    outcome: ImportOutcome
    row_id: int | None
    logical_id: str | None
    version_id: str | None


@dataclass(frozen=True, slots=True)
class UpstreamLink:
    """Which upstream resource a local one is, and the upstream version it is based on."""

    resource_id: int
    upstream_ref: str
    version_id: str | None
    last_updated: str | None
    origin: str  # 'pulled' | 'delivered'
    stored: bool  # False: learnt from the outbox, not written to upstream_links yet


def queued_at(moment: datetime) -> int:
    """An outbox row's ``queued_at``: when it joined the queue, in Unix milliseconds."""
    return int(moment.timestamp() * 1000)


def oldest_waiting(conn: sqlite3.Connection) -> dict[int, datetime]:
    """When the item waiting longest in each lane joined the outbox (lanes with none left out).

    From ``queued_at`` (the index ``outbox_waiting``: one step per lane), not from the
    resource's UUIDv7: a waiting edit of an old Patient, or a dead letter sent again, joined
    the queue when it was queued, not when its record was made.
    """
    found = {}
    for lane in Lane:
        [ms] = conn.execute(
            "SELECT min(queued_at) FROM outbox WHERE state = 'pending' AND lane = ?", (int(lane),)
        ).fetchone()
        if ms is not None:
            found[int(lane)] = datetime.fromtimestamp(int(ms) / 1000, UTC)
    return found


def link_for_resource(conn: sqlite3.Connection, resource_id: int) -> UpstreamLink | None:
    """The upstream identity of a local resource: its link, else its delivered create."""
    row = conn.execute(
        "SELECT upstream_ref, version_id, last_updated, origin FROM upstream_links "
        "WHERE resource_id = ?",
        (resource_id,),
    ).fetchone()
    if row is not None:
        return UpstreamLink(resource_id, row[0], row[1], row[2], row[3], stored=True)
    row = conn.execute(
        "SELECT upstream_ref FROM outbox WHERE resource_id = ? AND kind = 'create' "
        "AND state = 'delivered' AND upstream_ref IS NOT NULL ORDER BY id LIMIT 1",
        (resource_id,),
    ).fetchone()
    if row is None:
        return None
    return UpstreamLink(resource_id, row[0], None, None, "delivered", stored=False)


def resource_for_upstream(conn: sqlite3.Connection, upstream_ref: str) -> tuple[int, str] | None:
    """``(row id, logical id)`` of the local resource that is ``upstream_ref``, if any."""
    row = conn.execute(
        "SELECT r.id, r.logical_id FROM upstream_links l JOIN resources r ON r.id = l.resource_id "
        "WHERE l.upstream_ref = ?",
        (upstream_ref,),
    ).fetchone()
    if row is None:
        row = conn.execute(
            "SELECT r.id, r.logical_id FROM outbox o JOIN resources r ON r.id = o.resource_id "
            "WHERE o.upstream_ref = ? AND o.kind = 'create' AND o.state = 'delivered' "
            "ORDER BY o.id LIMIT 1",
            (upstream_ref,),
        ).fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


def upstream_refs_of_pulled(conn: sqlite3.Connection, logical_ids: Iterable[str]) -> dict[str, str]:
    """Local logical id → upstream reference, for resources that came from the upstream.

    For the outbox deliverer: a local reading about a pulled Patient must point upstream at
    that Patient's upstream id, and a pulled resource has no create row to learn it from.
    """
    found: dict[str, str] = {}
    for logical_id in logical_ids:
        row = conn.execute(
            "SELECT l.upstream_ref FROM resources r JOIN upstream_links l ON l.resource_id = r.id "
            "WHERE r.logical_id = ?",
            (logical_id,),
        ).fetchone()
        if row is not None:
            found[logical_id] = str(row[0])
    return found


def save_link(
    conn: sqlite3.Connection,
    link: UpstreamLink,
    *,
    version_id: str | None,
    last_updated: str | None,
    now: str,
) -> None:
    """Record (or move) a local resource's upstream version (inside a write transaction)."""
    conn.execute(
        "INSERT INTO upstream_links (resource_id, upstream_ref, version_id, last_updated, origin, "
        "synced_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (resource_id) DO UPDATE SET "
        "upstream_ref = excluded.upstream_ref, version_id = excluded.version_id, "
        "last_updated = excluded.last_updated, synced_at = excluded.synced_at",
        (link.resource_id, link.upstream_ref, version_id, last_updated, link.origin, now),
    )


# A local edit the upstream refused (a dead letter) that no review has taken up and no later
# edit has followed: the upstream's copy must not silently replace it either (the pull opens
# a review instead). A later update row (pending, delivered or refused in its turn) carries
# the resource as it is now, so only the newest one counts.
REFUSED_EDIT_SQL = (
    "SELECT o.id, o.if_match FROM outbox o WHERE o.resource_id = ? AND o.kind = 'update' "
    "AND o.state = 'dead' AND NOT EXISTS (SELECT 1 FROM review_queue q "
    "WHERE q.resource_id = o.resource_id AND q.outbox_id >= o.id) "
    "AND NOT EXISTS (SELECT 1 FROM outbox l WHERE l.resource_id = o.resource_id "
    "AND l.kind = 'update' AND l.id > o.id) ORDER BY o.id DESC LIMIT 1"
)


def has_local_change(conn: sqlite3.Connection, resource_id: int) -> bool:
    """Whether a local edit of the resource is still to go up, is waiting for review, or was
    refused upstream and not yet decided (:data:`REFUSED_EDIT_SQL`)."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM outbox WHERE resource_id = ? AND kind = 'update' "  # noqa: S608 - constant
        "AND state = 'pending') OR EXISTS (SELECT 1 FROM review_queue WHERE resource_id = ? "
        f"AND state = 'open') OR EXISTS ({REFUSED_EDIT_SQL})",
        (resource_id, resource_id, resource_id),
    ).fetchone()
    return bool(row[0])


def _made_here(conn: sqlite3.Connection, resource_id: int) -> bool:
    """Whether the resource was made on this box (it has a create in the outbox)."""
    return (
        conn.execute(
            "SELECT 1 FROM outbox WHERE resource_id = ? AND kind = 'create' LIMIT 1",
            (resource_id,),
        ).fetchone()
        is not None
    )


def _ours_by_identifier(
    conn: sqlite3.Connection, resource: Mapping[str, Any]
) -> tuple[int, str] | None:
    """The local resource an upstream copy carries our identifier of (``urn:uuid:<id>``).

    Finds a resource made here whose create landed but whose answer was lost (so the outbox
    does not know its upstream id yet): it is that resource, not a new one.
    """
    identifiers = resource.get("identifier")
    for ident in identifiers if isinstance(identifiers, list) else []:  # not validated yet
        if not isinstance(ident, Mapping):
            continue
        value = ident.get("value")
        if ident.get("system") == fhir.IDENTIFIER_SYSTEM and isinstance(value, str):
            row = conn.execute(
                "SELECT id, logical_id FROM resources WHERE logical_id = ? AND type = ?",
                (value.removeprefix("urn:uuid:"), resource.get("resourceType")),
            ).fetchone()
            if row is not None:
                return int(row[0]), str(row[1])
    return None


def rewrite_references(value: Any, mapping: Callable[[str], str | None]) -> Any:
    """A copy of ``value`` with every ``reference`` that ``mapping`` knows replaced."""
    if isinstance(value, dict):
        out = {k: rewrite_references(v, mapping) for k, v in value.items()}
        ref = value.get("reference")
        if isinstance(ref, str):
            new = mapping(ref)
            if new is not None:
                out["reference"] = new
        return out
    if isinstance(value, list):
        return [rewrite_references(v, mapping) for v in value]
    return value


def _subject(body: Mapping[str, Any]) -> str | None:
    """The Patient a resource is about; for an Appointment, its first Patient participant."""
    ref = fhir.patient_reference(body)
    if ref is None and body.get("resourceType") == "Appointment":
        for participant in body.get("participant", []):
            actor = participant.get("actor") if isinstance(participant, Mapping) else None
            value = actor.get("reference") if isinstance(actor, Mapping) else None
            if isinstance(value, str) and value.startswith("Patient/"):
                return value
    return ref


class Store:
    """Encrypted FHIR store over one SQLite connection; one instance per process."""

    def __init__(
        self,
        conn: aiosqlite.Connection,
        keyring: Keyring,
        kek: bytes,
        *,
        path: Path | str = "database",
        clock: Clock = _utcnow,
        kek_path: Path | None = None,
    ) -> None:
        self._conn = conn
        self._keyring = keyring
        self._kek = kek
        self._kek_path = kek_path
        self._path = path
        self._clock = clock
        self._key_generation: str | None = None
        self._patient_keys: dict[str, bytes] = {}

    @classmethod
    async def open(cls, db_path: Path, kek_path: Path, *, clock: Clock = _utcnow) -> Store:
        """Open (creating and migrating if needed) the database and unwrap its keys."""
        from appliance.key_rotation import resolve_kek

        conn = await db.connect(db_path)
        try:
            kek = await db.run_sync(conn, resolve_kek, kek_path)
            await db.run_sync(conn, ensure_keys, kek)
            keyring = await db.run_sync(conn, load_keyring, kek, kek_path)
        except BaseException:
            await conn.close()
            raise
        return cls(conn, keyring, kek, path=db_path, clock=clock, kek_path=kek_path)

    @property
    def keyring(self) -> Keyring:
        """The keys this process loaded (blind index, signing keys).

        To seal or open a sealed column, :meth:`current_keyring`.
        """
        return self._keyring

    def current_keyring(self, conn: sqlite3.Connection) -> Keyring:
        """The keys to seal or open with, on the database thread (to seal: inside the write
        transaction on ``conn``).

        A data-key rotation committed by another process (``appliance keys rotate data``) is
        seen first. Sealing with the keys this process loaded at start would use a key the
        rotation is about to retire (the message unreadable for good once its wrapped bytes
        are destroyed); opening with them would fail on what the rotation re-sealed under
        the new key (a TOTP secret: no one could sign in until a restart).
        """
        self._check_key_generation(conn)
        return self._keyring

    @property
    def path(self) -> Path | None:
        """The database file (None for a store opened on a connection without one)."""
        return self._path if isinstance(self._path, Path) else None

    @property
    def connection(self) -> aiosqlite.Connection:
        """The underlying connection (for modules that share the store's transaction rules)."""
        return self._conn

    async def close(self) -> None:
        """Close the connection (the last write has already been committed)."""
        await self._conn.close()

    # -- writing -------------------------------------------------------------------------

    def _prepare(self, resource: Mapping[str, Any], now_ms: int, updated: str) -> _Prepared:
        body = dict(resource)
        rtype = str(body["resourceType"])
        logical_id = fhir.uuid7(now_ms)
        body["id"] = logical_id
        # Our identifier goes first: Medplum's in-memory search (the test peer) matches a
        # token only against the first identifier, and no server minds the order.
        identifiers = [
            {"system": fhir.IDENTIFIER_SYSTEM, "value": fhir.identifier_value(logical_id)},
            *body.get("identifier", []),
        ]
        body["identifier"] = identifiers
        body["meta"] = {**body.get("meta", {}), "lastUpdated": updated}
        ref = fhir.patient_reference(body)
        keyring = self._keyring
        blind: list[tuple[str, bytes]] = []
        if rtype == "Patient":
            birth = body.get("birthDate")
            for name in body.get("name", []):
                family = name.get("family")
                if isinstance(family, str) and isinstance(birth, str):
                    blind.append(("name_dob", keyring.name_birthdate_index(family, birth)))
            for ident in identifiers[1:]:
                if isinstance(ident.get("value"), str):
                    blind.append(
                        (
                            "identifier",
                            keyring.identifier_index(ident.get("system", ""), ident["value"]),
                        )
                    )
        return _Prepared(
            logical_id=logical_id,
            type=rtype,
            patient_key=None if ref is None else self._patient_key(ref),
            code=fhir.primary_code(body),
            effective=fhir.effective_utc(body),
            payload=orjson.dumps(body),
            blind=tuple(dict.fromkeys(blind)),
            body=body,
        )

    def _patient_key(self, reference: str) -> bytes:
        """Memoised: a clinic has hundreds of patients and each reading needs its key."""
        key = self._patient_keys.get(reference)
        if key is None:
            if len(self._patient_keys) > 50_000:
                self._patient_keys.clear()
            key = self._patient_keys[reference] = self._keyring.patient_key(reference)
        return key

    def _check_key_generation(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT value FROM meta WHERE key = 'key_generation'").fetchone()
        generation = None if row is None else str(row[0])
        if generation != self._key_generation:
            if self._key_generation is not None or generation is not None:
                self._keyring = self._reload_keys(conn)
            self._key_generation = generation

    def _reload_keys(self, conn: sqlite3.Connection) -> Keyring:
        """The keys as they are now; the KEK file read again when ``keys rotate kek`` has
        replaced it since this process started (no restart is asked for after either)."""
        try:
            return load_keyring(conn, self._kek)
        except WrongKeyError:
            if self._kek_path is None:
                raise
            kek = read_kek_file(self._kek_path)
            keyring = load_keyring(conn, kek, self._kek_path)
            self._kek = kek
            logger.info("key-encryption key rotated: the new one read from its file")
            return keyring

    def _write(
        self,
        conn: sqlite3.Connection,
        prepared: Sequence[_Prepared],
        lane: Lane,
        events: Sequence[AuditEvent],
        now: datetime,
        also: Callable[[sqlite3.Connection, list[int]], None] | None = None,
    ) -> list[int]:
        with db.transaction_sync(conn, self._path):
            # Inside the write lock: a key rotation committed by another process is seen
            # before we encrypt, so nothing new is written under a retiring key.
            self._check_key_generation(conn)
            keyring = self._keyring
            first = int(
                conn.execute("SELECT coalesce(max(id), 0) + 1 FROM resources").fetchone()[0]
            )
            ids = list(range(first, first + len(prepared)))
            rows = []
            for row_id, item in zip(ids, prepared, strict=True):
                version, blob = keyring.encrypt(TABLE, item.logical_id, item.payload)
                rows.append(
                    (
                        row_id,
                        item.logical_id,
                        item.type,
                        item.patient_key,
                        item.code,
                        item.effective,
                        version,
                        blob,
                    )
                )
            conn.executemany(
                "INSERT INTO resources (id, logical_id, type, patient_key, code, effective, "
                "key_version, body) VALUES (?,?,?,?,?,?,?,?)",
                rows,
            )
            joined = queued_at(now)
            conn.executemany(
                "INSERT INTO outbox (lane, resource_id, queued_at) VALUES (?, ?, ?)",
                [(int(lane), row_id, joined) for row_id in ids],
            )
            blind = [
                (kind, digest, row_id)
                for row_id, item in zip(ids, prepared, strict=True)
                for kind, digest in item.blind
            ]
            if blind:
                conn.executemany(
                    "INSERT OR IGNORE INTO blind_index (kind, digest, resource_id) VALUES (?,?,?)",
                    blind,
                )
            if also is not None:
                also(conn, ids)
            audit.append(conn, events, now=now)
        return ids

    async def create(
        self,
        resources: Sequence[Mapping[str, Any]],
        actor: str,
        *,
        lane: Lane = Lane.CLINICAL,
        validate: bool = True,
        audit_each: bool | None = None,
        also: Callable[[sqlite3.Connection, list[int]], None] | None = None,
    ) -> list[StoredResource]:
        """Validate, encrypt and store resources with their outbox rows, in one transaction.

        ``actor`` is ``user:<name>`` or ``service:<process>``. A person's writes are audited
        one record per resource; a service's (a device batch) with one record per batch
        (the issue allows it), unless ``audit_each`` says otherwise. Returns after COMMIT.
        ``validate=False`` is for builders whose every shape the test suite validates.
        ``also(conn, row_ids)`` runs inside the same transaction, for state that must commit
        with the resources or not at all (a glucose meter's last stored record number, a held
        reading marked assigned).
        """
        if not resources:
            return []
        if validate:
            # ~230 µs per resource in pydantic: off the event loop, so a batch from a hub
            # does not stall the nurse screens served by the same process.
            await asyncio.to_thread(_validate_all, resources)
        now = self._clock()
        now_ms, updated = int(now.timestamp() * 1000), now.isoformat()
        prepared = [self._prepare(r, now_ms, updated) for r in resources]
        per_resource = actor.startswith("user:") if audit_each is None else audit_each
        events = self._write_events(actor, prepared, per_resource)
        ids = await db.run_sync(self._conn, self._write, prepared, lane, events, now, also)
        return [
            StoredResource(row_id, item.logical_id, item.type, item.body)
            for row_id, item in zip(ids, prepared, strict=True)
        ]

    @staticmethod
    def _write_events(
        actor: str, prepared: Sequence[_Prepared], per_resource: bool
    ) -> list[AuditEvent]:
        if per_resource:
            return [
                AuditEvent(
                    actor,
                    AuditAction.CREATE,
                    patient_key=p.patient_key,
                    entity=f"{p.type}/{p.logical_id}",
                )
                for p in prepared
            ]
        patients = {p.patient_key for p in prepared}
        types = sorted({p.type for p in prepared})
        return [
            AuditEvent(
                actor,
                AuditAction.CREATE,
                patient_key=next(iter(patients)) if len(patients) == 1 else None,
                entity=f"{'+'.join(types)} x{len(prepared)}",
                detail=f"first {prepared[0].logical_id}",
            )
        ]

    async def transact(
        self, work: Callable[[sqlite3.Connection], T], events: Sequence[AuditEvent] = ()
    ) -> T:
        """Run ``work`` in one write transaction with its audit records (registry tables)."""

        def run(conn: sqlite3.Connection) -> T:
            with db.transaction_sync(conn, self._path):
                # ``work`` may seal with :attr:`keyring`: see a rotation first.
                self._check_key_generation(conn)
                result = work(conn)
                audit.append(conn, events, now=self._clock())
            return result

        return await db.run_sync(self._conn, run)

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A read of non-PHI registry tables (no audit record: nothing about a person)."""

        def run(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return [tuple(row) for row in conn.execute(sql, params).fetchall()]

        return await db.run_sync(self._conn, run)

    def patient_key(self, reference: str) -> bytes:
        """The pseudonymous key of ``Patient/<id>`` (for audit records about that patient)."""
        return self._patient_key(reference)

    def now(self) -> datetime:
        """The store's clock (timezone-aware UTC)."""
        return self._clock()

    # -- reading -------------------------------------------------------------------------

    def _plaintext(
        self, conn: sqlite3.Connection, logical_id: str, version: int, blob: bytes
    ) -> bytes:
        if version not in self._keyring.data_keys:
            # A rotation in another process made a key this process has not loaded yet.
            self._keyring = self._reload_keys(conn)
        return self._keyring.decrypt(TABLE, logical_id, version, blob)

    def _decrypt_row(self, conn: sqlite3.Connection, row: tuple[Any, ...]) -> StoredResource:
        row_id, logical_id, rtype, version, blob = row
        plaintext = self._plaintext(conn, logical_id, version, blob)
        return StoredResource(row_id, logical_id, rtype, orjson.loads(plaintext))

    def decrypt_readable(
        self,
        conn: sqlite3.Connection,
        rows: Iterable[tuple[Any, ...]],
        actor: str,
        events: list[AuditEvent],
    ) -> list[StoredResource]:
        """``(id, logical_id, type, key_version, body)`` rows decrypted, the unreadable left out.

        For reads that serve many patients at once (a feed, a batch of histories): a row whose
        stored copy fails authentication (altered or moved on disk, a bad sector) is logged by
        row id and gets a failure record in ``events`` (the caller appends them with its own
        audit records), instead of failing the read for everyone else.
        """
        found = []
        for row in rows:
            try:
                found.append(self._decrypt_row(conn, tuple(row)))
            except TamperedDataError:
                logger.error("resource row %s failed authentication; left out of the read", row[0])
                events.append(
                    AuditEvent(
                        actor,
                        AuditAction.READ,
                        outcome=Outcome.FAILURE,
                        entity=f"{row[2]}/{row[1]}",
                        detail=UNREADABLE_LEFT_OUT,
                    )
                )
        return found

    def _audited_read(
        self,
        conn: sqlite3.Connection,
        sql: str,
        params: Sequence[Any],
        event: AuditEvent | Callable[[list[StoredResource]], AuditEvent],
        leave_out_as: str | None = None,
    ) -> list[StoredResource]:
        """Rows decrypted, then the audit record (``event`` may name what was found).

        With ``leave_out_as`` (the actor), a list for a screen: a row that fails authentication
        is left out (:meth:`decrypt_readable`). Without it (a resource asked for by id, a
        match by identifier or name) it raises :class:`TamperedDataError`: there an empty
        answer would read as "not found".
        """
        rows = conn.execute(sql, params).fetchall()
        failures: list[AuditEvent] = []
        if leave_out_as is None:
            found = [self._decrypt_row(conn, row) for row in rows]
        else:
            found = self.decrypt_readable(conn, rows, leave_out_as, failures)
        record = event if isinstance(event, AuditEvent) else event(found)
        with db.transaction_sync(conn, self._path):
            audit.append(conn, [record, *failures], now=self._clock())
        return found

    async def read(self, rtype: str, logical_id: str, actor: str) -> fhir.FhirJson:
        """Read one resource by type and logical id (audited)."""
        event = AuditEvent(actor, AuditAction.READ, entity=f"{rtype}/{logical_id}")
        found = await db.run_sync(
            self._conn,
            self._audited_read,
            "SELECT id, logical_id, type, key_version, body FROM resources "
            "WHERE logical_id = ? AND type = ?",
            (logical_id, rtype),
            event,
        )
        if not found:
            raise NotFoundError(f"{rtype}/{logical_id} not found")
        return found[0].resource

    async def newest(
        self,
        patient_ref: str,
        rtype: str,
        actor: str,
        *,
        limit: int = 100,
        code: str | None = None,
    ) -> list[fhir.FhirJson]:
        """A patient's newest resources of one type (and ``system|code``), newest first.

        Audited as one search. The index is (patient key, type, effective), so a code filter
        walks back from the newest until enough match.
        """
        key = self._patient_key(patient_ref)
        event = AuditEvent(
            actor,
            AuditAction.SEARCH,
            patient_key=key,
            entity=f"{rtype}{'' if code is None else ' ' + code} newest {limit}",
        )
        where = "patient_key = ? AND type = ?" + ("" if code is None else " AND code = ?")
        params: tuple[object, ...] = (key, rtype) if code is None else (key, rtype, code)
        found = await db.run_sync(
            self._conn,
            self._audited_read,
            "SELECT id, logical_id, type, key_version, body FROM resources "  # noqa: S608 - fixed clauses
            f"WHERE {where} ORDER BY effective DESC LIMIT ?",
            (*params, limit),
            event,
            actor,
        )
        return [item.resource for item in found]

    async def patient_page(
        self,
        patient_ref: str,
        rtype: str,
        actor: str,
        *,
        limit: int,
        code: str | None = None,
        since: str | None = None,
        until: str | None = None,
        after: str | None = None,
    ) -> PatientPage:
        """One page of a patient's resources of one type, newest first (the FHIR read API).

        Only the plain index columns are filtered — the pseudonymous patient key and type
        (the index), ``code`` (``system|code`` of the first coding), the effective time as
        UTC text (``since`` inclusive, ``until`` exclusive; resources without one are left
        out when either is given) — so only the rows returned are decrypted. ``after`` is the
        logical id of the last resource of the previous page (keyset paging on effective time
        then row id: stable while new readings arrive; ``last_read`` is the next page's mark);
        one that is not among the patient's resources of this type raises
        :class:`NotFoundError`. ``total`` counts every match (an index count, nothing
        decrypted). A row whose stored copy fails authentication is left out and counted in
        ``left_out`` (:meth:`decrypt_readable`), so one damaged reading does not fail every
        search of that patient. Audited as one search naming every logical id returned, with
        the patient's key.
        """
        key = self._patient_key(patient_ref)
        where = ["patient_key = ?", "type = ?"]
        params: list[object] = [key, rtype]
        if code is not None:
            where.append("code = ?")
            params.append(code)
        if since is not None:
            where.append("effective >= ?")
            params.append(since)
        if until is not None:
            where.append("effective < ?")
            params.append(until)
        clause = " AND ".join(where)
        order = "coalesce(effective, '')"

        def work(conn: sqlite3.Connection) -> PatientPage:
            page_where, page_params = clause, list(params)
            if after is not None:
                mark = conn.execute(
                    f"SELECT {order}, id FROM resources WHERE patient_key = ? AND type = ? "  # noqa: S608 - fixed clauses
                    "AND logical_id = ?",
                    (key, rtype, after),
                ).fetchone()
                if mark is None:
                    raise NotFoundError(f"{rtype}/{after} is not a page mark of this search")
                page_where += f" AND ({order} < ? OR ({order} = ? AND id < ?))"
                page_params += [mark[0], mark[0], mark[1]]
            total = int(
                conn.execute(
                    f"SELECT count(*) FROM resources WHERE {clause}",  # noqa: S608 - fixed clauses
                    params,
                ).fetchone()[0]
            )
            rows = conn.execute(
                "SELECT id, logical_id, type, key_version, body FROM resources "  # noqa: S608 - fixed clauses
                f"WHERE {page_where} ORDER BY {order} DESC, id DESC LIMIT ?",
                (*page_params, limit + 1),
            ).fetchall()
            read = rows[:limit]
            failures: list[AuditEvent] = []
            found = self.decrypt_readable(conn, read, actor, failures)
            returned = ", ".join(r.logical_id for r in found) or "nothing"
            event = AuditEvent(
                actor,
                AuditAction.SEARCH,
                patient_key=key,
                entity=f"{rtype}{'' if code is None else ' ' + code} page x{len(found)}",
                detail=f"returned {rtype} {returned}",
            )
            with db.transaction_sync(conn, self._path):
                audit.append(conn, [event, *failures], now=self._clock())
            return PatientPage(
                [r.resource for r in found],
                total,
                len(rows) > limit,
                left_out=len(read) - len(found),
                last_read=str(read[-1][1]) if read else None,
            )

        return await db.run_sync(self._conn, work)

    async def changes_since(
        self, after_row_id: int, types: Iterable[str], actor: str, *, limit: int = 200
    ) -> Changes:
        """Resources committed after ``after_row_id`` (the nurse screen's feed, the alert engine).

        Audited as one search record per call that returns anything. A row whose stored copy
        fails authentication is left out (logged, with its own failure record) and the cursor
        moves past it: see :class:`Changes`.
        """
        wanted = tuple(types)
        marks = ",".join("?" * len(wanted))

        def work(conn: sqlite3.Connection) -> Changes:
            rows = conn.execute(
                f"SELECT id, logical_id, type, key_version, body FROM resources "  # noqa: S608 - placeholders only
                f"WHERE id > ? AND type IN ({marks}) ORDER BY id LIMIT ?",
                (after_row_id, *wanted, limit),
            ).fetchall()
            if not rows:
                return Changes([], after_row_id, 0)
            events: list[AuditEvent] = []
            found = self.decrypt_readable(conn, rows, actor, events)
            if found:
                events.insert(
                    0,
                    AuditEvent(
                        actor, AuditAction.SEARCH, entity=f"{'+'.join(wanted)} feed x{len(found)}"
                    ),
                )
            with db.transaction_sync(conn, self._path):
                audit.append(conn, events, now=self._clock())
            return Changes(found, int(rows[-1][0]), len(rows))

        return await db.run_sync(self._conn, work)

    async def last_row_id(self) -> int:
        """The newest resource row id (where a live feed starts)."""

        def work(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT coalesce(max(id), 0) FROM resources").fetchone()[0])

        return await db.run_sync(self._conn, work)

    async def find_patients(self, family: str, birth_date: str, actor: str) -> list[fhir.FhirJson]:
        """Patients whose family name + birth date match (blind index; audited)."""
        digest = self._keyring.name_birthdate_index(family, birth_date)
        return await self._find_by_blind("name_dob", digest, actor)

    async def find_by_identifier(self, system: str, value: str, actor: str) -> list[fhir.FhirJson]:
        """Patients carrying an identifier (blind index; audited)."""
        digest = self._keyring.identifier_index(system, value)
        return await self._find_by_blind("identifier", digest, actor)

    async def _find_by_blind(self, kind: str, digest: bytes, actor: str) -> list[fhir.FhirJson]:
        def event(found: list[StoredResource]) -> AuditEvent:
            # What the search returned, by logical id (never a name or an identifier).
            returned = ", ".join(f"{r.type}/{r.logical_id}" for r in found) or "nothing"
            return AuditEvent(
                actor,
                AuditAction.SEARCH,
                entity=f"Patient by {kind}",
                detail=f"returned {returned}",
            )

        found = await db.run_sync(
            self._conn,
            self._audited_read,
            "SELECT r.id, r.logical_id, r.type, r.key_version, r.body FROM blind_index b "
            "JOIN resources r ON r.id = b.resource_id WHERE b.kind = ? AND b.digest = ?",
            (kind, digest),
            event,
            # No leave_out_as: callers match and de-duplicate patients by this answer, so an
            # unreadable match must not read as "no such patient" (a second chart, a reading
            # filed to the other twin). It raises TamperedDataError instead.
        )
        return [item.resource for item in found]

    async def patients(self, actor: str) -> list[fhir.FhirJson]:
        """Every local Patient (small clinics: tens to hundreds), audited as one search."""
        event = AuditEvent(actor, AuditAction.SEARCH, entity="Patient all")
        found = await db.run_sync(
            self._conn,
            self._audited_read,
            "SELECT id, logical_id, type, key_version, body FROM resources WHERE type = 'Patient' ORDER BY id",
            (),
            event,
            actor,
        )
        return [item.resource for item in found]

    def decrypt_stored(self, conn: sqlite3.Connection, row: tuple[Any, ...]) -> StoredResource:
        """Decrypt a ``(id, logical_id, type, key_version, body)`` row on the DB thread.

        For the sync agent, which reads outbox items in its own transaction and audits the
        delivery as a ``sync`` access itself.
        """
        try:
            return self._decrypt_row(conn, row)
        except TamperedDataError:
            logger.error("resource row %s failed authentication", row[0])
            raise

    def decrypt_stored_json(self, conn: sqlite3.Connection, row: tuple[Any, ...]) -> bytes:
        """As :meth:`decrypt_stored`, but the resource's JSON bytes as stored, unparsed.

        For the sync agent's outbox drain, which sends most resources as they are stored.
        """
        _row_id, logical_id, _rtype, version, blob = row
        try:
            return self._plaintext(conn, logical_id, version, blob)
        except TamperedDataError:
            logger.error("resource row %s failed authentication", row[0])
            raise

    # -- replacing in place: a person's edit, an upstream copy (issue 5) -----------------

    def _patient_blind(self, body: Mapping[str, Any]) -> list[tuple[str, bytes]]:
        """The blind-index rows of a Patient (as :meth:`_prepare`; our own identifier skipped)."""
        if body.get("resourceType") != "Patient":
            return []
        keyring = self._keyring
        birth = body.get("birthDate")
        blind: list[tuple[str, bytes]] = []
        # Validated, but FHIR JSON may carry null for an absent list (a pulled copy).
        for name in body.get("name") or []:
            family = name.get("family")
            if isinstance(family, str) and isinstance(birth, str):
                blind.append(("name_dob", keyring.name_birthdate_index(family, birth)))
        for ident in body.get("identifier") or []:
            value = ident.get("value")
            if isinstance(value, str) and ident.get("system") != fhir.IDENTIFIER_SYSTEM:
                blind.append(
                    ("identifier", keyring.identifier_index(ident.get("system", ""), value))
                )
        return list(dict.fromkeys(blind))

    def _replace_row(
        self, conn: sqlite3.Connection, row_id: int, logical_id: str, body: fhir.FhirJson
    ) -> None:
        subject = _subject(body)
        version, blob = self._keyring.encrypt(TABLE, logical_id, orjson.dumps(body))
        conn.execute(
            "UPDATE resources SET patient_key = ?, code = ?, effective = ?, key_version = ?, "
            "body = ? WHERE id = ?",
            (
                None if subject is None else self._patient_key(subject),
                fhir.primary_code(body),
                fhir.effective_utc(body),
                version,
                blob,
                row_id,
            ),
        )
        conn.execute("DELETE FROM blind_index WHERE resource_id = ?", (row_id,))
        conn.executemany(
            "INSERT OR IGNORE INTO blind_index (kind, digest, resource_id) VALUES (?,?,?)",
            [(kind, digest, row_id) for kind, digest in self._patient_blind(body)],
        )

    def _keep_history(
        self,
        conn: sqlite3.Connection,
        current: StoredResource,
        actor: str,
        reason: str,
        stamp: str,
    ) -> None:
        """Seal the version about to be replaced into ``resource_history`` (nothing is lost)."""
        history_id = int(
            conn.execute("SELECT coalesce(max(id), 0) + 1 FROM resource_history").fetchone()[0]
        )
        sealed = self._keyring.seal(
            HISTORY_LABEL, str(history_id), orjson.dumps(current.resource).decode()
        )
        conn.execute(
            "INSERT INTO resource_history (id, resource_id, replaced_at, replaced_by, reason, "
            "body) VALUES (?, ?, ?, ?, ?, ?)",
            (history_id, current.row_id, stamp, actor, reason, sealed),
        )

    def _current(
        self, conn: sqlite3.Connection, where: str, params: Sequence[Any]
    ) -> StoredResource | None:
        row = conn.execute(
            f"SELECT id, logical_id, type, key_version, body FROM resources WHERE {where}",  # noqa: S608 - fixed clauses
            params,
        ).fetchone()
        return None if row is None else self._decrypt_row(conn, tuple(row))

    async def update(
        self,
        rtype: str,
        logical_id: str,
        resource: Mapping[str, Any],
        actor: str,
        *,
        lane: Lane = Lane.CLINICAL,
        based_on: Mapping[str, Any] | None = None,
    ) -> StoredResource:
        """A person's edit of demographics: the new version here, a version-checked update queued.

        ``based_on``: the copy the edit was made from (as :meth:`read` gave it). If the stored
        copy is another by now — the sync process pulled the EHR's newer version between the
        read and this write — nothing is written and :class:`ChangedSinceReadError` is raised:
        the ``If-Match`` would be the new version's, so the edit would silently undo the EHR's
        change, here and upstream. Callers that rebuild an edit from a fresh read pass it.

        Validates, then in one transaction: seals the version it replaces into
        ``resource_history``, writes the new one (blind indexes follow), and queues an outbox
        row ``kind='update'`` whose ``if_match`` is the upstream version the edit was based on
        (NULL while the upstream version is not known yet: a resource whose create has not
        landed, or whose version nobody read back). One pending update row per resource is
        enough, because the sender sends the resource as it is when it goes. Audited per
        resource. Refused (:class:`ReviewPendingError`) while a conflict waits for review.
        """
        if rtype not in UPDATABLE_TYPES:
            raise InvalidResourceError(
                f"{rtype}: resources of this type are append-only; only "
                f"{', '.join(sorted(UPDATABLE_TYPES))} can be edited"
            )
        if resource.get("resourceType") != rtype:
            raise InvalidResourceError(f"resourceType: expected {rtype}")
        await asyncio.to_thread(fhir.validate, resource)
        return await db.run_sync(
            self._conn,
            self._update,
            rtype,
            logical_id,
            resource,
            actor,
            lane,
            self._clock(),
            based_on,
        )

    def _update(
        self,
        conn: sqlite3.Connection,
        rtype: str,
        logical_id: str,
        resource: Mapping[str, Any],
        actor: str,
        lane: Lane,
        now: datetime,
        based_on: Mapping[str, Any] | None = None,
    ) -> StoredResource:
        with db.transaction_sync(conn, self._path):
            self._check_key_generation(conn)
            current = self._current(conn, "logical_id = ? AND type = ?", (logical_id, rtype))
            if current is None:
                raise NotFoundError(f"{rtype}/{logical_id} not found")
            if based_on is not None and current.resource != based_on:
                raise ChangedSinceReadError(
                    f"{rtype}/{logical_id} changed since it was read; read it again"
                )
            if conn.execute(
                "SELECT 1 FROM review_queue WHERE resource_id = ? AND state = 'open'",
                (current.row_id,),
            ).fetchone():
                raise ReviewPendingError(
                    f"{rtype}/{logical_id} has a change waiting for review; resolve it first"
                )
            body = copy.deepcopy(dict(resource))
            body["id"] = logical_id
            # Our own identifier (what makes its create idempotent upstream) stays, first.
            ours = {"system": fhir.IDENTIFIER_SYSTEM, "value": fhir.identifier_value(logical_id)}
            identifiers = [i for i in body.get("identifier", []) if i != ours]
            if ours in current.resource.get("identifier", []):
                identifiers.insert(0, ours)
            if identifiers:
                body["identifier"] = identifiers
            body["meta"] = {
                **current.resource.get("meta", {}),
                **body.get("meta", {}),
                "lastUpdated": now.isoformat(),
            }
            self._keep_history(conn, current, actor, "local-edit", fhir.utc_text(now))
            self._replace_row(conn, current.row_id, logical_id, body)
            pending = conn.execute(
                "SELECT 1 FROM outbox WHERE resource_id = ? AND kind = 'update' "
                "AND state = 'pending'",
                (current.row_id,),
            ).fetchone()
            if pending is None:
                link = link_for_resource(conn, current.row_id)
                conn.execute(
                    "INSERT INTO outbox (lane, resource_id, kind, if_match, queued_at) "
                    "VALUES (?, ?, 'update', ?, ?)",
                    (
                        int(lane),
                        current.row_id,
                        None if link is None else link.version_id,
                        queued_at(now),
                    ),
                )
            event = AuditEvent(
                actor,
                AuditAction.UPDATE,
                patient_key=self._patient_key(f"Patient/{logical_id}")
                if rtype == "Patient"
                else None,
                entity=f"{rtype}/{logical_id}",
                detail="local edit",
            )
            audit.append(conn, [event], now=now)
        return StoredResource(current.row_id, logical_id, rtype, body)

    async def import_upstream(
        self,
        copies: Sequence[UpstreamCopy],
        actor: str,
        *,
        tags: Sequence[Mapping[str, str]] = (),
        reason: str = "pulled",
        before: Callable[[sqlite3.Connection], None] | None = None,
        also: Callable[[sqlite3.Connection, list[Imported]], None] | None = None,
    ) -> list[Imported]:
        """Store copies of upstream resources, in one transaction, without outbox rows.

        Each copy is matched to a local resource by its upstream id only (its link, or the
        delivered create of a resource made here), never by content: a match is replaced in
        place (the old version kept in ``resource_history``) under the same logical id, else
        a new resource is made. A copy carrying our identifier of a resource made here is that
        resource (its create landed, the answer was lost) unless the upstream already holds
        that one under another id (``ELSEWHERE``: an EHR merge or a copy of the record; not
        stored, audited as a failure). Not replaced: a copy of the version already held
        (``CURRENT``), a resource with a local edit still to go up or under review (``HELD``:
        the version check upstream turns that into a review, never a silent overwrite), and a
        resource this box made other than demographics (``OWN``, append-only). References to
        upstream resources held here are rewritten to the local ids; others are kept.
        ``tags`` are added to each copy's ``meta.tag``. Audited per resource written (and
        held) as ``actor``. ``before(conn)`` and ``also(conn, outcomes)`` run inside the
        transaction (a review resolved, a pull cursor moved), so they commit with the copies.
        """
        unique = list({c.reference: c for c in copies}.values())
        invalid = await asyncio.to_thread(_invalid_copies, unique)
        return await db.run_sync(
            self._conn,
            self._import,
            unique,
            invalid,
            actor,
            tags,
            reason,
            before,
            also,
            self._clock(),
        )

    def _import(
        self,
        conn: sqlite3.Connection,
        copies: list[UpstreamCopy],
        invalid: set[int],
        actor: str,
        tags: Sequence[Mapping[str, str]],
        reason: str,
        before: Callable[[sqlite3.Connection], None] | None,
        also: Callable[[sqlite3.Connection, list[Imported]], None] | None,
        now: datetime,
    ) -> list[Imported]:
        stamp = fhir.utc_text(now)
        now_ms = int(now.timestamp() * 1000)
        with db.transaction_sync(conn, self._path):
            self._check_key_generation(conn)
            if before is not None:
                before(conn)
            # Every copy's local identity first, so references between them resolve.
            local: dict[str, tuple[int | None, str]] = {}
            elsewhere: dict[str, tuple[int, str]] = {}
            for item in copies:
                found = resource_for_upstream(conn, item.reference)
                if found is None:
                    found = _ours_by_identifier(conn, item.resource)
                    link = None if found is None else link_for_resource(conn, found[0])
                    if (
                        found is not None
                        and link is not None
                        and link.upstream_ref != item.reference
                    ):
                        # Not our create whose answer was lost: that one is known upstream
                        # by another id. Storing this copy would put another upstream
                        # record's content under that one's link.
                        elsewhere[item.reference] = found
                        continue
                local[item.reference] = found if found is not None else (None, fhir.uuid7(now_ms))

            def to_local(ref: str) -> str | None:
                rtype, _, rid = ref.partition("/")
                if not rtype.isalpha() or not rid or "/" in rid:
                    return None  # absolute, contained or versioned: left as it is
                # Not a record carrying our identifier under another upstream id: a merge
                # (the same person) or a copy (perhaps another person) looks alike from
                # here, so what points at it is not filed with ours until a person decides.
                found = local.get(ref) or resource_for_upstream(conn, ref)
                return None if found is None else f"{rtype}/{found[1]}"

            results: list[Imported] = []
            events: list[AuditEvent] = []
            for index, item in enumerate(copies):
                if item.reference in elsewhere:
                    ours_id, logical_id = elsewhere[item.reference]
                    results.append(
                        Imported(
                            item.reference,
                            ImportOutcome.ELSEWHERE,
                            ours_id,
                            logical_id,
                            item.version_id,
                        )
                    )
                    held_as = link_for_resource(conn, ours_id)
                    about = (
                        f"Patient/{logical_id}"
                        if item.type == "Patient"
                        else _subject(rewrite_references(item.resource, to_local))
                    )
                    events.append(
                        AuditEvent(
                            actor,
                            AuditAction.SYNC,
                            outcome=Outcome.FAILURE,
                            patient_key=None if about is None else self._patient_key(about),
                            entity=f"{item.type}/{logical_id}",
                            detail=f"{reason} {item.reference}: not stored, it carries this "
                            f"record's identifier, which the upstream holds as "
                            f"{held_as.upstream_ref if held_as else '?'} (merged there?)",
                        )
                    )
                    continue
                row_id, logical_id = local[item.reference]
                skip = ImportOutcome.INVALID if index in invalid else self._skip(conn, item, row_id)
                if skip is not None:
                    results.append(
                        Imported(
                            item.reference,
                            skip,
                            row_id,
                            None if row_id is None else logical_id,
                            item.version_id,
                        )
                    )
                    if skip is ImportOutcome.HELD:
                        events.append(
                            AuditEvent(
                                actor,
                                AuditAction.SYNC,
                                entity=f"{item.type}/{logical_id}",
                                detail=f"{reason} {item.reference}: held, a local edit is pending",
                            )
                        )
                    continue
                body = rewrite_references(item.resource, to_local)
                body["id"] = logical_id
                meta = dict(body.get("meta") or {})
                if tags:
                    known_tags = list(meta.get("tag", []))
                    meta["tag"] = known_tags + [dict(t) for t in tags if dict(t) not in known_tags]
                body["meta"] = meta
                if row_id is None:
                    cur = conn.execute(
                        "INSERT INTO resources (logical_id, type, key_version, body) "
                        "VALUES (?, ?, 0, x'')",
                        (logical_id, item.type),
                    )
                    row_id = int(cur.lastrowid or 0)
                    link = UpstreamLink(row_id, item.reference, None, None, "pulled", stored=False)
                    kind, action = ImportOutcome.CREATED, AuditAction.CREATE
                    healed = False
                else:
                    healed = not self._keep_replaced(conn, row_id, item, actor, reason, stamp)
                    link = link_for_resource(conn, row_id) or UpstreamLink(
                        row_id,
                        item.reference,
                        None,
                        None,
                        "delivered" if _made_here(conn, row_id) else "pulled",
                        stored=False,
                    )
                    kind, action = ImportOutcome.UPDATED, AuditAction.UPDATE
                self._replace_row(conn, row_id, logical_id, body)
                save_link(
                    conn,
                    link,
                    version_id=item.version_id,
                    last_updated=item.last_updated,
                    now=stamp,
                )
                subject = _subject(body)
                events.append(
                    AuditEvent(
                        actor,
                        action,
                        patient_key=None if subject is None else self._patient_key(subject),
                        entity=f"{item.type}/{logical_id}",
                        detail=f"{reason} {item.reference}"
                        + (f"; {UNREADABLE_REPLACED}" if healed else ""),
                    )
                )
                results.append(Imported(item.reference, kind, row_id, logical_id, item.version_id))
            if also is not None:
                also(conn, results)
            audit.append(conn, events, now=now)
        return results

    def _keep_replaced(
        self,
        conn: sqlite3.Connection,
        row_id: int,
        item: UpstreamCopy,
        actor: str,
        reason: str,
        stamp: str,
    ) -> bool:
        """Keep the version an upstream copy replaces; False when it did not authenticate.

        A readable version goes into ``resource_history``. One that fails authentication
        (altered or moved on disk, a bad sector) cannot be read, but the upstream copy is an
        authenticated one of the same resource: it takes its place, so the pull and what
        queues behind it go on, and the unreadable bytes are kept as found in
        ``unreadable_copies`` for whoever investigates. The caller audits it.
        """
        try:
            current = self._current(conn, "id = ?", (row_id,))
        except TamperedDataError:
            conn.execute(
                "INSERT INTO unreadable_copies (resource_id, key_version, body, found_at, "
                "replaced_by) SELECT id, key_version, body, ?, ? FROM resources WHERE id = ?",
                (stamp, item.reference, row_id),
            )
            logger.error(
                "resource row %s failed authentication; replaced by the upstream's copy, "
                "the unreadable bytes kept in unreadable_copies",
                row_id,
            )
            return False
        assert current is not None  # found a moment ago, in this transaction
        self._keep_history(conn, current, actor, reason, stamp)
        return True

    @staticmethod
    def _skip(
        conn: sqlite3.Connection, item: UpstreamCopy, row_id: int | None
    ) -> ImportOutcome | None:
        """Why an upstream copy must not replace the local resource it matches (None: it may)."""
        if row_id is None:
            return None
        if item.type not in UPDATABLE_TYPES and _made_here(conn, row_id):
            return ImportOutcome.OWN
        link = link_for_resource(conn, row_id)
        if (
            link is not None
            and link.stored
            and item.version_id is not None
            and link.version_id == item.version_id
        ):
            return ImportOutcome.CURRENT
        if has_local_change(conn, row_id):
            return ImportOutcome.HELD
        return None

    async def history(self, rtype: str, logical_id: str, actor: str) -> list[fhir.FhirJson]:
        """The versions a resource had before it was replaced in place, oldest first (audited)."""

        def work(conn: sqlite3.Connection) -> list[tuple[int, bytes]] | None:
            row = conn.execute(
                "SELECT id FROM resources WHERE logical_id = ? AND type = ?", (logical_id, rtype)
            ).fetchone()
            if row is None:
                return None
            rows = conn.execute(
                "SELECT id, body FROM resource_history WHERE resource_id = ? ORDER BY id",
                (row[0],),
            ).fetchall()
            with db.transaction_sync(conn, self._path):
                self._check_key_generation(conn)  # a rotation seen before opening
                audit.append(
                    conn,
                    [AuditEvent(actor, AuditAction.READ, entity=f"{rtype}/{logical_id} history")],
                    now=self._clock(),
                )
            return [(int(i), bytes(b)) for i, b in rows]

        found = await db.run_sync(self._conn, work)
        if found is None:
            raise NotFoundError(f"{rtype}/{logical_id} not found")
        keyring = self._keyring
        return [orjson.loads(keyring.unseal(HISTORY_LABEL, str(i), sealed)) for i, sealed in found]

    async def upstream_link(self, rtype: str, logical_id: str) -> UpstreamLink | None:
        """Which upstream resource (and version) a local one is; None if not known upstream."""

        def work(conn: sqlite3.Connection) -> UpstreamLink | None:
            row = conn.execute(
                "SELECT id FROM resources WHERE logical_id = ? AND type = ?", (logical_id, rtype)
            ).fetchone()
            return None if row is None else link_for_resource(conn, int(row[0]))

        return await db.run_sync(self._conn, work)


def _invalid_copies(copies: Sequence[UpstreamCopy]) -> set[int]:
    """Indexes of copies that fail FHIR validation (they are skipped, never half-stored)."""
    invalid = set()
    for index, item in enumerate(copies):
        try:
            fhir.validate(item.resource)
        except InvalidResourceError:
            invalid.add(index)
    return invalid
