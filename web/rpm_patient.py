"""Remote patient monitoring: one patient's trend charts, enrolment and thresholds (issue 4; being built)."""

from __future__ import annotations

from quart import Blueprint

bp = Blueprint("rpm_patient", __name__, url_prefix="/rpm/patients")
