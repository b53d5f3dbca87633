"""Remote patient monitoring: the nurse's worklist of alerts (issue 4; being built)."""

from __future__ import annotations

from quart import Blueprint

bp = Blueprint("rpm", __name__, url_prefix="/rpm")
