"""Claims over the store: the visit trigger, the restart scan, checks, states and exports.

Writes are one transaction each with their audit records (``Store.transact``). A claim's
content is an encrypted FHIR ``Claim`` row in ``resources`` written here without an outbox
row (docs/adr/0006-claims.md): the lifecycle's submission adds the claims-lane row. The
plain ``claims`` columns carry no PHI. Every decryption of a claim or of the chart it came
from is audited; nothing here logs PHI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import orjson

from appliance import db, fhir
from appliance.audit import AuditAction, AuditEvent
from appliance.config import Config, PayerConfig, PayerKind
from appliance.errors import ApplianceError, NotFoundError
from appliance.store import Store, StoredResource
from services.claims import checks, eligibility
from services.claims.fhir_claim import ICD10_SYSTEM, MBI_SYSTEM, from_fhir, to_fhir
from services.claims.model import (
    EDITABLE,
    TRANSITIONS,
    BillingProvider,
    ClaimData,
    ClaimStatus,
    DecisionOutcome,
    Form,
    Payer,
    PostalAddress,
    Practitioner,
    Problem,
    ServiceLine,
    Subscriber,
)
from services.claims.x12 import Envelope, interchange
from services.claims.x12_validation import validate_x12

T = TypeVar("T")
logger = logging.getLogger(__name__)
ACTOR = "service:claims"
# A claim whose stored copy fails authentication (altered on disk): never sent, sent back.
UNREADABLE_PROBLEM = Problem(
    "stored",
    "the stored claim failed authentication (altered on disk) and cannot be sent: "
    "restore it from a backup, or cancel it and bill the visit by hand",
)
# What building a claim's submission raises when its stored content or its row is not what
# the builder expects (an altered row, a Claim missing a part): a defect, never the network.
BUILD_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError)
SITE_SYSTEM = "urn:telehealth-appliance:fhir:site"
VIRTUAL_CLASSES = frozenset({"VR"})  # v3 ActCode "virtual"
_CLAIM_COLUMNS = (
    "id, claim_number, encounter_id, patient_id, service_date, form, payer_id, payer_kind, "
    "charge_cents, fee_cents, status, problems, x12_valid, override_at, created_at, updated_at, "
    "sending_batch"
)


class ClaimsError(ApplianceError):
    """A claims operation that cannot be done (unknown claim, forbidden move, bad reason)."""


def build_problem(kind: str, error: str) -> Problem:
    """The problem of a claim that could not be made into a submission (``error``: the
    exception's type; its text may quote the claim)."""
    what = "a FHIR Claim" if kind == "fhir" else "an X12 837"
    return Problem(
        "build",
        f"the claim could not be made into {what} ({error}) and was not sent: a defect, "
        "report it with the claim number; cancel the claim and bill the visit by hand",
    )


@dataclass(frozen=True, slots=True)
class ClaimRow:
    """A claim as listed: no PHI (local ids, dates, codes, cents, states, our messages)."""

    id: int
    claim_number: str
    encounter_id: str
    patient_id: str
    service_date: str
    form: str
    payer_id: str
    payer_kind: str
    charge_cents: int
    fee_cents: int
    status: ClaimStatus
    problems: tuple[Problem, ...]
    x12_valid: bool | None
    overridden: bool
    created_at: str
    updated_at: str
    sending_batch: int | None = None  # set while a submission request may be on the wire

    @property
    def sending(self) -> bool:
        """A submission of this claim is in flight (ready, but never picked again meanwhile)."""
        return self.sending_batch is not None


def _row(row: Sequence[Any]) -> ClaimRow:
    problems = tuple(Problem(p["code"], p["message"]) for p in json.loads(row[11]))
    return ClaimRow(
        int(row[0]),
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        row[6],
        row[7],
        int(row[8]),
        int(row[9]),
        ClaimStatus(row[10]),
        problems,
        None if row[12] is None else bool(row[12]),
        row[13] is not None,
        row[14],
        row[15],
        None if row[16] is None else int(row[16]),
    )


@dataclass(frozen=True, slots=True)
class Decided:
    """What the trigger decided for one encounter (no PHI)."""

    encounter_id: str
    outcome: DecisionOutcome
    reason: str
    claim_id: int | None


def _coding_codes(concepts: Sequence[dict[str, Any]], system: str) -> list[str]:
    return [
        c["code"].replace(".", "").upper()
        for concept in concepts
        for c in concept.get("coding", [])
        if c.get("system") == system and isinstance(c.get("code"), str)
    ]


class ClaimsService:
    """Q3014 claims for one site."""

    def __init__(
        self,
        store: Store,
        config: Config,
        rules: eligibility.Rules | None = None,
        *,
        run_pyx12: bool = True,
    ) -> None:
        self._store = store
        self._config = config
        self._rules = rules or eligibility.load_rules()
        self._zone = ZoneInfo(config.site.timezone)
        self._run_pyx12 = run_pyx12

    # -- the trigger ---------------------------------------------------------------------

    def _at_site(self, encounter: dict[str, Any]) -> bool:
        site = self._config.site.id
        ours = {f"Location/{site}"} | {
            u.location for u in self._config.sync.upstreams if u.location
        }
        for entry in encounter.get("location", []):
            loc = entry.get("location", {})
            ident = loc.get("identifier", {})
            if loc.get("reference") in ours or (
                ident.get("system") == SITE_SYSTEM and ident.get("value") == site
            ):
                return True
        return False

    def _service_date(self, encounter: dict[str, Any]) -> date | None:
        period = encounter.get("period", {})
        text = period.get("start") or period.get("end")
        if not isinstance(text, str):
            return None
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            return moment.date()
        return moment.astimezone(self._zone).date()

    async def on_visit_finished(
        self,
        encounter: dict[str, Any],
        *,
        actor: str = ACTOR,
        patient_at_site: bool | None = None,
        diagnoses: Sequence[str] = (),
        payer_id: str | None = None,
    ) -> Decided:
        """Decide (once per encounter) whether a finished telehealth visit earns a Q3014 draft."""
        encounter_id = str(encounter.get("id", ""))
        if not encounter_id:
            raise ClaimsError("the Encounter has no id: store it first")
        known = await self.decision(encounter_id)
        if known is not None:
            return known
        patient_ref = fhir.patient_reference(encounter) or ""
        patient_id = patient_ref.removeprefix("Patient/") or None
        day = self._service_date(encounter)
        klass = (encounter.get("class") or {}).get("code")
        if encounter.get("status") != "finished" or klass not in VIRTUAL_CLASSES:
            return await self._decide(
                encounter_id,
                patient_id,
                day,
                DecisionOutcome.NOT_TELEHEALTH,
                "not a finished virtual (VR) encounter",
                actor,
            )
        at_site = self._at_site(encounter) if patient_at_site is None else patient_at_site
        if not at_site:
            return await self._decide(
                encounter_id,
                patient_id,
                day,
                DecisionOutcome.NOT_AT_SITE,
                "the patient was not at this site (at home or elsewhere): no facility fee",
                actor,
            )
        if patient_id is None or day is None:
            return await self._decide(
                encounter_id,
                patient_id,
                day,
                DecisionOutcome.NOT_ELIGIBLE,
                "the Encounter names no patient or no period",
                actor,
            )
        patient = await self._store.read("Patient", patient_id, actor)
        payer, member_id = await self._payer(patient, payer_id, actor)
        if payer is None:
            return await self._decide(
                encounter_id, patient_id, day, DecisionOutcome.NOT_ELIGIBLE, member_id, actor
            )
        decision = eligibility.decide(
            self._rules, self._config.site, self._config.claims, payer, day
        )
        if not decision.eligible:
            return await self._decide(
                encounter_id,
                patient_id,
                day,
                DecisionOutcome.NOT_ELIGIBLE,
                decision.reason,
                actor,
            )
        codes = [c.replace(".", "").upper() for c in diagnoses]
        codes += _coding_codes(encounter.get("reasonCode", []), ICD10_SYSTEM)
        data = self._build(
            encounter_id,
            patient_id,
            patient,
            payer,
            member_id,
            day,
            decision,
            tuple(dict.fromkeys(codes)),
        )
        return await self._draft(data, decision.timely_filing_days, decision.reason, actor, None)

    async def _payer(
        self, patient: dict[str, Any], payer_id: str | None, actor: str
    ) -> tuple[PayerConfig | None, str]:
        """The payer to bill and the member id; (None, why) when none is known."""
        claims = self._config.claims
        mbi = next(
            (
                i.get("value")
                for i in patient.get("identifier", [])
                if i.get("system") == MBI_SYSTEM
            ),
            None,
        )
        if payer_id is not None:
            payer = claims.payer(payer_id)
            if payer is None:
                return None, f"payer {payer_id} is not declared in [[claims.payer]]"
            if payer.kind is PayerKind.MEDICARE and mbi:
                return payer, str(mbi)
        coverages = await self._store.newest(
            f"Patient/{patient['id']}", "Coverage", actor, limit=20
        )
        for coverage in coverages:
            if coverage.get("status") != "active":
                continue
            for payor in coverage.get("payor", []):
                value = (payor.get("identifier") or {}).get("value")
                payer = claims.payer(value) if isinstance(value, str) else None
                if payer is not None and (payer_id is None or payer.id == payer_id):
                    member = coverage.get("subscriberId") or (mbi or "")
                    return payer, str(member)
        if mbi and payer_id is None:
            payer = claims.payer_of_kind(PayerKind.MEDICARE)
            if payer is None:
                return None, "the patient has an MBI but no [[claims.payer]] of kind medicare"
            return payer, str(mbi)
        return None, "no coverage known for a configured payer (no MBI, no active Coverage)"

    def _build(
        self,
        encounter_id: str,
        patient_id: str,
        patient: dict[str, Any],
        payer: PayerConfig,
        member_id: str,
        day: date,
        decision: eligibility.Decision,
        diagnoses: tuple[str, ...],
        override_reason: str | None = None,
    ) -> ClaimData:
        site, claims = self._config.site, self._config.claims
        rule = decision.site_rule
        assert rule is not None  # an eligible decision always names its site rule
        name = (patient.get("name") or [{}])[0]
        addresses = patient.get("address") or []
        address = None
        if addresses:
            first = addresses[0]
            address = PostalAddress(
                tuple(first.get("line", [])),
                first.get("city", ""),
                first.get("state", ""),
                first.get("postalCode", ""),
            )
        birth = patient.get("birthDate")
        attending = None
        if claims.attending_npi and claims.attending_family and claims.attending_given:
            attending = Practitioner(
                claims.attending_npi, claims.attending_family, claims.attending_given
            )
        return ClaimData(
            claim_number="",  # given in the transaction that stores it
            form=rule.form,
            site_type=site.type.value,
            place_of_service=rule.place_of_service,
            type_of_bill=rule.type_of_bill,
            billing=BillingProvider(
                site.name,
                site.npi,
                site.tax_id,
                PostalAddress(
                    site.address.lines,
                    site.address.city,
                    site.address.state,
                    site.address.postal_code,
                ),
            ),
            attending=attending if rule.form is Form.INSTITUTIONAL else None,
            subscriber=Subscriber(
                family=str(name.get("family", "")),
                given=str((name.get("given") or [""])[0]),
                birth_date=date.fromisoformat(birth)
                if isinstance(birth, str) and len(birth) == 10
                else None,
                gender=patient.get("gender"),
                member_id=member_id.replace("-", "").upper(),
                address=address,
            ),
            payer=Payer(payer.id, payer.name, payer.kind.value, decision.filing_indicator),
            service_date=day,
            diagnoses=diagnoses,
            lines=(ServiceLine("Q3014", decision.charge_cents, 1, day, rule.revenue_code),),
            total_cents=decision.charge_cents,
            patient_id=patient_id,
            encounter_id=encounter_id,
            fee_cents=decision.fee_cents,
            override_reason=override_reason,
        )

    # -- checks ----------------------------------------------------------------------------

    def _problems(self, data: ClaimData, timely_days: int) -> tuple[list[Problem], bool | None]:
        today = self._store.now().astimezone(self._zone).date()
        found = checks.check(data, today=today, timely_filing_days=timely_days)
        if not self._run_pyx12:
            return found, None
        text = interchange(self._envelope(1, 1), data.form, [(data, 1)])
        result = validate_x12(text)
        found += [Problem("x12", f"X12 syntax (999 {err})") for err in result.errors]
        if not result.valid and not result.errors:
            found.append(Problem("x12", "X12 syntax: pyx12 refused the interchange"))
        return found, result.valid

    @property
    def store(self) -> Store:
        """The store this service works on."""
        return self._store

    def submission_time(self) -> datetime:
        """The site-local minute an interchange made now carries (ISA09/ISA10)."""
        return self._store.now().astimezone(self._zone).replace(second=0, microsecond=0)

    @property
    def usage_production(self) -> bool:
        """ISA15 is P (production data) rather than T."""
        return self._config.claims.usage == "production"

    def envelope(self, isa: int, gs: int, created: datetime | None = None) -> Envelope:
        """The envelope of an interchange with these control numbers (for the lifecycle)."""
        return self._envelope(isa, gs, created)

    def _envelope(self, isa: int, gs: int, created: datetime | None = None) -> Envelope:
        claims = self._config.claims
        return Envelope(
            submitter_name=claims.submitter_name or self._config.site.name,
            submitter_id=claims.submitter_id or "UNSET",
            contact_name=claims.contact_name or "UNSET",
            contact_phone=claims.contact_phone or "0000000000",
            receiver_name=claims.receiver_name or "UNSET",
            receiver_id=claims.receiver_id or "UNSET",
            usage="P" if claims.usage == "production" else "T",
            interchange_control=isa,
            group_control=gs,
            created=created or self._store.now().astimezone(self._zone),
        )

    def _timely_days(self, data: ClaimData) -> int:
        payer = self._config.claims.payer(data.payer.id)
        kind = self._rules.payer_kinds[data.payer.kind]
        return (payer.timely_filing_days if payer else None) or kind.timely_filing_days

    # -- writing ---------------------------------------------------------------------------

    def _insert_claim_resource(
        self, conn: sqlite3.Connection, data: ClaimData, status: str
    ) -> tuple[int, str]:
        now = self._store.now()
        logical_id = fhir.uuid7(int(now.timestamp() * 1000))
        body = to_fhir(data, status=status, created=now.isoformat())
        body["id"] = logical_id
        body["identifier"].insert(
            0, {"system": fhir.IDENTIFIER_SYSTEM, "value": fhir.identifier_value(logical_id)}
        )
        body["meta"] = {"lastUpdated": now.isoformat()}
        keyring = self._store.current_keyring(conn)  # inside the write: a rotation seen first
        version, blob = keyring.encrypt("resources", logical_id, orjson.dumps(body))
        cur = conn.execute(
            "INSERT INTO resources (logical_id, type, patient_key, code, effective, key_version, "
            "body) VALUES (?, 'Claim', ?, ?, ?, ?, ?)",
            (
                logical_id,
                self._store.patient_key(f"Patient/{data.patient_id}"),
                "https://bluebutton.cms.gov/resources/codesystem/hcpcs|Q3014",
                fhir.utc_text(now),
                version,
                blob,
            ),
        )
        return int(cur.lastrowid or 0), logical_id

    async def _draft(
        self,
        data: ClaimData,
        timely_days: int,
        reason: str,
        actor: str,
        override_by: str | None,
    ) -> Decided:
        site_id = self._config.site.id
        day = data.service_date.isoformat()
        duplicate = await self._store.query(
            "SELECT claim_number FROM claims WHERE patient_id = ? AND service_date = ? "
            "AND site_id = ? AND status != 'cancelled' AND override_at IS NULL",
            (data.patient_id, day, site_id),
        )
        if duplicate and override_by is None:
            return await self._decide(
                data.encounter_id,
                data.patient_id,
                data.service_date,
                DecisionOutcome.DUPLICATE,
                f"claim {duplicate[0][0]} already bills Q3014 for this patient on {day} at this "
                "site (a person may override with a reason)",
                actor,
            )
        next_id = (await self._store.query("SELECT coalesce(max(id), 0) + 1 FROM claims"))[0][0]
        numbered = _with_number(data, f"Q{int(next_id):08d}")
        problems, x12_ok = await asyncio.to_thread(self._problems, numbered, timely_days)
        status = ClaimStatus.DRAFT
        if not problems and self._config.claims.auto_ready:
            status = ClaimStatus.READY
        probe = to_fhir(numbered, status="draft", created=self._store.now().isoformat())
        await asyncio.to_thread(fhir.validate, probe)
        now = fhir.utc_text(self._store.now())
        patient_key = self._store.patient_key(f"Patient/{data.patient_id}")

        def work(conn: sqlite3.Connection) -> int:
            claim_id = int(
                conn.execute("SELECT coalesce(max(id), 0) + 1 FROM claims").fetchone()[0]
            )
            final = numbered if claim_id == next_id else _with_number(data, f"Q{claim_id:08d}")
            resource_id, _ = self._insert_claim_resource(conn, final, "draft")
            conn.execute(
                f"INSERT INTO claims (id, claim_number, resource_id, encounter_id, patient_id, "  # noqa: S608 - constant
                f"site_id, service_date, form, payer_id, payer_kind, charge_cents, fee_cents, "
                f"status, problems, checked_at, x12_valid, override_by, override_at, created_at, "
                f"updated_at) VALUES ({','.join('?' * 20)})",
                (
                    claim_id,
                    final.claim_number,
                    resource_id,
                    data.encounter_id,
                    data.patient_id,
                    site_id,
                    day,
                    data.form.value,
                    data.payer.id,
                    data.payer.kind,
                    data.total_cents,
                    data.fee_cents,
                    status.value,
                    _problems_json(problems),
                    now,
                    None if x12_ok is None else int(x12_ok),
                    override_by,
                    now if override_by else None,
                    now,
                    now,
                ),
            )
            self._event(conn, claim_id, actor, None, ClaimStatus.DRAFT, reason, now)
            if status is ClaimStatus.READY:
                self._event(conn, claim_id, actor, ClaimStatus.DRAFT, status, "auto_ready", now)
            self._record_decision(
                conn,
                data.encounter_id,
                data.patient_id,
                day,
                DecisionOutcome.DRAFTED,
                reason,
                claim_id,
                actor,
                now,
            )
            return claim_id

        event = AuditEvent(
            actor,
            AuditAction.CREATE,
            patient_key=patient_key,
            entity="Claim Q3014",
            detail=f"draft for encounter {data.encounter_id}"
            + (" (duplicate override)" if override_by else ""),
        )
        claim_id = await self._store.transact(work, [event])
        return Decided(data.encounter_id, DecisionOutcome.DRAFTED, reason, claim_id)

    @staticmethod
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

    def _record_decision(
        self,
        conn: sqlite3.Connection,
        encounter_id: str,
        patient_id: str | None,
        day: str | None,
        outcome: DecisionOutcome,
        reason: str,
        claim_id: int | None,
        actor: str,
        now: str,
    ) -> None:
        conn.execute(
            "INSERT INTO claim_decisions (encounter_id, patient_id, service_date, site_id, "
            "outcome, reason, claim_id, decided_at, decided_by) VALUES (?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT (encounter_id) DO UPDATE SET outcome = excluded.outcome, "
            "reason = excluded.reason, claim_id = excluded.claim_id, "
            "decided_at = excluded.decided_at, decided_by = excluded.decided_by",
            (
                encounter_id,
                patient_id,
                day,
                self._config.site.id,
                outcome.value,
                reason,
                claim_id,
                now,
                actor,
            ),
        )

    async def _decide(
        self,
        encounter_id: str,
        patient_id: str | None,
        day: date | None,
        outcome: DecisionOutcome,
        reason: str,
        actor: str,
    ) -> Decided:
        now = fhir.utc_text(self._store.now())
        await self._store.transact(
            lambda conn: self._record_decision(
                conn,
                encounter_id,
                patient_id,
                None if day is None else day.isoformat(),
                outcome,
                reason,
                None,
                actor,
                now,
            )
        )
        return Decided(encounter_id, outcome, reason, None)

    # -- reading ---------------------------------------------------------------------------

    async def decision(self, encounter_id: str) -> Decided | None:
        """What was decided for an encounter, if anything."""
        rows = await self._store.query(
            "SELECT outcome, reason, claim_id FROM claim_decisions WHERE encounter_id = ?",
            (encounter_id,),
        )
        if not rows:
            return None
        outcome, reason, claim_id = rows[0]
        return Decided(encounter_id, DecisionOutcome(outcome), reason, claim_id)

    async def decisions(self, outcome: DecisionOutcome | None = None) -> list[Decided]:
        """Every decision (or those with one outcome), newest first."""
        where, params = ("WHERE outcome = ?", (outcome.value,)) if outcome else ("", ())
        rows = await self._store.query(
            f"SELECT encounter_id, outcome, reason, claim_id FROM claim_decisions {where} "  # noqa: S608 - constant
            "ORDER BY decided_at DESC",
            params,
        )
        return [Decided(e, DecisionOutcome(o), r, c) for e, o, r, c in rows]

    async def claims(
        self, statuses: Sequence[ClaimStatus] = (), ids: Sequence[int] = ()
    ) -> list[ClaimRow]:
        """Claims (filtered by status and/or id), oldest first. No PHI, so no audit record."""
        clauses, params = [], []
        if statuses:
            clauses.append(f"status IN ({','.join('?' * len(statuses))})")
            params += [s.value for s in statuses]
        if ids:
            clauses.append(f"id IN ({','.join('?' * len(ids))})")
            params += [str(i) for i in ids]
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self._store.query(
            f"SELECT {_CLAIM_COLUMNS} FROM claims {where} ORDER BY id",  # noqa: S608 - constant
            params,
        )
        return [_row(r) for r in rows]

    async def claim(self, claim_id: int) -> ClaimRow:
        """One claim's row."""
        found = await self.claims(ids=[claim_id])
        if not found:
            raise NotFoundError(f"no claim {claim_id}")
        return found[0]

    async def content(
        self,
        claim_ids: Sequence[int],
        actor: str,
        *,
        purpose: str = "read",
        unreadable: list[int] | None = None,
    ) -> list[tuple[int, int, dict[str, Any]]]:
        """``(claim id, resource row id, FHIR Claim)`` per claim, decrypted; audited per claim.

        A claim whose stored copy fails authentication raises :class:`TamperedDataError`,
        unless ``unreadable`` is given: its id is added there (logged and audited by the
        store) and the rest are returned, for work over many claims (:meth:`hold_unreadable`).
        """
        store = self._store
        marks = ",".join("?" * len(claim_ids))

        def work(
            conn: sqlite3.Connection,
        ) -> tuple[list[tuple[int, int, str, dict[str, Any]]], list[int], list[AuditEvent]]:
            rows = conn.execute(
                "SELECT c.id, c.patient_id, r.id, r.logical_id, r.type, r.key_version, r.body "  # noqa: S608 - placeholders
                f"FROM claims c JOIN resources r ON r.id = c.resource_id WHERE c.id IN ({marks}) "
                "ORDER BY c.id",
                list(claim_ids),
            ).fetchall()
            failures: list[AuditEvent] = []
            if unreadable is None:
                readable = [store.decrypt_stored(conn, tuple(r[2:])) for r in rows]
            else:
                readable = store.decrypt_readable(
                    conn, [tuple(r[2:]) for r in rows], actor, failures
                )
            by_row = {item.row_id: item.resource for item in readable}
            found = [
                (int(r[0]), int(r[2]), str(r[1]), by_row[int(r[2])])
                for r in rows
                if int(r[2]) in by_row
            ]
            bad = [int(r[0]) for r in rows if int(r[2]) not in by_row]
            return found, bad, failures

        found, bad, failures = await _run(store, work)
        if unreadable is not None:
            unreadable += bad
            if failures:
                await store.transact(lambda _conn: None, failures)
        missing = set(claim_ids) - {f[0] for f in found} - set(bad)
        if missing:
            raise NotFoundError(f"no claim {', '.join(str(i) for i in sorted(missing))}")
        leaves = purpose in ("export", "submission")
        action = AuditAction.EXPORT if leaves else AuditAction.READ
        events = [
            AuditEvent(
                actor,
                action,
                patient_key=store.patient_key(f"Patient/{patient_id}"),
                entity=f"Claim/{body['id']}",
                detail=purpose,
            )
            for _, _, patient_id, body in found
        ]
        await store.transact(lambda _conn: None, events)
        return [(claim_id, resource_id, body) for claim_id, resource_id, _, body in found]

    # -- moving a claim --------------------------------------------------------------------

    async def transition(
        self, claim_id: int, to: ClaimStatus, actor: str, detail: str | None = None
    ) -> ClaimRow:
        """Move a claim to ``to`` if the state machine allows it (for the lifecycle too)."""
        row = await self.claim(claim_id)
        if row.sending:
            raise ClaimsError(
                f"claim {row.claim_number} is being sent; wait for the answer (or in_review)"
            )
        if to not in TRANSITIONS[row.status]:
            raise ClaimsError(f"claim {row.claim_number}: cannot go from {row.status} to {to}")
        if to is ClaimStatus.READY and row.status is ClaimStatus.DRAFT and row.problems:
            raise ClaimsError(
                f"claim {row.claim_number} has {len(row.problems)} problem(s); fix them and run "
                "'appliance claims check' first"
            )
        now = fhir.utc_text(self._store.now())

        def work(conn: sqlite3.Connection) -> None:
            moved = conn.execute(
                "UPDATE claims SET status = ?, updated_at = ? WHERE id = ? AND status = ? "
                "AND sending_batch IS NULL",
                (to.value, now, claim_id, row.status.value),
            ).rowcount
            if moved != 1:
                raise ClaimsError(f"claim {row.claim_number} changed meanwhile; try again")
            self._event(conn, claim_id, actor, row.status, to, detail, now)

        await self._store.transact(work)
        return await self.claim(claim_id)

    async def hold_unreadable(self, claim_ids: Sequence[int], actor: str = ACTOR) -> None:
        """Take claims whose stored copy fails authentication out of the sending queue.

        Each goes back to draft with a problem a biller can act on (void it, draft it again),
        so one unreadable claim never holds back the others (``Lifecycle.due`` skips claims
        with problems). Nothing is sent for it: what it said is not known.
        """
        if claim_ids:
            logger.error(
                "%d claim(s) failed authentication and went back to draft: %s",
                len(claim_ids),
                ", ".join(str(i) for i in claim_ids),
            )
            await self._hold(dict.fromkeys(claim_ids, UNREADABLE_PROBLEM), actor, audited=False)

    async def hold_unbuildable(
        self, failed: Mapping[int, str], kind: str, actor: str = ACTOR
    ) -> list[int]:
        """Take claims that cannot be made into a submission out of the sending queue.

        ``failed``: claim id → the type of what building it raised. Each goes back to draft
        with the problem ``build`` (:func:`build_problem`), in its history and audited, so one
        such claim never holds back the others; nothing is sent for it. Returns those held
        (a claim being sent or no longer draft/ready meanwhile is left as it is).
        """
        if not failed:
            return []
        problems = {claim_id: build_problem(kind, error) for claim_id, error in failed.items()}
        held = await self._hold(problems, actor, audited=True)
        if held:
            # Ids and exception types only: the exception's text may quote the claim.
            logger.error(
                "%d claim(s) could not be made into a submission and went back to draft: %s",
                len(held),
                ", ".join(f"{i} ({failed[i]})" for i in held),
            )
        return held

    async def _hold(
        self, problems: Mapping[int, Problem], actor: str, *, audited: bool
    ) -> list[int]:
        """Back to draft with one problem each (draft or ready claims not being sent)."""
        now = fhir.utc_text(self._store.now())
        store = self._store
        # Filled inside the transaction, which appends the records after ``work`` (in it).
        events: list[AuditEvent] = []

        def work(conn: sqlite3.Connection) -> list[int]:
            held = []
            for claim_id, problem in problems.items():
                row = conn.execute(
                    "SELECT c.status, c.patient_id, r.logical_id FROM claims c "
                    "JOIN resources r ON r.id = c.resource_id "
                    "WHERE c.id = ? AND c.sending_batch IS NULL",
                    (claim_id,),
                ).fetchone()
                if row is None or row[0] not in {s.value for s in EDITABLE}:
                    continue
                before = ClaimStatus(row[0])
                conn.execute(
                    "UPDATE claims SET problems = ?, checked_at = ?, status = 'draft', "
                    "updated_at = ? WHERE id = ?",
                    (_problems_json([problem]), now, now, claim_id),
                )
                self._event(conn, claim_id, actor, before, ClaimStatus.DRAFT, problem.message, now)
                held.append(claim_id)
                if audited:
                    events.append(
                        AuditEvent(
                            actor,
                            AuditAction.UPDATE,
                            patient_key=store.patient_key(f"Patient/{row[1]}"),
                            entity=f"Claim/{row[2]}",
                            detail=f"held back from submission: problem {problem.code}",
                        )
                    )
            return held

        return await store.transact(work, events)

    async def recheck(self, claim_ids: Sequence[int] = (), actor: str = ACTOR) -> list[ClaimRow]:
        """Re-run every check on editable claims (all draft/ready ones when none are named).

        The site parts (billing provider, attending, charge) are rebuilt from the current
        config, so a corrected config fixes its claims; a changed claim is a new FHIR Claim
        (resources are append-only), the old one kept. A ready claim with problems goes back
        to draft. One that cannot be made into an X12 837 goes back to draft with the problem
        ``build`` (:meth:`hold_unbuildable`) and is returned too.
        """
        rows = [r for r in await self.claims(list(EDITABLE), claim_ids) if not r.sending]
        if not rows:
            return []
        unreadable: list[int] = []
        contents = await self.content(
            [r.id for r in rows], actor, purpose="check", unreadable=unreadable
        )
        await self.hold_unreadable(unreadable, actor)
        rows = [r for r in rows if r.id not in unreadable]
        # One that cannot be made into an 837 at all is held back, not checked (reading it
        # would raise and stop the check of every other claim).
        failed = {
            claim_id: error
            for (claim_id, _, body), row in zip(contents, rows, strict=True)
            if (error := self._x12_failure(row.form, body)) is not None
        }
        updated = [await self.claim(i) for i in await self.hold_unbuildable(failed, "x12", actor)]
        kept = [(c, r) for c, r in zip(contents, rows, strict=True) if c[0] not in failed]
        for (claim_id, _resource_id, body), row in kept:
            old = from_fhir(body)
            data = self._refresh_site(old)
            problems, x12_ok = await asyncio.to_thread(
                self._problems, data, self._timely_days(data)
            )
            now = fhir.utc_text(self._store.now())
            status = row.status
            if problems and status is ClaimStatus.READY:
                status = ClaimStatus.DRAFT

            def work(
                conn: sqlite3.Connection,
                claim_id: int = claim_id,
                data: ClaimData = data,
                old: ClaimData = old,
                problems: list[Problem] = problems,
                x12_ok: bool | None = x12_ok,
                status: ClaimStatus = status,
                before: ClaimStatus = row.status,
                now: str = now,
            ) -> None:
                if data != old:
                    resource_id, _ = self._insert_claim_resource(conn, data, "draft")
                    conn.execute(
                        "UPDATE claims SET resource_id = ?, charge_cents = ? WHERE id = ?",
                        (resource_id, data.total_cents, claim_id),
                    )
                conn.execute(
                    "UPDATE claims SET problems = ?, checked_at = ?, x12_valid = ?, status = ?, "
                    "updated_at = ? WHERE id = ? AND sending_batch IS NULL",
                    (
                        _problems_json(problems),
                        now,
                        None if x12_ok is None else int(x12_ok),
                        status.value,
                        now,
                        claim_id,
                    ),
                )
                if status is not before:
                    self._event(conn, claim_id, actor, before, status, "check failed", now)

            await self._store.transact(work)
            updated.append(await self.claim(claim_id))
        return updated

    def _x12_failure(self, form: str, body: dict[str, Any]) -> str | None:
        """What making this claim alone into an interchange of ``form`` raises (its type), or
        None when it can be made (the claim's row names the form its batch is sent as)."""
        try:
            interchange(self._envelope(1, 1), Form(form), [(from_fhir(body), 1)])
        except BUILD_ERRORS as exc:
            return type(exc).__name__
        return None

    def _refresh_site(self, data: ClaimData) -> ClaimData:
        site, claims = self._config.site, self._config.claims
        billing = BillingProvider(
            site.name,
            site.npi,
            site.tax_id,
            PostalAddress(
                site.address.lines, site.address.city, site.address.state, site.address.postal_code
            ),
        )
        attending = data.attending
        if data.form is Form.INSTITUTIONAL and claims.attending_npi:
            attending = Practitioner(
                claims.attending_npi, claims.attending_family or "", claims.attending_given or ""
            )
        return replace(data, billing=billing, attending=attending)

    async def override_duplicate(self, encounter_id: str, reason: str, actor: str) -> Decided:
        """Draft a second Q3014 for the same patient and day, because a person says so."""
        if len(reason.strip()) < 10:
            raise ClaimsError("give a reason of at least 10 characters for the override")
        known = await self.decision(encounter_id)
        if known is None or known.outcome is not DecisionOutcome.DUPLICATE:
            raise ClaimsError(f"encounter {encounter_id} was not held back as a duplicate")
        encounter = await self._store.read("Encounter", encounter_id, actor)
        await self._store.transact(
            lambda conn: conn.execute(
                "DELETE FROM claim_decisions WHERE encounter_id = ?", (encounter_id,)
            )
        )
        patient_id = (fhir.patient_reference(encounter) or "").removeprefix("Patient/")
        day = self._service_date(encounter)
        assert day is not None  # a duplicate was decided with its date
        patient = await self._store.read("Patient", patient_id, actor)
        payer, member = await self._payer(patient, None, actor)
        if payer is None:
            raise ClaimsError(member)
        decision = eligibility.decide(
            self._rules, self._config.site, self._config.claims, payer, day
        )
        if not decision.eligible:
            raise ClaimsError(decision.reason)
        codes = tuple(_coding_codes(encounter.get("reasonCode", []), ICD10_SYSTEM))
        data = self._build(
            encounter_id,
            patient_id,
            patient,
            payer,
            member,
            day,
            decision,
            codes,
            override_reason=reason.strip(),
        )
        return await self._draft(
            data,
            decision.timely_filing_days,
            f"duplicate override: {decision.reason}",
            actor,
            actor,
        )

    # -- the scan --------------------------------------------------------------------------

    async def scan(
        self,
        actor: str = ACTOR,
        *,
        batch: int = 200,
        since: datetime | None = None,
        settle: timedelta = timedelta(0),
    ) -> dict[DecisionOutcome, int]:
        """Decide every stored Encounter not decided yet (after a restart); idempotent.

        ``since``: only Encounters that started after it (the sync process looks back 30
        days, not through every arrival ever stored). ``settle``: a visit that ended less than
        this ago is left to the process finishing it, which decides it as it commits; deciding
        it here at the same moment would race that decision.
        """
        counts: dict[DecisionOutcome, int] = {}
        after = 0
        store = self._store
        since_text = None if since is None else fhir.utc_text(since)
        settled_before = store.now() - settle
        while True:

            def work(
                conn: sqlite3.Connection, after: int = after
            ) -> tuple[int, list[StoredResource], list[AuditEvent]]:
                rows = conn.execute(
                    "SELECT r.id, r.logical_id, r.type, r.key_version, r.body FROM resources r "
                    "WHERE r.type = 'Encounter' AND r.id > ? AND (? IS NULL OR r.effective >= ?) "
                    "AND NOT EXISTS (SELECT 1 FROM claim_decisions d "
                    "WHERE d.encounter_id = r.logical_id) ORDER BY r.id LIMIT ?",
                    (after, since_text, since_text, batch),
                ).fetchall()
                # An Encounter that fails authentication is left out (logged, audited): it
                # cannot be decided, and must not stop the scan for every other visit.
                failures: list[AuditEvent] = []
                found = store.decrypt_readable(conn, rows, actor, failures)
                return (int(rows[-1][0]) if rows else after), found, failures

            last, found, failures = await _run(store, work)
            if last == after:
                return counts
            events = [
                AuditEvent(actor, AuditAction.SEARCH, entity=f"Encounter claims scan x{len(found)}")
            ]
            await store.transact(lambda _conn: None, events + failures)
            after = last
            for item in found:
                encounter = item.resource
                if encounter.get("status") != "finished":
                    continue  # decided when it finishes (the upstream's newer version)
                if settle and not _ended_before(encounter, settled_before):
                    continue  # just finished: its own process is deciding it (next scan)
                try:
                    outcome = (await self.on_visit_finished(encounter, actor=actor)).outcome
                except ApplianceError as exc:
                    # E.g. its Patient fails authentication: left undecided (tried again at
                    # the next scan), and the visits after it are still decided.
                    logger.error("claims scan: a visit was not decided (%s)", type(exc).__name__)
                    continue
                counts[outcome] = counts.get(outcome, 0) + 1

    # -- exporting -------------------------------------------------------------------------

    async def export_x12(
        self, claim_ids: Sequence[int], actor: str, *, purpose: str = "export"
    ) -> str:
        """One interchange of these claims (one form) with fresh, persisted control numbers."""
        contents = await self.content(claim_ids, actor, purpose="export")
        datas = [
            (claim_id, resource_id, from_fhir(body)) for claim_id, resource_id, body in contents
        ]
        forms = {d.form for _, _, d in datas}
        if len(forms) != 1:
            raise ClaimsError("an interchange holds one form: export 837P and 837I claims apart")
        form = forms.pop()
        created = self._store.now().astimezone(self._zone).replace(second=0, microsecond=0)
        usage = "P" if self._config.claims.usage == "production" else "T"

        def work(conn: sqlite3.Connection) -> tuple[int, int, list[int]]:
            isa = _take(conn, "isa", 1)
            gs = _take(conn, "gs", 1)
            first_st = _take(conn, "st", len(datas)) - len(datas) + 1
            cur = conn.execute(
                "INSERT INTO claim_batches (interchange_control, group_control, form, usage, "
                "purpose, created_at, created_by, claim_count) VALUES (?,?,?,?,?,?,?,?)",
                (isa, gs, form.value, usage, purpose, created.isoformat(), actor, len(datas)),
            )
            batch_id = int(cur.lastrowid or 0)
            sts = [first_st + n for n in range(len(datas))]
            conn.executemany(
                "INSERT INTO claim_batch_items (batch_id, claim_id, resource_id, st_control) "
                "VALUES (?,?,?,?)",
                [(batch_id, c, r, st) for (c, r, _), st in zip(datas, sts, strict=True)],
            )
            return isa, gs, sts

        isa, gs, sts = await self._store.transact(work)
        envelope = self._envelope(isa, gs, created)
        return interchange(
            envelope, form, [(d, st) for (_, _, d), st in zip(datas, sts, strict=True)]
        )

    async def export_fhir(self, claim_ids: Sequence[int], actor: str) -> dict[str, Any]:
        """A collection Bundle of the FHIR Claims (audited as an export)."""
        contents = await self.content(claim_ids, actor, purpose="export")
        rows = {r.id: r for r in await self.claims(ids=claim_ids)}
        entries = []
        for claim_id, _resource_id, body in contents:
            claim = dict(body)
            claim["status"] = "draft" if rows[claim_id].status in EDITABLE else "active"
            entries.append({"fullUrl": f"urn:uuid:{claim['id']}", "resource": claim})
        return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def _take(conn: sqlite3.Connection, name: str, count: int) -> int:
    """Advance a control number by ``count``; returns the last one taken (wraps at 10^9)."""
    row = conn.execute("SELECT value FROM claim_control_numbers WHERE name = ?", (name,)).fetchone()
    value = (0 if row is None else int(row[0])) + count
    if value > 999_999_999:
        value = count  # ISA13 is 9 digits; a box will not issue a billion interchanges
    conn.execute(
        "INSERT INTO claim_control_numbers (name, value) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (name, value),
    )
    return value


async def _run(store: Store, work: Callable[[sqlite3.Connection], T]) -> T:
    return await db.run_sync(store.connection, work)


def _with_number(data: ClaimData, number: str) -> ClaimData:
    return replace(data, claim_number=number)


def _ended_before(encounter: Mapping[str, Any], moment: datetime) -> bool:
    """Whether the Encounter's period ended before ``moment`` (no readable end: it did)."""
    period = encounter.get("period")
    ended = fhir.instant(period.get("end") if isinstance(period, Mapping) else None)
    return ended is None or ended < moment


def _problems_json(problems: Sequence[Problem]) -> str:
    return json.dumps([{"code": p.code, "message": p.message} for p in problems])
