"""Q3014 claims: trigger, eligibility, fee schedule, X12 (pyx12), FHIR, checks, control numbers.

Real SQLite store, real pyx12; every name, NPI and MBI is synthetic (check digits computed).
"""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance import config as site_config
from appliance import fhir
from appliance.config import Config, npi_is_valid
from appliance.store import Store
from services.claims import checks, eligibility
from services.claims.fhir_claim import MBI_SYSTEM, from_fhir
from services.claims.model import ClaimStatus, DecisionOutcome
from services.claims.service import ClaimsError, ClaimsService
from services.claims.x12_validation import validate_x12

NOW = datetime(2026, 3, 10, 15, 0, tzinfo=UTC)
MBI_LETTERS = "ACDEFGHJKMNPQRTUVWXY"


def make_npi(rng: random.Random) -> str:
    base = "1" + "".join(str(rng.randrange(10)) for _ in range(8))
    return next(base + str(d) for d in range(10) if npi_is_valid(base + str(d)))


def make_mbi(rng: random.Random) -> str:
    digit, letter = "0123456789", MBI_LETTERS
    either = letter + digit
    shape = [
        "123456789",
        letter,
        either,
        digit,
        letter,
        either,
        digit,
        letter,
        letter,
        digit,
        digit,
    ]
    return "".join(rng.choice(chars) for chars in shape)


RNG = random.Random(8)
SITE_NPI, ATTENDING_NPI = make_npi(RNG), make_npi(RNG)
MBI = make_mbi(RNG)


def site_doc(site_type: str = "office", rural: bool = True, **claims: Any) -> Config:
    data = {
        "site": {
            "id": "test-clinic",
            "name": "Test Clinic",
            "type": site_type,
            "npi": SITE_NPI,
            "tax_id": "12-3456789",
            "timezone": "America/Chicago",
            "rural": rural,
            "address": {
                "lines": ["1 Test Way"],
                "city": "Testville",
                "state": "KS",
                "postal_code": "67999-1234",
            },
        },
        "paths": {"data_dir": "/tmp/unused"},
        "claims": {
            "enabled": True,
            "submitter_id": "SUBMIT01",
            "contact_name": "Billing Office",
            "contact_phone": "5555550100",
            "receiver_name": "Test Clearinghouse",
            "receiver_id": "RECV01",
            "attending_npi": ATTENDING_NPI,
            "attending_family": "Exampledoc",
            "attending_given": "Jane",
            "payer": [{"id": "MAC01", "name": "Test MAC", "kind": "medicare"}],
            **claims,
        },
    }
    return site_config.parse(data, environ={})


def patient(mbi: str = MBI) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": MBI_SYSTEM, "value": mbi}],
        "name": [{"family": "Zzyzxtestperson", "given": ["Ada"]}],
        "gender": "female",
        "birthDate": "1950-04-09",
        "address": [
            {"line": ["9 Sample Rd"], "city": "Testville", "state": "KS", "postalCode": "67999"}
        ],
    }


def encounter(patient_id: str, *, at_site: bool = True, start: str = "2026-03-02T10:00:00-06:00"):
    body: dict[str, Any] = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "VR"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "period": {"start": start, "end": start},
        "reasonCode": [
            {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "R06.00"}]}
        ],
    }
    if at_site:
        body["location"] = [{"location": {"reference": "Location/test-clinic"}}]
    return body


@pytest.fixture
async def clocked(db_path: Path, kek_path: Path):
    opened = await Store.open(db_path, kek_path, clock=lambda: NOW)
    try:
        yield opened
    finally:
        await opened.close()


async def seeded(store: Store, cfg: Config, **enc: Any) -> tuple[ClaimsService, dict[str, Any]]:
    [pat] = await store.create([patient()], "user:test")
    [stored] = await store.create([encounter(pat.logical_id, **enc)], "user:test")
    return ClaimsService(store, cfg), stored.resource


@pytest.mark.parametrize(
    ("site_type", "form", "code"),
    [
        ("office", "837P", "SV1*HC:Q3014*31.85*UN*1***1"),
        ("hospital_outpatient", "837I", "SV2*0780*HC:Q3014*31.85*UN*1"),
        ("rhc", "837I", "CLM*Q00000001*31.85***71:A:1"),
        ("fqhc", "837I", "77:A:1"),
        ("cah", "837I", "85:A:1"),
    ],
)
async def test_every_site_type_drafts_a_claim_that_passes_pyx12(
    clocked: Store, site_type: str, form: str, code: str
) -> None:
    service, enc = await seeded(clocked, site_doc(site_type))
    decided = await service.on_visit_finished(enc)
    assert decided.outcome is DecisionOutcome.DRAFTED, decided.reason
    [row] = await service.claims()
    assert (row.form, row.status, row.problems, row.x12_valid) == (
        form,
        ClaimStatus.DRAFT,
        (),
        True,
    )
    assert (row.charge_cents, row.fee_cents, row.service_date) == (3185, 3185, "2026-03-02")
    text = await service.export_x12([row.id], "user:biller")
    assert code in text
    assert "HI*ABK:R0600" in text
    result = validate_x12(text)
    assert result.valid, result.errors
    assert "AK9*A*1*1*1" in result.ack


async def test_patient_at_home_gets_no_claim_and_the_reason_is_kept(clocked: Store) -> None:
    service, enc = await seeded(clocked, site_doc(), at_site=False)
    decided = await service.on_visit_finished(enc)
    assert decided.outcome is DecisionOutcome.NOT_AT_SITE
    assert await service.claims() == []
    assert [d.outcome for d in await service.decisions(DecisionOutcome.NOT_AT_SITE)] == [
        DecisionOutcome.NOT_AT_SITE
    ]
    # the explicit flag wins over the missing location
    [other] = await clocked.create(
        [encounter(enc["subject"]["reference"][8:], at_site=False)], "user:t"
    )
    assert (await service.on_visit_finished(other.resource, patient_at_site=True)).outcome is (
        DecisionOutcome.DRAFTED
    )


async def test_non_rural_site_outside_the_waiver_is_not_eligible(clocked: Store) -> None:
    service, enc = await seeded(clocked, site_doc(rural=False), start="2028-01-05T10:00:00-06:00")
    decided = await service.on_visit_finished(enc)
    assert decided.outcome is DecisionOutcome.NOT_ELIGIBLE
    assert "no geographic waiver covers 2028-01-05" in decided.reason


async def test_one_q3014_per_patient_per_day_unless_a_person_overrides(clocked: Store) -> None:
    service, first = await seeded(clocked, site_doc())
    patient_id = first["subject"]["reference"].removeprefix("Patient/")
    [second] = await clocked.create(
        [encounter(patient_id, start="2026-03-02T15:00:00-06:00")], "user:t"
    )
    assert (await service.on_visit_finished(first)).outcome is DecisionOutcome.DRAFTED
    dup = await service.on_visit_finished(second.resource)
    assert dup.outcome is DecisionOutcome.DUPLICATE
    assert "Q00000001 already bills Q3014" in dup.reason
    with pytest.raises(ClaimsError, match="reason"):
        await service.override_duplicate(second.logical_id, "because", "user:biller")
    done = await service.override_duplicate(
        second.logical_id, "two separate visits, provider confirmed", "user:biller"
    )
    assert done.outcome is DecisionOutcome.DRAFTED
    rows = await service.claims()
    assert [r.overridden for r in rows] == [False, True]
    audit = await clocked.query(
        "SELECT actor, action, detail FROM audit WHERE detail LIKE '%override%'"
    )
    assert audit == [
        ("user:biller", "create", f"draft for encounter {second.logical_id} (duplicate override)")
    ]
    [(_, _, body)] = await service.content([rows[1].id], "user:biller")
    assert from_fhir(body).override_reason == "two separate visits, provider confirmed"


async def test_scan_after_restart_is_idempotent(clocked: Store) -> None:
    cfg = site_doc()
    [pat] = await clocked.create([patient()], "user:test")
    await clocked.create(
        [
            encounter(pat.logical_id, start="2026-03-02T10:00:00-06:00"),
            encounter(pat.logical_id, start="2026-03-03T10:00:00-06:00", at_site=False),
            {
                **encounter(pat.logical_id, start="2026-03-04T10:00:00-06:00"),
                "status": "in-progress",
            },
            encounter(pat.logical_id, start="2026-03-05T10:00:00-06:00"),
        ],
        "user:test",
    )
    service = ClaimsService(clocked, cfg)
    counts = await service.scan()
    assert counts == {DecisionOutcome.DRAFTED: 2, DecisionOutcome.NOT_AT_SITE: 1}
    assert await service.scan() == {}
    assert len(await service.claims()) == 2


async def test_claim_phi_is_encrypted_at_rest(clocked: Store, db_path: Path) -> None:
    service, enc = await seeded(clocked, site_doc())
    await service.on_visit_finished(enc)
    raw = b"".join(p.read_bytes() for p in db_path.parent.glob("appliance.db*"))
    assert b"ZZYZXTESTPERSON" not in raw.upper()
    assert MBI.encode() not in raw


async def test_control_numbers_are_persisted_and_increase(clocked: Store) -> None:
    service, enc = await seeded(clocked, site_doc())
    await service.on_visit_finished(enc)
    seen = []
    for _ in range(3):
        text = await service.export_x12([1], "user:biller")
        isa = text.split("~")[0].split("*")
        st_ = next(s for s in text.split("~\n") if s.startswith("ST*")).split("*")
        gs = next(s for s in text.split("~\n") if s.startswith("GS*")).split("*")
        seen.append((int(isa[13]), int(gs[6]), int(st_[2])))
    assert seen == [(1, 1, 1), (2, 2, 2), (3, 3, 3)]
    reopened = ClaimsService(clocked, site_doc())
    text = await reopened.export_x12([1], "user:biller")
    assert text.split("~")[0].split("*")[13] == "000000004"


async def test_a_batch_of_claims_is_one_valid_interchange(clocked: Store) -> None:
    cfg = site_doc("rhc")
    service = ClaimsService(clocked, cfg)
    for n in range(5):
        [pat] = await clocked.create([patient(make_mbi(RNG))], "user:test")
        [enc] = await clocked.create(
            [encounter(pat.logical_id, start=f"2026-03-0{n + 1}T10:00:00-06:00")], "user:t"
        )
        await service.on_visit_finished(enc.resource)
    ids = [r.id for r in await service.claims()]
    text = await service.export_x12(ids, "user:biller")
    assert text.count("ST*837*") == 5
    assert "GE*5*1~" in text
    assert validate_x12(text).valid


async def test_fhir_export_is_a_valid_claim(clocked: Store) -> None:
    service, enc = await seeded(clocked, site_doc("hospital_outpatient"))
    await service.on_visit_finished(enc)
    bundle = await service.export_fhir([1], "user:biller")
    claim = bundle["entry"][0]["resource"]
    fhir.validate(claim)
    assert claim["subType"]["coding"][0]["code"] == "131"
    assert claim["item"][0]["revenue"]["coding"][0]["code"] == "0780"
    assert claim["patient"]["identifier"] == {"system": MBI_SYSTEM, "value": MBI}
    exports = await clocked.query("SELECT count(*) FROM audit WHERE action = 'export'")
    assert exports == [(1,)]


async def test_broken_claims_are_caught_before_submission(clocked: Store) -> None:
    service, enc = await seeded(clocked, site_doc())
    await service.on_visit_finished(enc)
    [(_, _, body)] = await service.content([1], "user:test")
    good = from_fhir(body)
    today = date(2026, 3, 10)
    at: dict[str, Any] = {"today": today, "timely_filing_days": 365}
    assert checks.check(good, today=today, timely_filing_days=365) == []
    broken = {
        "npi": replace(good, billing=replace(good.billing, npi="1234567890")),
        "mbi": replace(good, subscriber=replace(good.subscriber, member_id="1EG4-TE5-MK73")),
        "totals": replace(good, total_cents=good.total_cents + 1),
        "dates": replace(good, service_date=date(2026, 4, 1)),
        "diagnosis": replace(good, diagnoses=()),
        "site-data": replace(
            good,
            billing=replace(
                good.billing, address=replace(good.billing.address, postal_code="67999")
            ),
        ),
    }
    for code, claim in broken.items():
        found = checks.check(claim, today=today, timely_filing_days=365)
        assert code in {p.code for p in found}, code
    # U codes are ICD-10-CM too (U07.1 COVID-19, U09.9 post-COVID); a made-up shape is not.
    assert checks.check(replace(good, diagnoses=("U071", "U099")), **at) == []
    wrong = checks.check(replace(good, diagnoses=("I10", "1A2")), **at)
    assert [p.message for p in wrong] == ["diagnosis 2: not an ICD-10-CM code"]
    late = checks.check(good, today=date(2027, 3, 10), timely_filing_days=365)
    assert [p.message for p in late] == [
        "past the timely filing limit (365 days after the date of service)"
    ]


async def test_a_fixed_config_clears_the_problem_and_ready_needs_no_problems(
    clocked: Store,
) -> None:
    service, enc = await seeded(clocked, site_doc("rhc", attending_npi=None))
    await service.on_visit_finished(enc)
    [row] = await service.claims()
    assert [p.code for p in row.problems] == ["site-data"]
    with pytest.raises(ClaimsError, match="problem"):
        await service.transition(row.id, ClaimStatus.READY, "user:biller")
    fixed = ClaimsService(clocked, site_doc("rhc"))
    [again] = await fixed.recheck()
    assert again.problems == ()
    ready = await fixed.transition(row.id, ClaimStatus.READY, "user:biller")
    assert ready.status is ClaimStatus.READY
    with pytest.raises(ClaimsError, match="cannot go"):
        await fixed.transition(row.id, ClaimStatus.PAID, "user:biller")


async def test_auto_ready_when_the_site_allows(clocked: Store) -> None:
    service, enc = await seeded(clocked, site_doc(auto_ready=True))
    await service.on_visit_finished(enc)
    assert [r.status for r in await service.claims()] == [ClaimStatus.READY]


def test_fee_schedule_by_date_of_service_and_config_charge() -> None:
    rules = eligibility.load_rules()
    fees = {y: rules.fee_on(date(y, 6, 1)) for y in (2024, 2025, 2026)}
    assert {y: f.amount for y, f in fees.items() if f} == {
        2024: Decimal("29.96"),
        2025: Decimal("31.01"),
        2026: Decimal("31.85"),
    }
    assert rules.fee_on(date(2023, 12, 31)) is None
    cfg = site_doc(charge="45.00")
    payer = cfg.claims.payers[0]
    decision = eligibility.decide(rules, cfg.site, cfg.claims, payer, date(2025, 2, 1))
    assert (decision.fee_cents, decision.charge_cents) == (3101, 4500)


def test_medicaid_without_a_state_rule_is_refused_with_its_reason() -> None:
    cfg = site_doc(payer=[{"id": "KSMCD", "name": "Test Medicaid", "kind": "medicaid"}])
    decision = eligibility.decide(
        eligibility.load_rules(), cfg.site, cfg.claims, cfg.claims.payers[0], date(2026, 3, 2)
    )
    assert not decision.eligible
    assert decision.reason.startswith("Medicaid in KS: no rule")


def test_claims_config_lists_every_missing_key() -> None:
    with pytest.raises(site_config.ConfigError) as caught:
        site_config.parse(
            {
                **_minimal(),
                "claims": {"enabled": True, "payer": [{"id": "P1", "kind": "commercial"}]},
            },
            environ={},
        )
    problems = caught.value.problems
    assert "claims.receiver_id: required when claims.enabled is true" in problems
    assert "claims.payer[0].name: required" in problems
    assert "claims.payer[0].pays_q3014: required when kind is 'commercial'" in problems


def _minimal() -> dict[str, Any]:
    import tomllib

    from tests.factories import SITE_TOML

    return tomllib.loads(SITE_TOML)


@given(st.text(alphabet="0123456789", min_size=9, max_size=9))
def test_exactly_one_check_digit_makes_an_npi(base: str) -> None:
    valid = [d for d in range(10) if npi_is_valid(base + str(d))]
    assert len(valid) == 1


@given(st.integers(min_value=0, max_value=2**32))
def test_generated_mbis_pass_and_a_forbidden_letter_fails(seed: int) -> None:
    mbi = make_mbi(random.Random(seed))
    assert checks.mbi_is_valid(mbi)
    for bad in ("S", "L", "O", "I", "B", "Z"):
        assert not checks.mbi_is_valid(mbi[0] + bad + mbi[2:])
    assert not checks.mbi_is_valid(mbi[:4] + "-" + mbi[4:])
    assert not checks.mbi_is_valid("0" + mbi[1:])


@given(st.text(min_size=0, max_size=12))
def test_mbi_checker_never_accepts_the_wrong_length(text: str) -> None:
    if len(text) != 11:
        assert not checks.mbi_is_valid(text)


async def test_cli_lists_checks_and_exports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tomllib

    from appliance.cli import init_site, main
    from tests.factories import SITE_TOML

    text = (
        SITE_TOML.replace('npi = "1234567893"', f'npi = "{SITE_NPI}"')
        .replace('postal_code = "79999"', 'postal_code = "79999-1234"')
        .replace('type = "office"', 'type = "office"\nrural = true')
    )
    text += (
        '\n[claims]\nenabled = true\nsubmitter_id = "SUBMIT01"\ncontact_name = "Billing"\n'
        'contact_phone = "5555550100"\nreceiver_name = "House"\nreceiver_id = "RECV01"\n'
        '[[claims.payer]]\nid = "MAC01"\nname = "Test MAC"\nkind = "medicare"\n'
    )
    path = tmp_path / "site.toml"
    path.write_text(text)
    cfg = site_config.load(path, environ={})
    assert tomllib.loads(text)["claims"]["enabled"]
    init_site(cfg, dev_key=True)
    store = await Store.open(cfg.paths.database, cfg.keys.kek_file)
    try:
        service, enc = await seeded(store, cfg)
        await service.on_visit_finished(enc, diagnoses=["I10"])
    finally:
        await store.close()
    args = ["--config", str(path)]
    import asyncio

    def run(*argv: str) -> int:
        return asyncio.get_running_loop().run_in_executor(None, main, [*argv[:2], *args, *argv[2:]])  # type: ignore[return-value]

    assert await run("claims", "list") == 0
    assert "Q00000001  draft" in capsys.readouterr().out
    out = tmp_path / "batch.x12"
    assert (
        await run("claims", "export", "--format", "x12-837p", "--include-drafts", "-o", str(out))
        == 0
    )
    assert validate_x12(out.read_text()).valid
    assert await run("claims", "export", "--format", "x12-837i", "--claim", "1") == 2
    assert "not 837I claims" in capsys.readouterr().err
    assert await run("claims", "check") == 0
