"""Child of the kill -9 test: ingests readings and prints each logical id after COMMIT returns."""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

from appliance.store import Store
from tests import factories


async def main(db_path: Path, kek_path: Path, patient_ref: str, seed: int) -> None:
    rng = random.Random(seed)
    store = await Store.open(db_path, kek_path)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    while True:
        batch = [
            factories.bp_observation(patient_ref, systolic=rng.randint(90, 180))
            for _ in range(rng.choice((1, 1, 5, 20)))
        ]
        stored = await store.create(batch, "service:devices", validate=False)
        # Acknowledged only now: the commit has returned.
        sys.stdout.write("".join(f"{item.logical_id}\n" for item in stored))
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
