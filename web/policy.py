"""The access policy of every route, kept as data: who may reach each endpoint.

One entry per Quart endpoint of :func:`web.app.create_app` (``app.url_map``): the
*audiences* allowed past its guard, and whether its pages carry PHI. The guards themselves
are the decorators and hooks of the blueprints (``login_required`` in ``web/auth.py``, the
kiosk's pairing cookie in ``web/kiosk.py``, the signed visit link in ``web/provider.py``, the
vendor key in ``web/ingest.py``, also checking read keys for ``web/fhir_api.py``); this table is the reference they are held to:

* ``tests/web/test_route_matrix.py`` sends every route as every audience and fails on any
  difference between what the guard did and what the table says (and on any route of the
  url_map that is not in the table, so a new route must be classified here);
* :func:`deny_unclassified`, a ``before_request`` hook, refuses at run time any endpoint the
  table does not know (deny by default), so an unclassified route never serves anyone.

What "reach" means: an allowed audience gets past the guard (the view may still answer
400, 404 or 409 for the request itself); any other is refused with 401 or 403, or sent to
log in (``/login``) or to pair (``/kiosk/pair``). Patient-level access (normal access or
break-glass, ``web/access.py``) comes *after* the role: the table names who may open a
patient page at all, :func:`web.access.require_access` which patients.

See ``docs/security.md`` ("Route policy") for how to classify a new route.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from quart import abort, request

logger = logging.getLogger(__name__)


class Audience(StrEnum):
    """Who is asking: what the request carries, not what it claims."""

    ANONYMOUS = "anonymous"  # nothing: a browser with no cookie, a monitoring probe
    KIOSK = "kiosk"  # a paired kiosk browser (station cookie), whoever stands at it
    NURSE = "nurse"  # a staff session with role nurse
    PROVIDER = "provider"  # a staff session with role provider (reads remote monitoring)
    ADMIN = "admin"  # a staff session with role admin (second factor proven)
    VISIT_LINK = "visit-link"  # a remote provider's browser bound to one signed visit link
    API_KEY = "api-key"  # a device vendor's hub presenting its API key (scope ingest)
    READ_KEY = "read-key"  # a local integration presenting a read key (web/fhir_api.py)
    MFA_VERIFY = "mfa-verify"  # right password, TOTP or recovery code still to prove
    MFA_ENROL = "mfa-enrol"  # an administrator's right password, a factor still to set up


STAFF = frozenset({Audience.NURSE, Audience.PROVIDER, Audience.ADMIN})
CLINIC = frozenset({Audience.NURSE, Audience.ADMIN})  # nurses and admins (same rule)
RPM_READERS = CLINIC | {Audience.PROVIDER}
ADMIN = frozenset({Audience.ADMIN})
KIOSK = frozenset({Audience.KIOSK})
VISIT_LINK = frozenset({Audience.VISIT_LINK})
API_KEY = frozenset({Audience.API_KEY})
READ_KEY = frozenset({Audience.READ_KEY})
PUBLIC = frozenset(Audience)  # the credential, if any, is checked by the view itself


@dataclass(frozen=True, slots=True)
class Rule:
    """Who may reach one endpoint, and whether its responses may carry PHI."""

    audiences: frozenset[Audience]
    phi: bool = False


def _r(audiences: frozenset[Audience], *, phi: bool = False) -> Rule:
    return Rule(audiences, phi)


# Every endpoint of the app. Keep it sorted by blueprint; a route missing here is refused
# at run time and fails tests/web/test_route_matrix.py.
POLICY: Mapping[str, Rule] = {
    # app-level
    "index": _r(PUBLIC),  # a redirect to /nurse/, which has its own guard
    "static": _r(PUBLIC),
    "openapi.openapi_json": _r(PUBLIC),  # web/openapi.py: the API description, no data
    # sign-in, second factor, own account (web/auth.py)
    "auth.login_form": _r(PUBLIC),
    "auth.login": _r(PUBLIC),  # the signed login-form token is its CSRF check
    "auth.logout": _r(PUBLIC),  # ends whatever session the cookie names (CSRF-checked)
    "auth.mfa_verify_form": _r(frozenset({Audience.MFA_VERIFY})),
    "auth.mfa_verify": _r(frozenset({Audience.MFA_VERIFY})),
    "auth.mfa_enrol_form": _r(STAFF | {Audience.MFA_ENROL}),
    "auth.mfa_enrol": _r(STAFF | {Audience.MFA_ENROL}),
    "auth.mfa_account": _r(STAFF),
    "auth.mfa_new_recovery_codes": _r(STAFF),
    "auth.mfa_remove": _r(frozenset({Audience.NURSE, Audience.PROVIDER})),  # admins keep it
    "auth.password_form": _r(STAFF),
    "auth.change_password": _r(STAFF),
    # user administration (web/admin.py)
    "admin.user_list": _r(ADMIN),
    "admin.create": _r(ADMIN),
    "admin.reset_password": _r(ADMIN),
    "admin.disable": _r(ADMIN),
    "admin.enable": _r(ADMIN),
    "admin.reset_mfa": _r(ADMIN),
    # audit report (web/audit_report.py): nurses see their own actions only
    "audit_report.report": _r(CLINIC, phi=True),
    "audit_report.export": _r(CLINIC, phi=True),
    # break-glass (web/break_glass.py)
    "break_glass.request_form": _r(CLINIC, phi=True),
    "break_glass.request_access": _r(CLINIC, phi=True),
    "break_glass.record": _r(CLINIC, phi=True),
    "break_glass.end": _r(CLINIC),
    # arrivals queue and chart (web/nurse.py, web/chart.py)
    "nurse.vitals": _r(CLINIC, phi=True),
    "nurse.events": _r(CLINIC, phi=True),
    "chart.chart": _r(CLINIC, phi=True),
    "chart.photo": _r(CLINIC, phi=True),
    # claims (web/claims.py)
    "claims.queue": _r(CLINIC, phi=True),
    "claims.detail": _r(CLINIC, phi=True),
    "claims.mark_ready": _r(CLINIC),
    "claims.cancel": _r(ADMIN),
    "claims.resolve": _r(ADMIN),
    "claims.override": _r(ADMIN),
    "claims.clear_unreadable": _r(ADMIN),
    # devices and stations (web/devices.py)
    "devices.overview": _r(CLINIC, phi=True),
    "devices.check_in": _r(CLINIC),
    "devices.check_out": _r(CLINIC),
    "devices.add_station": _r(ADMIN),
    "devices.register": _r(ADMIN),
    "devices.assign": _r(ADMIN),
    "devices.retire": _r(ADMIN),
    "devices.held": _r(CLINIC, phi=True),
    "devices.assign_held": _r(CLINIC),
    "devices.discard_held": _r(CLINIC),
    # health (web/health.py): figures only, no PHI; read by monitoring without a login
    "health.healthz": _r(PUBLIC),
    "health.metrics": _r(PUBLIC),
    # local FHIR read API (web/fhir_api.py): a read key, never a cookie; metadata is public
    "fhir_api.metadata": _r(PUBLIC),  # the CapabilityStatement: no data
    "fhir_api.read": _r(READ_KEY, phi=True),
    "fhir_api.search": _r(READ_KEY, phi=True),
    # vendor ingest API (web/ingest.py): the key, never a cookie
    "ingest.post_observation": _r(API_KEY, phi=True),
    "ingest.post_bundle": _r(API_KEY, phi=True),
    # patient kiosk (web/kiosk.py)
    "kiosk.admin": _r(ADMIN),
    "kiosk.admin_post": _r(ADMIN),
    "kiosk.pair_form": _r(PUBLIC),
    "kiosk.pair": _r(PUBLIC),  # the one-time pairing code is the credential
    "kiosk.home": _r(KIOSK, phi=True),
    "kiosk.switch_language": _r(KIOSK),
    "kiosk.reset": _r(KIOSK),
    "kiosk.identify": _r(KIOSK, phi=True),
    "kiosk.confirm": _r(KIOSK, phi=True),
    "kiosk.walk_in": _r(KIOSK, phi=True),
    "kiosk.register": _r(KIOSK, phi=True),
    "kiosk.details": _r(KIOSK, phi=True),
    "kiosk.intake_answers": _r(KIOSK, phi=True),
    "kiosk.consent": _r(KIOSK, phi=True),
    "kiosk.vitals_events": _r(KIOSK, phi=True),
    "kiosk.video_state": _r(KIOSK),  # whether this station's visit is live: a yes or no
    "kiosk.vitals_next": _r(KIOSK),
    "kiosk.photo_chunk": _r(KIOSK, phi=True),
    "kiosk.photo_finish": _r(KIOSK, phi=True),
    "kiosk.finish": _r(KIOSK),
    # remote provider (web/provider.py): nurses issue links, the link holder uses one
    "provider.new": _r(CLINIC, phi=True),
    "provider.issue": _r(CLINIC, phi=True),
    "provider.revoke": _r(CLINIC),
    "provider.visit": _r(VISIT_LINK, phi=True),
    "provider.join": _r(VISIT_LINK),
    "provider.photo": _r(VISIT_LINK, phi=True),
    "provider.events": _r(VISIT_LINK, phi=True),
    "provider.complete": _r(VISIT_LINK, phi=True),
    # remote monitoring (web/rpm.py, web/rpm_patient.py): providers read, nurses manage
    "rpm.worklist": _r(RPM_READERS, phi=True),
    "rpm.events": _r(RPM_READERS, phi=True),
    "rpm.acknowledge": _r(RPM_READERS),
    "rpm.snooze": _r(CLINIC),
    "rpm.resolve": _r(CLINIC),
    "rpm_patient.patient": _r(RPM_READERS, phi=True),
    "rpm_patient.series": _r(RPM_READERS, phi=True),
    "rpm_patient.enroll": _r(CLINIC, phi=True),
    "rpm_patient.unenroll": _r(CLINIC, phi=True),
    "rpm_patient.thresholds": _r(CLINIC, phi=True),
    "rpm_patient.log_time": _r(CLINIC, phi=True),
    # synchronisation (web/sync.py)
    "sync.overview": _r(CLINIC, phi=True),
    "sync.sync_now": _r(ADMIN),
    "sync.trail_breaks_acknowledge": _r(ADMIN),
    "sync.twins_clear": _r(ADMIN),
    "sync.dead_letter_message": _r(ADMIN, phi=True),
    "sync.failing_message": _r(ADMIN, phi=True),
    "sync.dead_letter_resend": _r(ADMIN, phi=True),  # a refusal renders the Sync page
    "sync.dead_letters_resend_all": _r(ADMIN, phi=True),
    "sync.review_list": _r(CLINIC, phi=True),
    "sync.review_case": _r(CLINIC, phi=True),
    "sync.review_keep_mine": _r(CLINIC, phi=True),
    "sync.review_take_theirs": _r(CLINIC, phi=True),
    # the pre-call check (web/precall.py): devices and the network, no patient data
    "precall.page": _r(STAFF),
    "precall.ping": _r(STAFF),
    "precall.download": _r(STAFF),
    "precall.upload": _r(STAFF),
    "precall.upstream": _r(STAFF),
    # video visit signalling (web/video.py): WebSocket, one route per audience's cookie;
    # an HTTP GET passes the same guard and answers 426
    "video.nurse_visit": _r(CLINIC, phi=True),  # the nurse's video page (patient's name)
    "video.take_exam_still": _r(CLINIC),  # answers the new Media's id, no patient data
    "video.show_exam_camera": _r(CLINIC),  # answers the camera's participant id, no patient data
    "video.nurse_ws": _r(CLINIC, phi=True),
    "video.provider_ws": _r(VISIT_LINK, phi=True),
    "video.provider_exam_still": _r(VISIT_LINK),  # the link's own visit; the Media's id only
    "video.provider_exam_camera": _r(VISIT_LINK),  # the link's own visit; a participant id
    "video.kiosk_ws": _r(KIOSK, phi=True),
}

# Unsafe requests that take no browser CSRF token, and why: they never read a cookie.
CSRF_EXEMPT = frozenset(e for e, rule in POLICY.items() if rule.audiences == API_KEY)


def unclassified(endpoints: set[str] | frozenset[str]) -> list[str]:
    """The endpoints of ``endpoints`` that the table does not classify, sorted."""
    return sorted(e for e in endpoints if e not in POLICY)


async def deny_unclassified() -> None:
    """``before_request``: refuse (403) any endpoint missing from :data:`POLICY`.

    A request that matched no route (``endpoint`` None) goes on to its 404.
    """
    endpoint = request.endpoint
    if endpoint is not None and endpoint not in POLICY:
        logger.error("endpoint %s is not classified in web/policy.py: refused", endpoint)
        abort(403)
