"""The claims lifecycle over the store: submission intents, answers, 999/277CA/835, review.

Never submitted twice (docs/adr/0006-claims.md, "Lifecycle"): before a request goes out,
:meth:`Lifecycle.take_batch` writes the **intent** in one transaction — the batch row (state
``sending``, control numbers), its items, and ``claims.sending_batch`` on each claim, which
keeps the claim out of every later batch. The answer then settles it, each in one
transaction: a clear 2xx → ``submitted`` (:meth:`sent`); nothing was taken (no connection,
or turned away unread) → still ``ready`` (:meth:`not_sent`); a clear refusal → ``rejected``
(:meth:`refused`); anything that may have landed without a clear answer → ``in_review``
(:meth:`ambiguous`), and :meth:`recover` does the same for intents older than any request
can take (a crash, a kill), leaving younger ones to the process that may be sending them. An
answer that comes for a batch recovered anyway is recorded, not refused. Only a person
moves a claim out of ``in_review`` (:meth:`resolve`), or an answer that turns up for it.

Acknowledgement and remittance files (:mod:`.acks`) are applied by :meth:`apply_response`:
parsed completely first (a malformed file changes nothing), then applied in one transaction
with the file's row, whose digest makes a second import of the same file a no-op.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from appliance import db, fhir
from appliance.audit import AuditAction, AuditEvent
from appliance.errors import NotFoundError
from appliance.store import Store
from services.claims import acks
from services.claims.fhir_claim import from_fhir
from services.claims.model import TRANSITIONS, ClaimStatus, Form, money
from services.claims.service import BUILD_ERRORS, ClaimRow, ClaimsError, ClaimsService, _take
from services.claims.x12 import interchange

ACTOR = "service:claims-submit"
_S = ClaimStatus
RESOLVE_TO = {"acknowledged": _S.ACKNOWLEDGED, "ready": _S.READY}
# ``meta`` key of the response files the poll could not apply (a JSON list, newest last, at
# most UNREADABLE_KEPT). The file itself is not kept (it may hold PHI): the clearinghouse's id
# for it, to download it again from its portal, what is wrong with it, when, its digest.
UNREADABLE_KEY = "claims.unreadable_responses"
UNREADABLE_KEPT = 50
UNREADABLE_CLEARED_DETAIL = "unreadable claims response files: list cleared"
_KINDS = ("999", "277CA", "835")


class _Unbuildable(ClaimsError):
    """Claims of a batch that cannot be made into a submission even alone (rolls back the
    intent; :meth:`Lifecycle.take_batch` holds them back and goes on without them)."""

    def __init__(self, failed: dict[int, str]) -> None:
        super().__init__(f"{len(failed)} claim(s) could not be made into a submission")
        self.failed = failed


@dataclass(frozen=True, slots=True)
class Batch:
    """A submission intent, written: what to send and which claims it carries."""

    id: int
    kind: str  # "x12" | "fhir"
    claim_ids: tuple[int, ...]
    claim_numbers: tuple[str, ...]
    interchange_control: int
    payload: bytes  # the X12 interchange, or the FHIR Claim's JSON
    identifier: str | None = None  # FHIR: the Claim's identifier (conditional create)


@dataclass(frozen=True, slots=True)
class Applied:
    """What one acknowledgement or remittance file did."""

    kind: str
    control: str
    duplicate: bool
    moved: int
    ignored: int
    summary: str


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A response file the poll could not apply (no PHI: ids, a kind, our words)."""

    source_id: str  # the clearinghouse's id for the file ("?" when it gave none)
    kind: str  # what the clearinghouse said it is: '999', '277CA', '835' or '?'
    error: str  # what is wrong: our words (segment positions, counts, our claim number)
    at: str  # when the poll met it first (UTC text)
    digest: str  # SHA-256 of the file, as claim_responses keeps for the files applied


@dataclass(frozen=True, slots=True)
class Event:
    """One line of a claim's history: a state move, or a message from outside."""

    at: str
    actor: str
    from_status: str | None
    to_status: str | None
    detail: str | None
    source: str | None = None  # messages: '999', '277CA', '835', 'submission'


@dataclass(frozen=True, slots=True)
class Payment:
    """An 835 line for the claim, reconciled."""

    at: str
    status_code: str
    billed_cents: int
    allowed_cents: int
    paid_cents: int
    patient_cents: int
    adjustments: tuple[acks.Adjustment, ...]

    @property
    def short_cents(self) -> int:
        """Billed minus paid: what the payer did not pay (patient share included)."""
        return self.billed_cents - self.paid_cents


class Lifecycle:
    """Submission bookkeeping and acknowledgements for one site's claims."""

    def __init__(self, service: ClaimsService, store: Store) -> None:
        self._service = service
        self._store = store

    def _now(self) -> str:
        return fhir.utc_text(self._store.now())

    # -- submission intents ---------------------------------------------------------------

    async def due(self) -> list[ClaimRow]:
        """Ready claims with no problems and no submission in flight, oldest first."""
        return [
            r for r in await self._service.claims([_S.READY]) if not r.sending and not r.problems
        ]

    async def take_batch(self, kind: str, limit: int = 100, actor: str = ACTOR) -> Batch | None:
        """Write the intent for the next batch (one form; FHIR: one claim) and build it.

        The payload is built inside the intent's transaction: when it cannot be made, nothing
        of the intent is written (no batch, no control numbers), each claim that cannot be
        made into one alone is held back (back to draft with the problem ``build``: audited,
        shown in the queue, :meth:`ClaimsService.hold_unbuildable`) and the batch is made of
        the others, so one such claim never stops the rest. Should every claim build alone
        and not together, :class:`ClaimsError` is raised, the claims left ready.
        """
        due = await self.due()
        if not due:
            return None
        form = due[0].form
        rows = [r for r in due if r.form == form][: 1 if kind == "fhir" else limit]
        unreadable: list[int] = []
        contents = await self._service.content(
            [r.id for r in rows], actor, purpose="submission", unreadable=unreadable
        )
        if unreadable:
            # Back to draft with a problem, out of ``due``: the others go without them.
            await self._service.hold_unreadable(unreadable, actor)
            return await self.take_batch(kind, limit, actor)
        datas = [(claim_id, resource_id, body) for claim_id, resource_id, body in contents]
        service = self._service
        created = service.submission_time()
        usage = "P" if service.usage_production else "T"
        now = self._now()
        ids = tuple(r.id for r in rows)
        numbers = tuple(r.claim_number for r in rows)

        def build(
            bodies: Sequence[dict[str, Any]], isa: int, gs: int, sts: list[int]
        ) -> tuple[bytes, str | None]:
            if kind == "fhir":
                body = dict(bodies[0])
                body["status"] = "active"
                ident: dict[str, Any] = next(iter(body.get("identifier", [])), {})
                token = f"{ident.get('system', '')}|{ident.get('value', '')}" if ident else None
                return json.dumps(body).encode(), token
            claims = [(from_fhir(body), st) for body, st in zip(bodies, sts, strict=True)]
            text = interchange(service.envelope(isa, gs, created), Form(form), claims)
            return text.encode("ascii"), None

        def alone() -> dict[int, str]:
            """The claims that cannot be built even alone, with the type of what it raised."""
            failed = {}
            for claim_id, _, body in datas:
                try:
                    build([body], isa=1, gs=1, sts=[1])
                except BUILD_ERRORS as exc:
                    failed[claim_id] = type(exc).__name__
            return failed

        def work(conn: sqlite3.Connection) -> Batch:
            for claim_id, resource_id, _ in datas:
                fresh = conn.execute(
                    "SELECT 1 FROM claims WHERE id = ? AND status = 'ready' AND "
                    "sending_batch IS NULL AND resource_id = ?",
                    (claim_id, resource_id),
                ).fetchone()
                if fresh is None:
                    raise ClaimsError("a claim changed while its batch was made; try again")
            isa, gs = _take(conn, "isa", 1), _take(conn, "gs", 1)
            first_st = _take(conn, "st", len(datas)) - len(datas) + 1
            sts = [first_st + n for n in range(len(datas))]
            # Built inside the intent's transaction: a claim that cannot be built rolls it
            # all back (control numbers too), so no batch is ever 'sending' with nothing sent.
            try:
                payload, token = build([body for _, _, body in datas], isa, gs, sts)
            except BUILD_ERRORS as exc:
                failed = alone()
                if failed:
                    raise _Unbuildable(failed) from None
                raise ClaimsError(
                    f"claim(s) {', '.join(map(str, ids))} could not be made into a submission "
                    f"({type(exc).__name__}): nothing was sent; a defect, report it"
                ) from None
            batch_id = int(
                conn.execute(
                    "INSERT INTO claim_batches (interchange_control, group_control, form, usage, "
                    "purpose, created_at, created_by, claim_count, state, endpoint_kind) "
                    "VALUES (?,?,?,?, 'submission', ?,?,?, 'sending', ?)",
                    (isa, gs, form, usage, created.isoformat(), actor, len(datas), kind),
                ).lastrowid
                or 0
            )
            conn.executemany(
                "INSERT INTO claim_batch_items (batch_id, claim_id, resource_id, st_control) "
                "VALUES (?,?,?,?)",
                [(batch_id, c, r, st) for (c, r, _), st in zip(datas, sts, strict=True)],
            )
            for (claim_id, _, _), st in zip(datas, sts, strict=True):
                conn.execute(
                    "UPDATE claims SET sending_batch = ?, updated_at = ? WHERE id = ?",
                    (batch_id, now, claim_id),
                )
                _event(
                    conn, claim_id, actor, _S.READY, _S.READY,
                    f"sending ({kind}) in interchange {isa:09d}, transaction set {st:04d}", now,
                )  # fmt: skip
            return Batch(batch_id, kind, ids, numbers, isa, payload, token)

        try:
            return await self._store.transact(work)
        except _Unbuildable as exc:
            # Back to draft with the problem, out of ``due``: the others go without them.
            await self._service.hold_unbuildable(exc.failed, kind, actor)
            return await self.take_batch(kind, limit, actor)

    async def _settle(
        self,
        batch_id: int,
        state: str,
        outcome: str,
        to: Sequence[ClaimStatus],
        message: str | None,
        actor: str,
        late: str,
    ) -> list[int]:
        now = self._now()

        def work(conn: sqlite3.Connection) -> list[int]:
            done = conn.execute(
                "UPDATE claim_batches SET state = ?, answered_at = ?, outcome = ? "
                "WHERE id = ? AND state = 'sending'",
                (state, now, outcome, batch_id),
            ).rowcount
            if done != 1:
                return _late(conn, batch_id, state, outcome, to, late, actor, now)
            ids = [
                int(r[0])
                for r in conn.execute(
                    "SELECT id FROM claims WHERE sending_batch = ? ORDER BY id", (batch_id,)
                )
            ]
            for claim_id in ids:
                conn.execute(
                    "UPDATE claims SET sending_batch = NULL, updated_at = ? WHERE id = ?",
                    (now, claim_id),
                )
                before = _S.READY
                for step in to:
                    _move(conn, claim_id, before, step, actor, outcome, now)
                    before = step
                if not to:
                    _event(conn, claim_id, actor, _S.READY, _S.READY, outcome, now)
                if message:
                    _message(conn, claim_id, "submission", None, message, now, None)
            return ids

        return await self._store.transact(work)

    async def sent(self, batch_id: int, outcome: str, actor: str = ACTOR) -> list[int]:
        """The endpoint clearly received the batch (2xx): its claims are ``submitted``."""
        late = (
            f"the clearinghouse received it ({outcome}) after it was put in review: its 999 "
            "settles it, or resolve it as acknowledged"
        )
        return await self._settle(batch_id, "sent", outcome, [_S.SUBMITTED], None, actor, late)

    async def delivered(self, batch_id: int, outcome: str, actor: str = ACTOR) -> list[int]:
        """A FHIR payer endpoint took the Claim (2xx): ``submitted`` then ``acknowledged``."""
        late = f"the FHIR payer took it ({outcome}) after it was put in review"
        return await self._settle(
            batch_id, "sent", outcome, [_S.SUBMITTED, _S.ACKNOWLEDGED], None, actor, late
        )

    async def not_sent(self, batch_id: int, outcome: str, actor: str = ACTOR) -> list[int]:
        """Nothing was taken (no connection, or turned away unread): the claims stay ``ready``."""
        late = (
            f"the endpoint turned the request away unread ({outcome}) after it was put in "
            "review: nothing was received; resolve it as ready"
        )
        return await self._settle(batch_id, "not_sent", outcome, [], None, actor, late)

    async def refused(self, batch_id: int, outcome: str, actor: str = ACTOR) -> list[int]:
        """A clear refusal of the whole batch (4xx): received, not accepted → ``rejected``."""
        words = f"the endpoint refused the submission ({outcome}); correct and resubmit"
        return await self._settle(
            batch_id, "refused", outcome, [_S.SUBMITTED, _S.REJECTED], words, actor, words
        )

    async def ambiguous(self, batch_id: int, outcome: str, actor: str = ACTOR) -> list[int]:
        """It may have landed and no clear answer came: ``in_review``, never a blind resend."""
        words = (
            f"no clear answer to the submission ({outcome}): it may have been received. Ask "
            "the clearinghouse, then resolve: acknowledged if they have it, ready if not"
        )
        return await self._settle(
            batch_id, "ambiguous", outcome, [_S.IN_REVIEW], words, actor, words
        )

    async def recover(self, older_than: timedelta, actor: str = ACTOR) -> int:
        """Intents left ``sending`` for longer than ``older_than`` become ambiguous (the
        request may have gone); how many batches.

        ``older_than`` must exceed the longest a request can take (the submitter bounds each
        one), so no live process is still waiting for the answer: a crash, a kill or a
        cancelled pass left them. A younger intent may be another process's request on the
        wire (the sync process and ``appliance claims submit`` run side by side) and is left
        alone. Should an answer still come for a batch recovered here (a process stalled, the
        clock stepped forward), :meth:`sent` and the others record it instead of failing.
        """
        now = self._store.now()
        cutoff = now - older_than
        rows = await self._store.query(
            "SELECT id, created_at FROM claim_batches WHERE state = 'sending' ORDER BY id"
        )
        recovered = 0
        for batch_id, created_at in rows:
            # Written further ahead than any request takes: on a clock since set back (NTP
            # on a box that ran ahead), its age unknown; left, it would wait out the step.
            if cutoff < _written_at(str(created_at)) <= now + older_than:
                continue
            if await self.ambiguous(int(batch_id), "interrupted while sending", actor):
                recovered += 1
        return recovered

    # -- answers from outside -------------------------------------------------------------

    async def apply_response(self, text: str, received_by: str) -> Applied:
        """Apply a 999, 277CA or 835 (raises :class:`acks.AckError` before writing anything)."""
        kind, parsed = acks.parse(text)
        digest = hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()
        now = self._now()
        control = parsed.control

        def work(conn: sqlite3.Connection) -> Applied:
            if conn.execute("SELECT 1 FROM claim_responses WHERE digest = ?", (digest,)).fetchone():
                return Applied(kind, control, True, 0, 0, "already applied")
            response = int(
                conn.execute(
                    "INSERT INTO claim_responses (kind, digest, control, received_at, "
                    "received_by, summary) VALUES (?,?,?,?,?, '')",
                    (kind, digest, control, now, received_by),
                ).lastrowid
                or 0
            )
            ctx = _Apply(conn, response, received_by, now)
            if isinstance(parsed, acks.Ack999):
                ctx.apply_999(parsed)
            elif isinstance(parsed, acks.Ack277):
                ctx.apply_277(parsed)
            else:
                ctx.apply_835(parsed)
            summary = f"{kind}: {ctx.moved} claim(s) updated, {ctx.ignored} not matched"
            conn.execute("UPDATE claim_responses SET summary = ? WHERE id = ?", (summary, response))
            return Applied(kind, control, False, ctx.moved, ctx.ignored, summary)

        event = AuditEvent(received_by, AuditAction.UPDATE, entity=f"Claim {kind} {control}")
        return await self._store.transact(work, [event])

    async def note_unreadable(self, source_id: str, kind: str, error: str, text: str) -> None:
        """Keep a polled file that could not be applied on a list for staff (the poll
        goes on past it: a file the clearinghouse will not change would hold the cursor for
        good); the same file met again keeps its first entry."""
        digest = hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()
        entry = Unreadable(
            source_id[:64] or "?", kind if kind in _KINDS else "?", error[:300], self._now(), digest
        )

        def work(conn: sqlite3.Connection) -> None:
            known = list(_read_unreadable(conn))
            if any(u.digest == digest for u in known):
                return
            _write_unreadable(conn, [*known, entry][-UNREADABLE_KEPT:])

        await self._store.transact(work)

    async def unreadable_responses(self) -> tuple[Unreadable, ...]:
        """Response files the poll could not apply, oldest first (at most the newest 50)."""
        rows = await self._store.query("SELECT value FROM meta WHERE key = ?", (UNREADABLE_KEY,))
        return _unreadable_list(rows[0][0] if rows else None)

    async def clear_unreadable_responses(
        self, actor: str, seen: Collection[str] | None = None
    ) -> int:
        """Clear the list once a person has dealt with the files (audited); how many went.

        ``seen``: the digests of the entries the person was shown (the claims page sends
        them): only those go, so a file noted since the page was drawn stays on the list.
        """
        # Filled inside the transaction, which appends the record after ``work`` (in it).
        events: list[AuditEvent] = []

        def work(conn: sqlite3.Connection) -> int:
            known = _read_unreadable(conn)
            gone = [u for u in known if seen is None or u.digest in seen]
            if not gone:
                return 0
            _write_unreadable(conn, [u for u in known if u not in gone])
            ids = ", ".join(u.source_id for u in gone)[:400]
            detail = f"{UNREADABLE_CLEARED_DETAIL} ({len(gone)}: {ids})"
            events.append(AuditEvent(actor, AuditAction.CONFIG, entity="claims", detail=detail))
            return len(gone)

        return await self._store.transact(work, events)

    # -- a person ---------------------------------------------------------------------------

    async def resolve(self, claim_id: int, as_: str, reason: str, actor: str) -> ClaimRow:
        """Settle an ``in_review`` claim after asking the clearinghouse."""
        if as_ not in RESOLVE_TO:
            raise ClaimsError("resolve as 'acknowledged' (they have it) or 'ready' (they do not)")
        if len(reason.strip()) < 10:
            raise ClaimsError(
                "give a reason of at least 10 characters (what the clearinghouse said)"
            )
        row = await self._service.claim(claim_id)
        if row.status is not _S.IN_REVIEW:
            raise ClaimsError(f"claim {row.claim_number} is {row.status}, not in_review")
        return await self._service.transition(
            claim_id, RESOLVE_TO[as_], actor, f"resolved by a person: {reason.strip()}"
        )

    # -- reading ----------------------------------------------------------------------------

    async def history(self, claim_id: int) -> list[Event]:
        """State moves and messages of a claim, oldest first (no PHI: our words and codes)."""
        moves = await self._store.query(
            "SELECT at, actor, from_status, to_status, detail FROM claim_events "
            "WHERE claim_id = ? ORDER BY id",
            (claim_id,),
        )
        notes = await self._store.query(
            "SELECT at, source, code, message FROM claim_messages WHERE claim_id = ? ORDER BY id",
            (claim_id,),
        )
        found = [Event(a, b, c, d, e) for a, b, c, d, e in moves]
        found += [Event(a, s, None, None, m, s) for a, s, _c, m in notes]
        return sorted(found, key=lambda e: e.at)

    async def messages(self, claim_ids: Sequence[int]) -> dict[int, list[str]]:
        """The outside messages per claim (999/277CA/835/submission), oldest first."""
        if not claim_ids:
            return {}
        marks = ",".join("?" * len(claim_ids))
        rows = await self._store.query(
            f"SELECT claim_id, message FROM claim_messages WHERE claim_id IN ({marks}) "  # noqa: S608 - placeholders
            "ORDER BY id",
            list(claim_ids),
        )
        found: dict[int, list[str]] = {}
        for claim_id, message in rows:
            found.setdefault(int(claim_id), []).append(message)
        return found

    async def payments(self, claim_ids: Sequence[int]) -> dict[int, Payment]:
        """The latest 835 payment per claim."""
        if not claim_ids:
            return {}
        marks = ",".join("?" * len(claim_ids))
        rows = await self._store.query(
            "SELECT claim_id, at, status_code, billed_cents, allowed_cents, paid_cents, "  # noqa: S608 - placeholders
            f"patient_cents, adjustments FROM claim_payments WHERE claim_id IN ({marks}) "
            "ORDER BY id",
            list(claim_ids),
        )
        found: dict[int, Payment] = {}
        for claim_id, at, code, billed, allowed, paid, patient, adj in rows:
            found[int(claim_id)] = Payment(
                at, code, int(billed), int(allowed), int(paid), int(patient),
                tuple(acks.Adjustment(a["group"], a["reason"], int(a["cents"]))
                      for a in json.loads(adj)),
            )  # fmt: skip
        return found

    async def search(
        self,
        statuses: Sequence[ClaimStatus] = (),
        since: date | None = None,
        until: date | None = None,
        payer_id: str | None = None,
    ) -> list[ClaimRow]:
        """Claims filtered for the queue, newest service date first."""
        rows = await self._service.claims(statuses)
        return sorted(
            (
                r
                for r in rows
                if (since is None or r.service_date >= since.isoformat())
                and (until is None or r.service_date <= until.isoformat())
                and (payer_id is None or r.payer_id == payer_id)
            ),
            key=lambda r: (r.service_date, r.id),
            reverse=True,
        )

    async def batch_state(self, batch_id: int) -> str | None:
        """A submission batch's state (``sending``/``sent``/``not_sent``/...)."""
        rows = await self._store.query("SELECT state FROM claim_batches WHERE id = ?", (batch_id,))
        if not rows:
            raise NotFoundError(f"no batch {batch_id}")
        return None if rows[0][0] is None else str(rows[0][0])


def _read_unreadable(conn: sqlite3.Connection) -> tuple[Unreadable, ...]:
    return _unreadable_list(db.meta_value(conn, UNREADABLE_KEY))


def _write_unreadable(conn: sqlite3.Connection, entries: Sequence[Unreadable]) -> None:
    if not entries:
        conn.execute("DELETE FROM meta WHERE key = ?", (UNREADABLE_KEY,))
        return
    rows = [[u.source_id, u.kind, u.error, u.at, u.digest] for u in entries]
    db.set_meta(conn, UNREADABLE_KEY, json.dumps(rows))


def _unreadable_list(value: str | bytes | None) -> tuple[Unreadable, ...]:
    """The unreadable response files noted so far (an altered row reads as none)."""
    try:
        loaded = json.loads(value or "[]")
    except (TypeError, ValueError):
        return ()
    return tuple(
        Unreadable(*item)
        for item in (loaded if isinstance(loaded, list) else [])
        if isinstance(item, list) and len(item) == 5 and all(isinstance(v, str) for v in item)
    )


def _event(
    conn: sqlite3.Connection,
    claim_id: int,
    actor: str,
    before: ClaimStatus | None,
    after: ClaimStatus,
    detail: str | None,
    now: str,
) -> None:
    conn.execute(
        "INSERT INTO claim_events (claim_id, at, actor, from_status, to_status, detail) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (claim_id, now, actor, None if before is None else before.value, after.value, detail),
    )


def _message(
    conn: sqlite3.Connection,
    claim_id: int,
    source: str,
    code: str | None,
    message: str,
    now: str,
    response: int | None,
) -> None:
    conn.execute(
        "INSERT INTO claim_messages (claim_id, at, source, code, message, response) "
        "VALUES (?,?,?,?,?,?)",
        (claim_id, now, source, code, message, response),
    )


def _move(
    conn: sqlite3.Connection,
    claim_id: int,
    before: ClaimStatus,
    to: ClaimStatus,
    actor: str,
    detail: str | None,
    now: str,
) -> None:
    """Compare-and-set one allowed move inside a transaction."""
    if to not in TRANSITIONS[before]:
        raise ClaimsError(f"claim {claim_id}: cannot go from {before} to {to}")
    moved = conn.execute(
        "UPDATE claims SET status = ?, updated_at = ? WHERE id = ? AND status = ?",
        (to.value, now, claim_id, before.value),
    ).rowcount
    if moved != 1:
        raise ClaimsError(f"claim {claim_id} changed meanwhile; try again")
    _event(conn, claim_id, actor, before, to, detail, now)


def _written_at(created_at: str) -> datetime:
    """When an intent was written: its ``created_at`` (site-local, to the minute: ISA09/10)."""
    try:
        return datetime.fromisoformat(created_at)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)  # not ours to judge: old enough


def _late(
    conn: sqlite3.Connection,
    batch_id: int,
    state: str,
    outcome: str,
    to: Sequence[ClaimStatus],
    words: str,
    actor: str,
    now: str,
) -> list[int]:
    """An answer for a batch no longer ``sending``: :meth:`Lifecycle.recover` put it in
    review first (its owner stalled past the recovery age, or the clock stepped). Nothing the
    endpoint said is lost: the batch takes the answer's state, and each of its claims still in
    review gets the answer in its history and, for a clear one, the move it allows from
    ``in_review`` (a FHIR payer's 2xx: acknowledged; a refusal: rejected). An X12 2xx moves
    nothing here: the 999 in its body, applied next, does. Returns the claims it spoke for.
    """
    row = conn.execute("SELECT state FROM claim_batches WHERE id = ?", (batch_id,)).fetchone()
    if row is None:
        raise ClaimsError(f"no batch {batch_id}")
    if state == "ambiguous":
        return []  # in review already, or an answer settled it meanwhile: nothing to add
    if row[0] != "ambiguous":
        raise ClaimsError(f"batch {batch_id} was answered already ({row[0]})")
    conn.execute(
        "UPDATE claim_batches SET state = ?, answered_at = ?, outcome = ? "
        "WHERE id = ? AND state = 'ambiguous'",
        (state, now, f"{outcome}, after it was put in review", batch_id),
    )
    ids = [
        int(r[0])
        for r in conn.execute(
            "SELECT c.id FROM claim_batch_items i JOIN claims c ON c.id = i.claim_id "
            "WHERE i.batch_id = ? AND c.status = 'in_review' AND c.sending_batch IS NULL "
            "ORDER BY c.id",
            (batch_id,),
        )
    ]
    steps = [s for s in to if s in TRANSITIONS[_S.IN_REVIEW]][-1:]
    for claim_id in ids:
        _message(conn, claim_id, "submission", None, words, now, None)
        for step in steps:
            _move(conn, claim_id, _S.IN_REVIEW, step, actor, f"{outcome} (late answer)", now)
    return ids


# Which states an answer may find a claim in, and the steps that bring it to the answer's
# state (an 835 can arrive with no 277CA before it: the payer adjudicated, so it was accepted).
_TO_ACKNOWLEDGED = {_S.SUBMITTED: [_S.ACKNOWLEDGED], _S.IN_REVIEW: [_S.ACKNOWLEDGED]}
_TO_ACCEPTED = {
    _S.SUBMITTED: [_S.ACKNOWLEDGED, _S.ACCEPTED],
    _S.IN_REVIEW: [_S.ACKNOWLEDGED, _S.ACCEPTED],
    _S.ACKNOWLEDGED: [_S.ACCEPTED],
    _S.ACCEPTED: [],
}
_TO_REJECTED = {
    _S.SUBMITTED: [_S.REJECTED],
    _S.IN_REVIEW: [_S.REJECTED],
    _S.ACKNOWLEDGED: [_S.REJECTED],
}


class _Apply:
    """Applies one parsed file inside its transaction; counts what it moved and ignored."""

    def __init__(self, conn: sqlite3.Connection, response: int, actor: str, now: str) -> None:
        self.conn, self.response, self.actor, self.now = conn, response, actor, now
        self.moved = self.ignored = 0

    def _status(self, claim_id: int) -> ClaimStatus:
        row = self.conn.execute("SELECT status FROM claims WHERE id = ?", (claim_id,)).fetchone()
        return ClaimStatus(row[0])

    def _walk(self, claim_id: int, plan: dict[ClaimStatus, list[ClaimStatus]], detail: str) -> bool:
        before = self._status(claim_id)
        if before not in plan:
            return False
        for step in plan[before]:
            _move(self.conn, claim_id, before, step, self.actor, detail, self.now)
            before = step
        return True

    def _note(self, claim_id: int, source: str, code: str | None, message: str) -> None:
        _message(self.conn, claim_id, source, code, message, self.now, self.response)

    def _by_number(self, number: str) -> int | None:
        row = self.conn.execute(
            "SELECT id FROM claims WHERE claim_number = ?", (number,)
        ).fetchone()
        return None if row is None else int(row[0])

    def _sent_again(self, claim_id: int, batch_id: int) -> int | None:
        """The batch id of a later interchange that carried ``claim_id`` after ``batch_id``
        and may have been received (sent, or in review), if any."""
        row = self.conn.execute(
            "SELECT max(b.id) FROM claim_batch_items i JOIN claim_batches b "
            "ON b.id = i.batch_id WHERE i.claim_id = ? AND b.purpose = 'submission' "
            "AND b.id > ? AND b.state IN ('sending', 'sent', 'ambiguous')",
            (claim_id, batch_id),
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def apply_999(self, ack: acks.Ack999) -> None:
        items = {
            int(st): (int(claim_id), int(batch_id))
            for st, claim_id, batch_id in self.conn.execute(
                "SELECT i.st_control, i.claim_id, i.batch_id FROM claim_batch_items i "
                "JOIN claim_batches b ON b.id = i.batch_id "
                "WHERE b.purpose = 'submission' AND b.group_control = ?",
                (int(ack.group_control),),
            )
        }
        answered = set()
        for answer in ack.sets:
            item = items.get(int(answer.st_control))
            if item is None:
                self.ignored += 1
                continue
            claim_id, batch_id = item
            answered.add(claim_id)
            plan = _TO_ACKNOWLEDGED if answer.accepted else _TO_REJECTED
            verdict = acks.SET_RESULTS[answer.code]
            for message in answer.messages:
                self._note(claim_id, "999", answer.code, message)
            again = self._sent_again(claim_id, batch_id) if answer.accepted else None
            if again is not None:
                # An interchange put in review, resolved as "not received" and sent again,
                # was received after all: the payer may get the claim twice. A person
                # must know (a duplicate is denied, CARC 18; or the clearinghouse voids one).
                self._note(
                    claim_id,
                    "999",
                    answer.code,
                    f"999: an earlier interchange of this claim (batch {batch_id}) was "
                    f"accepted too, and it was sent again in batch {again}: the clearinghouse "
                    "may hold it twice; ask it to void one, or expect a duplicate denial",
                )
            if self._walk(claim_id, plan, f"999 {verdict}"):
                self.moved += 1
            else:
                self.ignored += 1
        if ack.group_code not in ("A", "E", "P"):
            # The whole group was refused without a per-set answer for these.
            for rejected in sorted({claim for claim, _batch in items.values()} - answered):
                self._note(rejected, "999", ack.group_code, "999: the whole batch was rejected")
                if self._walk(rejected, _TO_REJECTED, "999 rejected (whole batch)"):
                    self.moved += 1

    def apply_277(self, ack: acks.Ack277) -> None:
        for status in ack.claims:
            claim_id = self._by_number(status.claim_number)
            if claim_id is None:
                self.ignored += 1
                continue
            for code, message in zip(status.codes, status.messages, strict=True):
                self._note(claim_id, "277CA", code, message)
            if status.accepted is None:
                continue
            plan = _TO_ACCEPTED if status.accepted else _TO_REJECTED
            detail = "277CA " + ("accepted" if status.accepted else "rejected")
            if self._walk(claim_id, plan, detail):
                self.moved += 1
            else:
                self.ignored += 1

    def apply_835(self, ack: acks.Ack835) -> None:
        for remit in ack.claims:
            claim_id = self._by_number(remit.claim_number)
            if claim_id is None:
                self.ignored += 1
                continue
            self.conn.execute(
                "INSERT INTO claim_payments (claim_id, at, status_code, billed_cents, "
                "allowed_cents, paid_cents, patient_cents, adjustments, payer_claim_id, "
                "response) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    claim_id, self.now, remit.status_code, remit.billed_cents,
                    remit.allowed_cents, remit.paid_cents, remit.patient_cents,
                    json.dumps([{"group": a.group, "reason": a.reason, "cents": a.cents}
                                for a in remit.adjustments]),
                    remit.payer_claim_id, self.response,
                ),
            )  # fmt: skip
            self._note(claim_id, "835", remit.status_code, _payment_words(remit))
            if remit.reversal:
                self._note(claim_id, "835", "22", "835: the payer reversed a payment: review it")
                self.moved += 1
                continue
            final = _S.DENIED if remit.denied else _S.PAID
            plan = {k: [*v, final] for k, v in _TO_ACCEPTED.items()}
            if self._walk(claim_id, plan, f"835 {final.value}"):
                self.moved += 1
            else:
                self.ignored += 1


def _payment_words(remit: acks.Remittance) -> str:
    head = (
        f"835: paid ${money(remit.paid_cents)} of ${money(remit.billed_cents)} billed "
        f"(allowed ${money(remit.allowed_cents)}, patient owes ${money(remit.patient_cents)})"
    )
    if remit.denied:
        head = f"835: denied; paid ${money(remit.paid_cents)} of ${money(remit.billed_cents)}"
    short = remit.billed_cents - remit.paid_cents
    if short <= 0:
        return head
    reasons = "; ".join(a.words() for a in remit.adjustments) or "no reason given"
    return f"{head}; ${money(short)} not paid: {reasons}"


def fhir_outcome(body: Any) -> str | None:
    """An error a FHIR payer put in its answer (OperationOutcome/ClaimResponse), or None."""
    if not isinstance(body, dict):
        return None
    if body.get("resourceType") == "ClaimResponse" and body.get("outcome") == "error":
        return "the FHIR payer answered with a ClaimResponse outcome 'error'"
    if body.get("resourceType") == "OperationOutcome":
        found = body.get("issue")
        issues = [
            i
            for i in (found if isinstance(found, list) else [])
            if isinstance(i, dict) and i.get("severity") in ("error", "fatal")
        ]
        if issues:
            codes = ", ".join(str(i.get("code", "?")) for i in issues)
            return f"the FHIR payer refused the Claim (issue codes: {codes})"
    return None
