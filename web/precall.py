"""The pre-call check: camera, microphone, speaker and the network, before a provider is paged.

``GET /precall/`` is run on the browser that will carry the visit (the exam-room station
with the nurse, or a provider's own machine). The page (``static/precall.js``) checks, in
the browser:

* **camera and microphone**: ``getUserMedia`` with a live preview and a level meter;
* **speaker**: a short tone, and the person says whether they heard it;
* **the network to the box**: round trips to ``/precall/ping`` (median of 10), then a
  download from ``GET /precall/sample`` (1 MiB) and an upload of 1 MiB to
  ``POST /precall/sample`` (in 64 KiB pieces, four at a time: the app's request cap), timed;

and ``GET /precall/upstream`` says how the box's own link to the upstream looks, from what
the sync process publishes (``sync_agent.status``): online or not, the last successful
delivery, and the round trip of its last ``HEAD metadata`` to the upstream.

Nothing here touches patient data; the samples are random bytes, never stored, bounded
(:data:`MAX_SAMPLE_BYTES` down, the app's 64 KiB request cap up), and every answer is
``no-store`` so a cache cannot fake a fast link. Staff only (nurses, providers, admins):
see ``web/policy.py``.
"""

from __future__ import annotations

import os

from quart import Blueprint, Response, abort, request
from quart.typing import ResponseReturnValue

from appliance import db
from sync_agent import status
from web.app import app_state
from web.auth import login_required
from web.templating import render_template

bp = Blueprint("precall", __name__, url_prefix="/precall")

MAX_SAMPLE_BYTES = 4 * 1024 * 1024
DEFAULT_SAMPLE_BYTES = 1024 * 1024


@bp.get("/")
@login_required()
async def page() -> ResponseReturnValue:
    """The check page; everything is measured by its script."""
    return await render_template("precall.html")


@bp.get("/ping")
@login_required()
async def ping() -> ResponseReturnValue:
    """An empty answer: the browser times the round trip."""
    return Response(b"", status=204)


@bp.get("/sample")
@login_required()
async def download() -> ResponseReturnValue:
    """``bytes`` (default 1 MiB, at most 4 MiB) of random data, to time a download."""
    text = request.args.get("bytes", str(DEFAULT_SAMPLE_BYTES))
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_SAMPLE_BYTES:
        abort(400)
    size = int(text)
    return Response(os.urandom(size), content_type="application/octet-stream")


@bp.post("/sample")
@login_required()
async def upload() -> ResponseReturnValue:
    """Read and discard one piece of an upload, to time it; answers the bytes received.

    The app caps every request at 64 KiB (``MAX_CONTENT_LENGTH``, refused with 413), so the
    page sends its upload sample as several pieces, a few at a time.
    """
    data = await request.get_data(cache=False)
    return {"bytes": len(data)}


@bp.get("/upstream")
@login_required()
async def upstream() -> ResponseReturnValue:
    """The box's link to the upstream as the sync process last saw it (no PHI)."""
    state = app_state()
    now = state.clock()
    found = await db.run_sync(state.store.connection, status.read_status, now)
    process = found.process
    figures = process.figures if process is not None else {}
    rtt = figures.get("upstream_rtt_ms")
    return {
        "online": found.online,
        "sync_running": process is not None and process.fresh,
        "upstream": process.upstream if process is not None else None,
        "last_success_age_s": (
            None if found.last_success is None else (now - found.last_success).total_seconds()
        ),
        "rtt_ms": rtt if isinstance(rtt, int | float) else None,
        "waiting": found.waiting,
    }
