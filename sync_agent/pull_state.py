"""Where the pull stands, in the database: its cursors, the Patients refused to it, and
what of the upstream's is held here. Run on the store connection's thread."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson

from appliance import db, fhir
from appliance.store import UpstreamLink, link_for_resource, resource_for_upstream
from sync_agent.pull_answers import Cursor, copy_of, last_updated

# A Patient refused to the pull or left out of its answer is asked again after a wait that
# doubles at each miss, from a minute (a replica lagging) to a day (deleted or merged at the
# EHR): one that never comes costs a request a day, not one a pass (60 s) for ever.
FIRST_WAIT_S = 60.0
LONGEST_WAIT_S = 86_400.0
_DUE_NOW = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Missed:
    """A Patient refused to the pull, or asked for by id and not answered: asked again (alone)
    from ``due``; ``misses`` in a row so far."""

    due: datetime
    misses: int = 0


def missed_again(previous: Missed | None, now: datetime) -> Missed:
    """``previous`` after one more miss at ``now``: asked again after twice the last wait."""
    misses = 1 if previous is None else previous.misses + 1
    wait = min(FIRST_WAIT_S * 2 ** min(misses - 1, 32), LONGEST_WAIT_S)
    return Missed(now + timedelta(seconds=wait), misses)


def _refused_key(upstream: str) -> str:
    return f"pull.refused_patients.{upstream}"


def load_refused(conn: sqlite3.Connection, upstream: str) -> dict[str, Missed]:
    """The upstream Patients refused to the pull or missing from its answers, and when each
    is due again (an altered row reads as none). The list releases before this one saved
    reads as all due now."""
    try:
        found = orjson.loads(db.meta_value(conn, _refused_key(upstream)) or "[]")
    except (TypeError, orjson.JSONDecodeError):
        return {}
    if isinstance(found, list):
        return {r: Missed(_DUE_NOW) for r in found if isinstance(r, str)}
    if not isinstance(found, dict):
        return {}
    missed = {}
    for ref, value in found.items():
        entry = value if isinstance(value, dict) else {}
        due = fhir.instant(entry.get("due"))
        misses = entry.get("misses")
        count = misses if isinstance(misses, int) and not isinstance(misses, bool) else 0
        missed[ref] = Missed(due or _DUE_NOW, max(count, 0))
    return missed


def save_refused(conn: sqlite3.Connection, upstream: str, missed: Mapping[str, Missed]) -> None:
    """Keep ``missed`` (upstream references, a time and a count: no PHI) across restarts."""
    value = {
        ref: {"due": fhir.utc_text(m.due), "misses": m.misses} for ref, m in sorted(missed.items())
    }
    with db.transaction_sync(conn):
        db.set_meta(conn, _refused_key(upstream), orjson.dumps(value).decode())


def load_cursor(conn: sqlite3.Connection, upstream: str, stream: str) -> Cursor:
    row = conn.execute(
        "SELECT since, seen FROM pull_cursors WHERE upstream = ? AND stream = ?",
        (upstream, stream),
    ).fetchone()
    if row is None:
        return Cursor()
    return Cursor(row[0], frozenset(orjson.loads(row[1])))


def save_cursor(
    conn: sqlite3.Connection, upstream: str, stream: str, cursor: Cursor, now: datetime
) -> None:
    conn.execute(
        "INSERT INTO pull_cursors (upstream, stream, since, seen, updated_at) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (upstream, stream) DO UPDATE SET "
        "since = excluded.since, seen = excluded.seen, updated_at = excluded.updated_at",
        (
            upstream,
            stream,
            cursor.since,
            orjson.dumps(sorted(cursor.seen)).decode(),
            fhir.utc_text(now),
        ),
    )


def enrolled_upstream_refs(conn: sqlite3.Connection) -> list[str]:
    """Upstream references of the patients with a home device (known upstream only)."""
    refs = []
    for (patient_id,) in conn.execute(
        "SELECT DISTINCT patient_id FROM devices WHERE setting = 'home' "
        "AND patient_id IS NOT NULL AND retired_at IS NULL ORDER BY patient_id"
    ).fetchall():
        row = conn.execute(
            "SELECT id FROM resources WHERE logical_id = ? AND type = 'Patient'", (patient_id,)
        ).fetchone()
        link = None if row is None else link_for_resource(conn, int(row[0]))
        if link is not None:
            refs.append(link.upstream_ref)
    return refs


def held_link(conn: sqlite3.Connection, ref: str) -> UpstreamLink | None:
    """The link of the local resource that is upstream ``ref`` (None: not held here)."""
    local = resource_for_upstream(conn, ref)
    return None if local is None else link_for_resource(conn, local[0])


def not_held(conn: sqlite3.Connection, resources: list[fhir.FhirJson]) -> list[fhir.FhirJson]:
    """Those of ``resources`` not held here at that version or a newer one (a resource of
    ours delivered upstream, whose upstream time is not recorded, counts as held)."""
    missing = []
    for resource in resources:
        link = held_link(conn, copy_of(resource).reference)
        held = None if link is None else fhir.instant(link.last_updated)
        seen = fhir.instant(last_updated(resource))
        if link is None or (held is not None and seen is not None and held < seen):
            missing.append(resource)
    return missing


def known_versions(conn: sqlite3.Connection, refs: list[str]) -> dict[str, str | None]:
    """Upstream ref → ``lastUpdated`` of the version held here (None: not held, or unknown)."""
    links = {ref: held_link(conn, ref) for ref in refs}
    return {ref: None if link is None else link.last_updated for ref, link in links.items()}
