"""The encrypted resource store: FHIR resources in, outbox rows and audit records alongside.

One write is one ``BEGIN IMMEDIATE`` transaction that inserts the encrypted resources, their
blind-index rows, one outbox row per resource and the audit record(s); it runs as a single
function on the connection's thread (one hop from the event loop), and the call returns only
after ``COMMIT`` — with ``synchronous=FULL`` that is the acknowledgement (DESIGN.md,
"Durability"). Every read of PHI appends an audit record before the data is returned.

Resources made on the box are append-only (DESIGN.md, "Data"); updates of upstream-owned
demographics arrive with the sync issue.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import orjson

from appliance import audit, db, fhir
from appliance.audit import AuditAction, AuditEvent
from appliance.errors import NotFoundError, TamperedDataError
from appliance.keys import Keyring, ensure_keys, load_keyring

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
    ) -> None:
        self._conn = conn
        self._keyring = keyring
        self._kek = kek
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
        return cls(conn, keyring, kek, path=db_path, clock=clock)

    @property
    def keyring(self) -> Keyring:
        """The keys this process holds."""
        return self._keyring

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
                self._keyring = load_keyring(conn, self._kek)
            self._key_generation = generation

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
            conn.executemany(
                "INSERT INTO outbox (lane, resource_id) VALUES (?, ?)",
                [(int(lane), row_id) for row_id in ids],
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

    def _decrypt_row(self, conn: sqlite3.Connection, row: tuple[Any, ...]) -> StoredResource:
        row_id, logical_id, rtype, version, blob = row
        if version not in self._keyring.data_keys:
            # A rotation in another process made a key this process has not loaded yet.
            self._keyring = load_keyring(conn, self._kek)
        plaintext = self._keyring.decrypt(TABLE, logical_id, version, blob)
        return StoredResource(row_id, logical_id, rtype, orjson.loads(plaintext))

    def _audited_read(
        self, conn: sqlite3.Connection, sql: str, params: Sequence[Any], event: AuditEvent
    ) -> list[StoredResource]:
        rows = conn.execute(sql, params).fetchall()
        found = [self._decrypt_row(conn, row) for row in rows]
        with db.transaction_sync(conn, self._path):
            audit.append(conn, [event], now=self._clock())
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
        )
        return [item.resource for item in found]

    async def changes_since(
        self, after_row_id: int, types: Iterable[str], actor: str, *, limit: int = 200
    ) -> list[StoredResource]:
        """Resources committed after ``after_row_id`` (the live feed of the nurse screen).

        Audited as one search record per call that returns anything.
        """
        wanted = tuple(types)
        marks = ",".join("?" * len(wanted))

        def work(conn: sqlite3.Connection) -> list[StoredResource]:
            rows = conn.execute(
                f"SELECT id, logical_id, type, key_version, body FROM resources "  # noqa: S608 - placeholders only
                f"WHERE id > ? AND type IN ({marks}) ORDER BY id LIMIT ?",
                (after_row_id, *wanted, limit),
            ).fetchall()
            if not rows:
                return []
            found = [self._decrypt_row(conn, row) for row in rows]
            with db.transaction_sync(conn, self._path):
                audit.append(
                    conn,
                    [
                        AuditEvent(
                            actor,
                            AuditAction.SEARCH,
                            entity=f"{'+'.join(wanted)} feed x{len(found)}",
                        )
                    ],
                    now=self._clock(),
                )
            return found

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
        event = AuditEvent(actor, AuditAction.SEARCH, entity=f"Patient by {kind}")
        found = await db.run_sync(
            self._conn,
            self._audited_read,
            "SELECT r.id, r.logical_id, r.type, r.key_version, r.body FROM blind_index b "
            "JOIN resources r ON r.id = b.resource_id WHERE b.kind = ? AND b.digest = ?",
            (kind, digest),
            event,
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
