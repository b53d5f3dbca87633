"""An upstream FHIR server as the sync agent sees it: errors put in classes, answers read.

The classes follow the Medplum agent's queue (STYLE.md): **transient** (connection refused or
reset, 5xx but 504, 429) → retry later with backoff; **ambiguous** (the request went out but
no answer came back, or a gateway answered 504: it gave up waiting on a request it may well
have forwarded) → resend, which is safe only because every write we send is idempotent;
**too large** (413, or a 400 whose OperationOutcome says the bundle has too many entries) →
send smaller bundles; **permanent** (another 4xx) → the server (or a filter in front of
it) refused the content; **endpoint** (a redirect, or a 404/405/406/410/415 to a request
at the server's base: a wrong ``base_url``, a login page in front of the EHR; or a request
that cannot even be formed, such as a ``base_url`` of another scheme) → the address
did not take the request at all, which says nothing about the items: they stay pending, as
for **auth**, and the exchange is retried with backoff. Before, a wrong ``base_url`` made
every item a dead letter, one at a time. (A bare 400 stays **permanent**: a filter in front
of the EHR may refuse one item's content, and the rest must flow.) **auth** → the two ends
did not accept each other: the token endpoint refused our client (an OAuth error), the
server answered 401 to a freshly obtained token, it refused our TLS client certificate, we
refused its certificate, or the TLS handshake failed for another reason than a lost
connection (https to a plain-http port, a protocol or key we do not accept). That is a
configuration problem for a person to fix, not a fault of the items: they stay pending and
the exchange is retried with backoff (sync_agent/auth.py has the details).

Every request to the upstream goes through :func:`exchange` here, which puts a failed
connection or a lost answer in these classes; :func:`classify_response` and
:func:`classify_for_resource` do the same for an answer that refuses. The HTTP client itself,
its TLS and the bound on what an answer may take are in :mod:`sync_agent.transport`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any

import httpx
import orjson

from sync_agent.own_address import followed

FHIR_JSON = "application/fhir+json"


class Failure(StrEnum):
    """How a request failed, which decides what the agent does next."""

    TRANSIENT = "transient"
    AMBIGUOUS = "ambiguous"
    TOO_LARGE = "too_large"
    PERMANENT = "permanent"
    # Credentials or certificates refused, either way; the items are not at fault.
    AUTH = "auth"
    # The address did not take the request (not a FHIR endpoint, or not this operation).
    ENDPOINT = "endpoint"


# Not frozen: Python sets ``__traceback__`` on an exception that leaves a
# ``@contextmanager`` block (httpx wraps every send in one), and a frozen dataclass refuses
# every attribute, which turned the error into a TypeError. eq=False keeps exceptions
# compared (and hashed) by identity, as exceptions are.
@dataclass(slots=True, eq=False)
class UpstreamError(Exception):
    """A failed exchange with the upstream, classified; ``message`` is free of PHI.

    ``status`` is the HTTP status of an answer refusing the whole request (None when there
    was no such answer) and ``outcome`` whether its body was a FHIR OperationOutcome: the
    audit export holds a refusal against a record only when the FHIR server itself said so.
    """

    failure: Failure
    message: str
    retry_after_s: float | None = None
    status: int | None = None
    outcome: bool = False

    def __str__(self) -> str:
        return f"{self.failure}: {self.message}"


# -- reading what a server answered ---------------------------------------------------------
# Nothing in an answer is trusted to have the shape FHIR gives it: a server, a gateway or a
# proxy in between may send anything. These read what is usable and treat the rest as absent,
# so a malformed answer becomes a retry or a dead letter with a plain message, never an
# exception that ends the sync process (tests/sync_agent/test_answers.py, with hypothesis).


def as_dict(value: Any) -> dict[str, Any]:
    """``value`` when a server sent an object there, else ``{}``."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    """``value`` when a server sent an array there, else ``[]``."""
    return value if isinstance(value, list) else []


def is_outcome(body: Any) -> bool:
    """Whether a parsed answer is a FHIR OperationOutcome (the server speaking FHIR)."""
    return isinstance(body, dict) and body.get("resourceType") == "OperationOutcome"


def outcome_text(body: Any) -> str:
    """The diagnostics of an OperationOutcome, as one line (the server's words)."""
    if is_outcome(body):
        parts = []
        for item in as_list(body.get("issue")):
            issue = as_dict(item)
            details = issue.get("details")  # a CodeableConcept; some servers send a string
            text = (
                issue.get("diagnostics")
                or (details if isinstance(details, str) else as_dict(details).get("text"))
                or issue.get("code")
            )
            if text and isinstance(text, str | int | float):
                parts.append(str(text))
        return "; ".join(parts)[:500] or "OperationOutcome without diagnostics"
    return ""


def next_url(bundle: Any) -> str | None:
    """The ``next`` link of a search page as the server wrote it (any shape: None when there
    is none). Not to be asked as it is: see :func:`next_link`."""
    for link in as_list(as_dict(bundle).get("link")):
        url = as_dict(link).get("url")
        if as_dict(link).get("relation") == "next" and isinstance(url, str) and url:
            return url
    return None


def next_link(
    bundle: Any, client: httpx.AsyncClient, also_known_as: Iterable[str] = ()
) -> str | None:
    """The URL to ask for the ``next`` link of a search page (any shape: None when there is
    none), when it stays on ``client``'s upstream: at its base URL as it is, at one of the
    addresses it is ``also_known_as`` under the base URL
    (:func:`~sync_agent.own_address.followed`). Never one to another host: our credentials
    go with the request.
    """
    url = next_url(bundle)
    return None if url is None else followed(url, str(client.base_url), also_known_as)


# How long a request whose answer was lost may still be applied by the server when the
# client has no read timeout (the upstream's default timeout_s).
LOST_ANSWER_DEFAULT_S = 30.0


def lost_answer_wait_s(client: httpx.AsyncClient) -> float:
    """How long nothing that a request whose answer was lost carried is sent again: the
    client's read timeout (:func:`sync_agent.transport.build_client` sets it to the
    upstream's ``timeout_s``), else :data:`LOST_ANSWER_DEFAULT_S`."""
    read = client.timeout.read
    return LOST_ANSWER_DEFAULT_S if read is None else read


def failure_class(error: str | None) -> str | None:
    """``transient``, ``auth``… of an error text (``str(UpstreamError)``): all of it that may
    be shown or logged, the rest being possibly the server's words, which may quote PHI."""
    return None if error is None else error.split(":", 1)[0]


def bundle_entries(body: Any) -> list[dict[str, Any]]:
    """A Bundle's entries in order, each a dict (``{}`` for one that is not one)."""
    return [as_dict(entry) for entry in as_list(as_dict(body).get("entry"))]


def search_matches(bundle: Any, rtype: str) -> list[dict[str, Any]]:
    """The matches of a searchset of ``rtype`` with an id (not included resources, not
    OperationOutcomes)."""
    found = []
    for entry in bundle_entries(bundle):
        resource = entry.get("resource")
        mode = as_dict(entry.get("search")).get("mode", "match")
        if (
            isinstance(resource, dict)
            and resource.get("resourceType") == rtype
            and isinstance(resource.get("id"), str)
            and mode == "match"
        ):
            found.append(resource)
    return found


def entry_answer(entry: Any) -> dict[str, Any]:
    """An entry's ``response`` (``{}`` when it has none that is an object)."""
    return as_dict(as_dict(entry).get("response"))


def entry_status(entry: Any) -> int:
    """The HTTP status an entry's ``response.status`` starts with ("201 Created"); 0 if none."""
    status = entry_answer(entry).get("status")
    if not isinstance(status, str):
        return 0
    head = status.strip()[:4]
    code = head[:3]
    if len(code) == 3 and code.isascii() and code.isdigit() and not head[3:].isdigit():
        return int(code)
    return 0


def entry_outcome(entry: Any, code: int) -> str:
    """What the server said about one refused entry, as one line: the OperationOutcome in its
    ``response.outcome``, else one in its ``resource`` (where some servers put it), else the
    status alone."""
    return (
        outcome_text(entry_answer(entry).get("outcome"))
        or outcome_text(as_dict(entry).get("resource"))
        or f"HTTP {code}"
    )


_TOO_LARGE_WORDS = ("too many", "too large", "entries", "payload too large")
# Whole-request answers that mean "later" (timeout, conflict, locked, too early, too many).
_RETRY_STATUSES = frozenset({408, 409, 423, 425, 429})
# Whole-request answers about the address or the protocol, never about a resource we sent
# (as is every redirect: the client follows none, see build_client):
# nothing here, this method not allowed here, cannot answer in FHIR JSON, gone for good,
# does not read FHIR JSON.
_ENDPOINT_STATUSES = frozenset({404, 405, 406, 410, 415})
# An entry's own 4xx that says nothing against the item itself: our credentials or access
# policy (401/403), or "later" as above. The item is sent again, never dead-lettered.
ENTRY_NOT_THE_ITEM = frozenset({401, 403}) | _RETRY_STATUSES
# Whole-request answers about how the request was made, never what it carries: an upgrade
# required (426), our request's header fields too large (431). From a proxy or the server,
# every request gets the same: records wait, a person mends the configuration.
_PROTOCOL_STATUSES = frozenset({426, 431})


# The longest Retry-After taken from a server (a day, as RETRY_HORIZON in the outbox).
MAX_RETRY_AFTER_S = 86_400.0


_DELAY_SECONDS = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,6})?")


def _http_date(value: str | None) -> datetime | None:
    """An HTTP-date (``Wed, 21 Oct 2026 07:28:00 GMT``; without a zone read as GMT, which
    HTTP dates are), else None."""
    text = (value or "").strip()
    if not text[:1].isalpha():
        return None  # every HTTP-date starts with its day name
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):  # 3.11 raises TypeError
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def retry_after_seconds(
    value: str | None, *, now: datetime | None = None, served: str | None = None
) -> float | None:
    """A ``Retry-After`` (RFC 9110 section 10.2.3) as seconds, capped at a day; else None.

    Either delay-seconds (ASCII digits; a decimal fraction is taken too, as some servers send
    one) or an HTTP-date, a date already past being 0. A date is counted from the answer's own
    ``Date`` (``served``) when it has one, as the server's clock set both: a box whose clock
    lags (no battery clock, NTP not yet answered) would otherwise wait a day for a minute's
    pause. Without one, from ``now`` (default: the current time). "1e400", "inf", "nan", "²"
    or any other text is no delay we act on: the usual backoff applies.
    """
    text = (value or "").strip()
    if _DELAY_SECONDS.fullmatch(text):
        return min(float(text), MAX_RETRY_AFTER_S)
    when = _http_date(text)
    if when is None:
        return None
    since = _http_date(served) or now or datetime.now(UTC)
    return min(max((when - since).total_seconds(), 0.0), MAX_RETRY_AFTER_S)


def classify_response(
    status: int, body: Any, retry_after: str | None, *, served: str | None = None
) -> UpstreamError:
    """Put a non-2xx answer to a whole request into its class (``served``: the answer's
    ``Date``, for a ``Retry-After`` given as a date)."""
    text = outcome_text(body) or f"HTTP {status}"
    if status == 413 or (status == 400 and any(w in text.lower() for w in _TOO_LARGE_WORDS)):
        return UpstreamError(Failure.TOO_LARGE, text)
    if status in (401, 403):
        # Credentials or permissions: fixed by a person at the EHR or in the site config,
        # never by dead-lettering the records (they stay pending; staff see the reason).
        return UpstreamError(Failure.AUTH, f"the upstream refused our credentials: {text}")
    if status == 407:
        return UpstreamError(
            Failure.AUTH,
            "a proxy in front of the upstream asks for its own credentials (HTTP 407); "
            "ask the site's network team",
        )
    if status in _PROTOCOL_STATUSES:
        return UpstreamError(
            Failure.ENDPOINT,
            f"the upstream did not take the request as it was made (HTTP {status}); "
            "check base_url and the upstream's settings in the site config",
        )
    if status == 504:
        # A gateway that gave up waiting: on a request it may have forwarded (the EHR may
        # be applying it still), and one perhaps too slow for the gateway, which an
        # ambiguous outcome sends again smaller. (502 and 503 say nothing of the request.)
        return UpstreamError(
            Failure.AMBIGUOUS, text, retry_after_seconds(retry_after, served=served)
        )
    if status in _RETRY_STATUSES or status >= 500:
        return UpstreamError(
            Failure.TRANSIENT, text, retry_after_seconds(retry_after, served=served)
        )
    if status < 400 or status in _ENDPOINT_STATUSES:
        said = text if text.startswith("HTTP ") else f"HTTP {status}: {text}"
        return UpstreamError(
            Failure.ENDPOINT,
            f"the upstream address did not take the request ({said}); "
            "check base_url in the site config",
        )
    return UpstreamError(Failure.PERMANENT, text)


def classify_for_resource(
    status: int, body: Any, retry_after: str | None, *, served: str | None = None
) -> UpstreamError:
    """As :func:`classify_response`, for a request about one resource or one search (an
    update, a read, a patient's readings): an address status (404, 405, 406, 410, 415)
    answered with the server's own OperationOutcome is about that resource or search
    (deleted, merged, not updatable, not searchable so), not the address: **permanent**.
    A redirect, or such a status from something that is not the FHIR server (a proxy's
    page), stays **endpoint**: the address is wrong, and what was asked waits."""
    refusal = classify_response(status, body, retry_after, served=served)
    if status in _ENDPOINT_STATUSES and is_outcome(body):
        return UpstreamError(Failure.PERMANENT, outcome_text(body) or f"HTTP {status}")
    return refusal


async def exchange(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    params: dict[str, str] | None = None,
    json: Any = None,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """One HTTP exchange; a failed connection or a lost answer raises :class:`UpstreamError`.

    Status codes are left to the caller (they mean different things to a search, a PUT and
    a bundle). Every request to the upstream goes through here, so the classes are one.

    A request that cannot be formed (a header value HTTP does not allow, an address of
    another scheme) is never sent, and never will be as configured: **endpoint**, for a
    person, not a dead link to probe. Raised with neither cause nor context, as httpx's
    text quotes the header (a credential).
    """
    try:
        return await client.request(
            method, url, params=params, json=json, content=content, headers=headers
        )
    except (httpx.LocalProtocolError, httpx.UnsupportedProtocol) as exc:
        unformed = type(exc).__name__  # raised below, out of this block: no __context__
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise UpstreamError(Failure.TRANSIENT, f"cannot connect: {type(exc).__name__}") from exc
    except (
        httpx.ReadTimeout,
        httpx.WriteTimeout,
        httpx.RemoteProtocolError,
        httpx.ReadError,
    ) as exc:
        # The request (or part of it) left the box and no answer came: it may have landed.
        raise UpstreamError(Failure.AMBIGUOUS, f"no response: {type(exc).__name__}") from exc
    except httpx.TransportError as exc:
        raise UpstreamError(Failure.TRANSIENT, f"transport error: {type(exc).__name__}") from exc
    except (httpx.InvalidURL, httpx.TooManyRedirects) as exc:
        raise UpstreamError(Failure.ENDPOINT, f"bad address: {type(exc).__name__}") from exc
    except httpx.HTTPError as exc:
        # The rest (an answer that cannot be decoded, say): the request left, the answer is
        # unusable. Never let one escape: the sync loop would exit and crash-loop.
        raise UpstreamError(Failure.AMBIGUOUS, f"no usable answer: {type(exc).__name__}") from exc
    raise UpstreamError(
        Failure.ENDPOINT,
        f"request not sent: it cannot be formed ({unformed}: a header value such as the "
        "credentials, or the address, is not valid HTTP); check the upstream in the site config",
    )


def response_json(response: httpx.Response) -> Any:
    """The body as JSON, or None (orjson: a bundle's answer is parsed on the event loop)."""
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None


async def post_bundle(client: httpx.AsyncClient, bundle: dict[str, Any]) -> dict[str, Any]:
    """POST a batch/transaction Bundle to the server base; returns the response Bundle.

    Encoded with orjson: a bundle of 100 readings costs ~3 ms in the standard library's
    encoder, ~0.3 ms here, and the drain is bound by the event loop's CPU.
    """
    response = await exchange(
        client, "POST", "", content=orjson.dumps(bundle), headers={"Content-Type": FHIR_JSON}
    )
    body = response_json(response)
    if response.status_code >= 300:
        refusal = classify_response(
            response.status_code,
            body,
            response.headers.get("Retry-After"),
            served=response.headers.get("Date"),
        )
        refusal.status, refusal.outcome = response.status_code, is_outcome(body)
        raise refusal
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise UpstreamError(
            Failure.TRANSIENT, f"HTTP {response.status_code} without a response Bundle"
        )
    return body
