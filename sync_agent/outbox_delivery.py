"""Outbox delivery: pending rows → idempotent ``batch`` Bundles → per-item checkpoints.

Each outbox row's resource is sent as ``POST <Type>`` with
``ifNoneExist: identifier=urn:ietf:rfc:3986|urn:uuid:<logical id>``, so a resend after a
lost response finds the resource already there (200) instead of creating it twice (201).
Entries of a ``batch`` are independent: each gets its own outcome, a refused entry is
dead-lettered with the server's message and the rest land.

Entries carry no ``fullUrl``: batch entries do not reference each other, and a
``urn:uuid`` fullUrl equal to our identifier value gets rewritten by some servers (the
Medplum peer replaces it in every string of the Bundle, identifiers included), which would
break idempotency on the next resend.

References: a resource that points at ``Patient/<local id>`` or ``Device/<local id>``
(subject, patient, device) is sent pointing at that resource's upstream id, learnt when it
was delivered (its outbox row keeps the ``upstream_ref``). A batch therefore ends before the
first item whose Patient or Device is not delivered yet; that resource comes earlier in
outbox order, so it goes in this batch or the next (dependencies respected without a
transaction). A dead-lettered Device does not hold its readings back: they go without the
link, keeping the device's name.

Every answer is committed at once (delivered, dead, or retry-at), so a drain interrupted
anywhere resumes where it stopped; nothing is ever re-sent that the server acknowledged,
except when its answer was lost — and then the resend is harmless.
"""

from __future__ import annotations

import copy
import logging
import random
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from appliance import audit, db, fhir
from appliance.audit import AuditAction, AuditEvent, Outcome
from appliance.store import Store
from sync_agent.upstream import Failure, UpstreamError, outcome_text, post_bundle

logger = logging.getLogger(__name__)

ACTOR = "service:sync"
MAX_BACKOFF_S = 300.0
# References to our own resources that are rewritten to the upstream's ids on the way out.
_REFERENCE_FIELDS = ("subject", "patient", "device")
_LOCAL_TYPES = ("Patient/", "Device/")
_PENDING_SQL = (
    "SELECT o.id, o.lane, o.attempts, r.id, r.logical_id, r.type, r.key_version, r.body "
    "FROM outbox o JOIN resources r ON r.id = o.resource_id "
    "WHERE o.state = 'pending' AND o.kind = 'create' "
    "AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= ?) "
    "ORDER BY o.lane, o.id LIMIT ?"
)


@dataclass(frozen=True, slots=True)
class Item:
    """One pending outbox row with its decrypted resource."""

    outbox_id: int
    lane: int
    attempts: int
    logical_id: str
    type: str
    resource: fhir.FhirJson


@dataclass
class DrainResult:
    """What one drain did (figures for logs, /healthz and tests; no PHI)."""

    delivered: int = 0
    existing: int = 0
    dead: int = 0
    retry: int = 0
    ambiguous: int = 0
    bundles: int = 0
    error: str | None = None
    link_down: bool = False
    batch_size: int = 0
    failures: list[str] = field(default_factory=list)


def backoff_s(
    attempts: int, rng: random.Random, *, base: float = 2.0, cap: float = MAX_BACKOFF_S
) -> float:
    """Full-jitter exponential backoff: uniform(0, min(cap, base * 2**attempts))."""
    return rng.uniform(0, min(cap, base * (2 ** min(attempts, 20))))


def _iso(moment: datetime) -> str:
    return fhir.utc_text(moment)


class Deliverer:
    """Drains the outbox of one store to one upstream FHIR server."""

    def __init__(
        self,
        store: Store,
        client: httpx.AsyncClient,
        *,
        max_entries: int,
        rng: random.Random | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._client = client
        self._max_entries = max_entries
        self._batch_size = max_entries
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._clock = clock

    @property
    def batch_size(self) -> int:
        """The current bundle size (shrinks when the server says bundles are too large)."""
        return self._batch_size

    # -- reading the outbox ----------------------------------------------------------------

    def _load(self, conn: sqlite3.Connection, now: str, limit: int) -> list[Item]:
        rows = conn.execute(_PENDING_SQL, (now, limit)).fetchall()
        items = []
        for outbox_id, lane, attempts, *resource_row in rows:
            stored = self._store.decrypt_stored(conn, tuple(resource_row))
            items.append(
                Item(outbox_id, lane, attempts, stored.logical_id, stored.type, stored.resource)
            )
        return items

    @staticmethod
    def _upstream_refs(conn: sqlite3.Connection, logical_ids: set[str]) -> dict[str, str | None]:
        """Local logical id → upstream reference (None while not delivered)."""
        found: dict[str, str | None] = dict.fromkeys(logical_ids)
        for logical_id in logical_ids:
            row = conn.execute(
                "SELECT o.upstream_ref, o.state FROM resources r JOIN outbox o ON o.resource_id = r.id "
                "WHERE r.logical_id = ? ORDER BY o.id DESC LIMIT 1",
                (logical_id,),
            ).fetchone()
            if row is None:
                found[logical_id] = "absent"  # not a resource of ours: leave the reference as is
            elif row[1] == "delivered":
                found[logical_id] = row[0]
            elif row[1] == "dead":
                found[logical_id] = "dead"
        return found

    # -- building the bundle -------------------------------------------------------------

    @staticmethod
    def _local_refs(resource: fhir.FhirJson) -> dict[str, str]:
        """Reference field → the local logical id it points at (Patient or Device)."""
        found = {}
        for fieldname in _REFERENCE_FIELDS:
            value = resource.get(fieldname)
            ref = value.get("reference") if isinstance(value, dict) else None
            if isinstance(ref, str) and ref.startswith(_LOCAL_TYPES):
                found[fieldname] = ref.split("/", 1)[1]
        return found

    def _plan(
        self, conn: sqlite3.Connection, items: list[Item]
    ) -> tuple[list[tuple[Item, fhir.FhirJson]], list[Item]]:
        """Choose the items of this bundle (stopping at an undelivered dependency)."""
        wanted = {lid for item in items for lid in self._local_refs(item.resource).values()}
        refs = self._upstream_refs(conn, wanted)
        in_batch: set[str] = set()
        ready: list[tuple[Item, fhir.FhirJson]] = []
        blocked_dead: list[Item] = []
        for item in items:
            body = copy.deepcopy(item.resource)
            blocked = waits = False
            for fieldname, local_id in self._local_refs(body).items():
                target = refs.get(local_id)
                if target == "dead":
                    if fieldname == "device":
                        # The reading stands without its device: keep the name, drop the link.
                        body["device"] = {
                            k: v for k, v in body["device"].items() if k != "reference"
                        }
                        continue
                    blocked = True
                elif target is None or local_id in in_batch:
                    waits = True  # what it points at goes first, in this bundle or the next
                elif target != "absent":
                    body[fieldname] = {**body[fieldname], "reference": target}
            if waits:
                break
            if blocked:
                blocked_dead.append(item)
                continue
            # Server-owned meta goes; our tags (where/how a reading was captured) stay.
            meta = body.pop("meta", None)
            if isinstance(meta, dict) and meta.get("tag"):
                body["meta"] = {"tag": meta["tag"]}
            body.pop("id", None)
            ready.append((item, body))
            in_batch.add(item.logical_id)
        return ready, blocked_dead

    @staticmethod
    def _bundle(entries: list[tuple[Item, fhir.FhirJson]]) -> dict[str, Any]:
        return {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {
                    "resource": body,
                    "request": {
                        "method": "POST",
                        "url": item.type,
                        "ifNoneExist": f"identifier={fhir.IDENTIFIER_SYSTEM}|{fhir.identifier_value(item.logical_id)}",
                    },
                }
                for item, body in entries
            ],
        }

    # -- recording outcomes --------------------------------------------------------------

    def _record(
        self,
        conn: sqlite3.Connection,
        delivered: list[tuple[Item, str | None]],
        dead: list[tuple[Item, str]],
        retry: list[tuple[Item, str, float]],
        now: datetime,
    ) -> None:
        with db.transaction_sync(conn):
            conn.executemany(
                "UPDATE outbox SET state = 'delivered', upstream_ref = ?, delivered_at = ?, "
                "attempts = attempts + 1, last_error = NULL WHERE id = ? AND state = 'pending'",
                [(ref, _iso(now), item.outbox_id) for item, ref in delivered],
            )
            conn.executemany(
                "UPDATE outbox SET state = 'dead', last_error = ?, attempts = attempts + 1 "
                "WHERE id = ? AND state = 'pending'",
                [(self._seal(item, message), item.outbox_id) for item, message in dead],
            )
            conn.executemany(
                "UPDATE outbox SET last_error = ?, attempts = attempts + 1, next_attempt_at = ? "
                "WHERE id = ? AND state = 'pending'",
                [
                    (
                        self._seal(item, message),
                        _iso(now + timedelta(seconds=delay)),
                        item.outbox_id,
                    )
                    for item, message, delay in retry
                ],
            )
            events = []
            if delivered:
                types = sorted({item.type for item, _ in delivered})
                events.append(
                    AuditEvent(
                        ACTOR,
                        AuditAction.SYNC,
                        entity=f"{'+'.join(types)} x{len(delivered)}",
                        detail="delivered upstream",
                    )
                )
            if dead:
                events.append(
                    AuditEvent(
                        ACTOR,
                        AuditAction.SYNC,
                        outcome=Outcome.FAILURE,
                        entity=f"x{len(dead)}",
                        detail="refused upstream (dead letter)",
                    )
                )
            if events:
                audit.append(conn, events, now=now)

    def _seal(self, item: Item, message: str) -> bytes:
        # The server's diagnostics may quote what it refused (names, identifiers): PHI,
        # so the message is stored encrypted like the resource itself (see error_message).
        return self._store.keyring.seal("outbox", str(item.outbox_id), message)

    @staticmethod
    def _entry_ref(entry: dict[str, Any]) -> str | None:
        location = entry.get("response", {}).get("location")
        if isinstance(location, str) and location:
            parts = location.split("/_history")[0].split("/")
            if len(parts) >= 2:
                return f"{parts[-2]}/{parts[-1]}"
        resource = entry.get("resource")
        if isinstance(resource, dict) and resource.get("id"):
            return f"{resource['resourceType']}/{resource['id']}"
        return None

    # -- the drain -----------------------------------------------------------------------

    async def drain_once(self) -> DrainResult:
        """Send one bundle of due items; returns what happened. Never raises for the link."""
        result = DrainResult(batch_size=self._batch_size)
        now = self._clock()
        conn = self._store.connection
        items = await db.run_sync(conn, self._load, _iso(now), self._batch_size)
        if not items:
            return result
        ready, blocked_dead = await db.run_sync(conn, self._plan, items)
        dead: list[tuple[Item, str]] = [
            (i, "depends on a Patient the server refused") for i in blocked_dead
        ]
        if not ready:
            await db.run_sync(conn, self._record, [], dead, [], now)
            result.dead = len(dead)
            return result
        try:
            response = await post_bundle(self._client, self._bundle(ready))
        except UpstreamError as exc:
            return await self._on_bundle_failure(exc, ready, dead, now, result)
        result.bundles = 1
        delivered: list[tuple[Item, str | None]] = []
        retry: list[tuple[Item, str, float]] = []
        entries = response.get("entry", [])
        for index, (item, _body) in enumerate(ready):
            entry = entries[index] if index < len(entries) else {}
            status_text = str(entry.get("response", {}).get("status", ""))
            code = int(status_text.split()[0]) if status_text[:3].isdigit() else 0
            if 200 <= code < 300:
                delivered.append((item, self._entry_ref(entry)))
                result.existing += code == 200
            elif 400 <= code < 500 and code not in (408, 409, 429):
                message = outcome_text(entry.get("response", {}).get("outcome")) or f"HTTP {code}"
                dead.append((item, message))
            else:
                retry.append(
                    (item, f"entry HTTP {code or 'missing'}", backoff_s(item.attempts, self._rng))
                )
        await db.run_sync(conn, self._record, delivered, dead, retry, now)
        result.delivered, result.dead, result.retry = len(delivered), len(dead), len(retry)
        # A bundle that went through lets the size grow back towards the configured maximum.
        self._batch_size = min(self._max_entries, self._batch_size * 2)
        return result

    async def _on_bundle_failure(
        self,
        exc: UpstreamError,
        ready: list[tuple[Item, fhir.FhirJson]],
        dead: list[tuple[Item, str]],
        now: datetime,
        result: DrainResult,
    ) -> DrainResult:
        conn = self._store.connection
        result.error = str(exc)
        if exc.failure is Failure.TOO_LARGE and len(ready) > 1:
            self._batch_size = max(1, len(ready) // 2)
            logger.info(
                "upstream refused a bundle of %d as too large; now sending %d",
                len(ready),
                self._batch_size,
            )
            if dead:
                await db.run_sync(conn, self._record, [], dead, [], now)
            return result
        if exc.failure is Failure.PERMANENT and len(ready) > 1:
            # The whole bundle was refused: send one at a time to find the entry at fault.
            self._batch_size = 1
            if dead:
                await db.run_sync(conn, self._record, [], dead, [], now)
            return result
        if exc.failure in (Failure.PERMANENT, Failure.TOO_LARGE):
            dead.extend((item, exc.message) for item, _ in ready)
            await db.run_sync(conn, self._record, [], dead, [], now)
            result.dead = len(dead)
            return result
        # Transient or ambiguous: nothing is marked; the items are due again after a backoff.
        result.link_down = exc.failure is Failure.TRANSIENT
        result.ambiguous = len(ready) if exc.failure is Failure.AMBIGUOUS else 0
        attempts = max(item.attempts for item, _ in ready)
        delay = (
            exc.retry_after_s if exc.retry_after_s is not None else backoff_s(attempts, self._rng)
        )
        retry = [(item, exc.message, delay) for item, _ in ready]
        await db.run_sync(conn, self._record, [], dead, retry, now)
        result.retry = len(retry)
        result.dead = len(dead)
        return result

    async def drain(self, *, max_bundles: int = 1000) -> DrainResult:
        """Drain until nothing is due, the link fails, or ``max_bundles`` were sent."""
        total = DrainResult()
        for _ in range(max_bundles):
            step = await self.drain_once()
            total.delivered += step.delivered
            total.existing += step.existing
            total.dead += step.dead
            total.retry += step.retry
            total.ambiguous += step.ambiguous
            total.bundles += step.bundles
            total.batch_size = self._batch_size
            if step.error:
                total.error = step.error
                total.failures.append(step.error)
            idle = step.bundles == 0 and step.dead == 0 and step.error is None
            if idle or step.link_down or step.ambiguous:
                total.link_down = step.link_down
                break
        return total
