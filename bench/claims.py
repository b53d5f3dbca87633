"""Q3014 claims: claims generated and validated per second, and a busy clinic's month end to end.

1. **Claims generated + validated per second**: for N drafted claims (an RHC, 837I), our
   pre-submission checks plus the X12 rendering plus pyx12 validation of each claim's own
   interchange. Same-run baseline: pyx12 validation alone of the very same interchanges
   (the floor: we cannot validate faster than pyx12 reads). Ratio = ours / baseline.
2. **A month of a busy clinic, end to end**: 40 telehealth visits a day x 22 days, each a
   stored Patient + finished VR Encounter on a real encrypted store; the figure is the
   wall time of encounter → eligibility → draft (FHIR Claim encrypted, checks incl. pyx12)
   for all of them, then one X12 batch of the month exported and validated by pyx12.

    python bench/claims.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.keys import generate_kek_file
from appliance.store import Store
from services.claims import checks
from services.claims.fhir_claim import from_fhir
from services.claims.service import ClaimsService
from services.claims.x12 import interchange
from services.claims.x12_validation import validate_x12
from tests.services.test_claims import encounter, make_mbi, patient, site_doc

NOW = datetime(2026, 3, 31, 23, 0, tzinfo=UTC)


def emit(figure: str, value: float, unit: str, **extra: Any) -> dict[str, Any]:
    row = {"figure": figure, "value": round(value, 3), "unit": unit, **extra}
    print(json.dumps(row), flush=True)
    return row


async def month(tmp: Path, per_day: int, days: int) -> tuple[ClaimsService, Store, float, int]:
    kek = tmp / "kek"
    generate_kek_file(kek)
    store = await Store.open(tmp / "bench.db", kek, clock=lambda: NOW)
    service = ClaimsService(store, site_doc("rhc"))
    rng = random.Random(3014)
    patients = await store.create(
        [patient(make_mbi(rng)) for _ in range(per_day * 4)], "user:bench"
    )
    encounters = []
    day = date(2026, 3, 2)
    for _ in range(days):
        while day.weekday() >= 5:
            day += timedelta(days=1)
        for n in range(per_day):
            who = patients[(n + day.day * 7) % len(patients)].logical_id
            encounters.append(
                encounter(who, start=f"{day.isoformat()}T{8 + n % 9:02d}:{n % 60:02d}:00-05:00")
            )
        day += timedelta(days=1)
    stored = await store.create(encounters, "service:web")
    start = time.perf_counter()
    drafted = 0
    for item in stored:
        drafted += (await service.on_visit_finished(item.resource)).claim_id is not None
    ids = [r.id for r in await service.claims()]
    text = await service.export_x12(ids, "user:bench")
    ok = validate_x12(text).valid
    elapsed = time.perf_counter() - start
    assert ok, "the month's interchange failed pyx12"
    return service, store, elapsed, drafted


async def main(quick: bool) -> None:
    per_day, days = (10, 5) if quick else (40, 22)
    with tempfile.TemporaryDirectory() as folder:
        service, store, elapsed, drafted = await month(Path(folder), per_day, days)
        visits = per_day * days
        emit(
            "claims: a busy clinic's month end to end (encounter → eligibility → draft → checks "
            "→ X12 batch → pyx12)",
            elapsed, "s", visits=visits, drafted=drafted,
            per_visit_ms=round(elapsed / visits * 1000, 2), goal="< 60 s", met=elapsed < 60,
        )  # fmt: skip
        rows = await service.claims()
        sample = rows[: 50 if quick else 200]
        datas = [
            from_fhir(b) for _, _, b in await service.content([r.id for r in sample], "user:bench")
        ]
        envelope = service._envelope(1, 1)
        texts = [interchange(envelope, d.form, [(d, 1)]) for d in datas]
        start = time.perf_counter()
        for text in texts:
            validate_x12(text)
        base = time.perf_counter() - start
        start = time.perf_counter()
        for d in datas:
            checks.check(d, today=date(2026, 3, 31), timely_filing_days=365)
            assert validate_x12(interchange(envelope, d.form, [(d, 1)])).valid
        ours = time.perf_counter() - start
        rate, base_rate = len(datas) / ours, len(datas) / base
        emit(
            "claims generated + validated per second (checks + X12 + pyx12)", rate, "claims/s",
            baseline=round(base_rate, 1), ratio=round(rate / base_rate, 3), goal="ratio >= 0.8",
            met=rate / base_rate >= 0.8,
        )  # fmt: skip
        await store.close()
    sys.stderr.write(f"month: {elapsed:.1f} s for {per_day * days} visits; {rate:.1f} claims/s "
                     f"(pyx12 alone {base_rate:.1f}/s)\n")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    asyncio.run(main(parser.parse_args().quick))
