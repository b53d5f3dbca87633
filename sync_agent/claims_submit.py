"""Claims submission and acknowledgement polling, run by the sync process after each drain.

Ready claims go to the payer endpoint configured for the site (``[claims] endpoint_kind``):

* ``x12`` — a clearinghouse. ``POST {endpoint_url}/submissions`` with one X12 837
  interchange (``Content-Type: application/edi-x12``) per batch; a 2xx means it was
  received (a 999 in the answer body is applied at once); its 999, 277CA and 835 files are
  fetched later with ``GET {endpoint_url}/responses?since=<cursor>``, which answers
  ``{"responses": [{"id", "kind", "body"}], "next": "<cursor>"}`` (docs/claims.md).
* ``fhir`` — a FHIR payer. ``POST {endpoint_url}/Claim`` with one Claim, with
  ``If-None-Exist: identifier=<system>|<claim number>``; a 2xx is received and acknowledged.

Never twice (services/claims/lifecycle.py): the intent is written before each request, and
the answer is classed like the Medplum agent's queue (STYLE.md): **not sent** — nothing was
taken: no connection could be made (refused, DNS, TLS handshake refused, a proxy that refused
the tunnel), the request failed before it left (the bearer token file unreadable, say), or the
endpoint turned it away unread (401/403/407/408/429, a bearer token refused; a redirect or a
404/405/406/410/415: the address is wrong): the claims stay ready and the pass stops (a 413,
too large to be read, leaves them ready too, and the pass goes on in batches half as large);
**clear** — 2xx: submitted; another 4xx: refused; **ambiguous** — the request went out and no
clear answer came (timeout, reset, 5xx, any other failure once it was handed to the
transport): in_review for a person, never a blind resend, and the pass stops (the next batch
would meet the same outage). Every batch is settled one way or the other by the process that
sent it, whatever is raised; only a process that dies mid-send leaves one ``sending``, and
the next pass of any process turns it ambiguous once it is older than any request can take
(:data:`RECOVER_MARGIN`): never sooner, since the sync process and ``appliance claims submit``
send side by side.

Claims never enter the EHR outbox: they have their own queue (``claims.status = 'ready'``)
and endpoint, so the outbox's lane order cannot delay them behind clinical resources and a
down EHR does not hold them back. In the sync loop they run right after the outbox drain,
before updates, pull-down and the audit export, whatever the EHR link's state.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx

from appliance import db
from appliance.config import AuthKind, ClaimsConfig, Config
from appliance.errors import KeyFileError
from appliance.store import Store
from services.claims.acks import AckError
from services.claims.lifecycle import Batch, Lifecycle, fhir_outcome
from services.claims.service import ClaimsError, ClaimsService
from sync_agent.transport import TlsAwareTransport
from sync_agent.upstream import Failure, UpstreamError

logger = logging.getLogger(__name__)

X12_MEDIA = "application/edi-x12"
CURSOR_KEY = "claims.responses_since"
POLL_INTERVAL_S = 300.0
# How often the sync process decides finished visits left undecided (docs/claims.md): the
# web process decides each visit as it finishes; this catches one whose decision failed or
# was cut off by a restart. The first pass after a start runs it at once.
SCAN_INTERVAL_S = 3600.0
SCAN_LOOKBACK = timedelta(days=30)  # visits that started this long ago at most
SCAN_SETTLE = timedelta(minutes=10)  # a visit that ended since is the web process's to decide
# Refusals that say the request was not read: nothing was accepted, nothing to review.
_UNREAD = frozenset({401, 403, 407, 408, 429})
_CREDENTIALS = frozenset({401, 403, 407})
# Answers that say the address is wrong, not the claims (sync_agent/upstream.py's *endpoint*
# class): a redirect (httpx follows none: an http→https move, a captive portal) or what a
# proxy or another server answers for a path it does not serve. Nothing was taken.
_ADDRESS = frozenset({404, 405, 406, 410, 415})
# Failures by which nothing reached the endpoint: no connection, a proxy that refused the
# tunnel, a scheme httpx cannot speak.
_NO_CONNECTION = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ProxyError,
    httpx.UnsupportedProtocol,
)
# httpx's timeout_s is per step (connect, each write, each read): a server that dribbles its
# answer could hold a request for ever. The whole exchange, the bearer auth's one resend
# included, is cut off at this many times timeout_s (then: ambiguous); a responses poll too.
SEND_LIMIT_FACTOR = 4
# An intent older than the send limit plus this has no live process waiting for its answer:
# recovery may take it. created_at is kept to the minute (ISA09/10), and a settle may wait
# on the database's lock.
RECOVER_MARGIN = timedelta(minutes=2)


@dataclass(slots=True)
class _Handed:
    """Requests the client handed to its transport (an httpx request hook): a failure before
    the count moved cannot have reached the endpoint."""

    count: int = 0

    async def hook(self, _request: httpx.Request) -> None:
        self.count += 1


@dataclass(slots=True)
class SubmitResult:
    """What one pass did (counts of claims; ``responses`` = files applied)."""

    submitted: int = 0
    not_sent: int = 0
    in_review: int = 0
    refused: int = 0
    responses: int = 0
    errors: list[str] = field(default_factory=list)


def tls_verify(claims: ClaimsConfig) -> ssl.SSLContext | bool:
    """How the client verifies the endpoint, and (mtls) the certificate it presents."""
    mtls = claims.auth is AuthKind.MTLS
    if claims.ca_file is None and not mtls:
        return True
    try:
        context = (
            ssl.create_default_context(cafile=str(claims.ca_file))
            if claims.ca_file is not None
            else httpx.create_ssl_context()
        )
        if mtls:
            assert claims.client_cert_file is not None  # the config parser requires both
            assert claims.client_key_file is not None
            context.load_cert_chain(str(claims.client_cert_file), str(claims.client_key_file))
    except (ssl.SSLError, OSError) as exc:
        raise KeyFileError(f"[claims] TLS files: cannot load ({type(exc).__name__})") from exc
    return context


def build_claims_client(claims: ClaimsConfig) -> httpx.AsyncClient:
    """An HTTP client for the claims endpoint, authenticated as ``[claims]`` says."""
    assert claims.endpoint_url is not None
    auth: httpx.Auth | None = None
    if claims.auth is AuthKind.BEARER:
        from sync_agent.auth import StaticBearerAuth

        assert claims.token_file is not None
        auth = StaticBearerAuth(claims.token_file)
    timeout = httpx.Timeout(claims.timeout_s, connect=min(10.0, claims.timeout_s))
    # The EHR client's transport: an answer held to 64 MB as sent and as decoded (a proxy
    # streaming without end, a gzip bomb), a failed TLS handshake said in words.
    return httpx.AsyncClient(
        base_url=claims.endpoint_url + "/",
        timeout=timeout,
        auth=auth,
        transport=TlsAwareTransport(tls_verify(claims)),
    )


class ClaimsSubmitter:
    """Sends ready claims and fetches acknowledgements; one pass per :meth:`run_once`."""

    def __init__(
        self,
        store: Store,
        config: Config,
        *,
        client_factory: Callable[[ClaimsConfig], httpx.AsyncClient] = build_claims_client,
        clock: Callable[[], float] | None = time.monotonic,
        poll_interval_s: float = POLL_INTERVAL_S,
        service: ClaimsService | None = None,
    ) -> None:
        self._store = store
        self._claims = config.claims
        self._service = service or ClaimsService(store, config, run_pyx12=False)
        # The scan drafts claims as the visit flow does, X12 syntax check included (a draft
        # that passes every check may go straight to ready with auto_ready).
        self._decider = service or ClaimsService(store, config)
        self.lifecycle = Lifecycle(self._service, store)
        self._client_factory = client_factory
        self._clock = clock
        self._poll_interval_s = poll_interval_s
        self._last_poll: float | None = None
        self._last_scan: float | None = None
        self._send_limit_s = SEND_LIMIT_FACTOR * self._claims.timeout_s
        # Claims per interchange: batch_size, halved by each 413 (a body limit in front).
        self._batch_limit = self._claims.batch_size
        # How old an intent still 'sending' must be before this submitter recovers it.
        self.stale_after = timedelta(seconds=self._send_limit_s) + RECOVER_MARGIN

    @property
    def configured(self) -> bool:
        """Claims are enabled and an endpoint is set."""
        return self._claims.enabled and self._claims.endpoint_url is not None

    async def run_once(self, *, stop: Callable[[], bool] = lambda: False) -> SubmitResult | None:
        """One pass for the sync loop; never raises (a failure is logged, retried next pass).

        First, when due, the scan that decides finished visits left undecided (claims enabled,
        with or without an endpoint: a drafted claim can be exported by hand); then, with an
        endpoint, submission and polling. ``stop()`` (the process is stopping) is asked before
        each batch, as the outbox drain asks before each bundle.
        """
        if self._claims.enabled and self._scan_due():
            try:
                decided = await self._decider.scan(
                    since=self._store.now() - SCAN_LOOKBACK, settle=SCAN_SETTLE
                )
            except Exception as exc:
                logger.error("claims scan failed (%s); will retry", type(exc).__name__)
            else:
                if decided:
                    logger.warning(
                        "claims scan decided %d finished visit(s) left undecided: %s",
                        sum(decided.values()),
                        ", ".join(f"{k.value} {n}" for k, n in sorted(decided.items())),
                    )
        if not self.configured:
            return None
        try:
            result = await self.submit(poll=None, stop=stop)
        except KeyFileError as exc:
            # Names the file, never its content: what the person must mend.
            logger.error("claims submission pass failed: %s; will retry", exc)
            return None
        except Exception as exc:
            # The type only: an exception's text may quote a claim (PHI).
            logger.error("claims submission pass failed (%s); will retry", type(exc).__name__)
            return None
        for error in result.errors:  # our own words (no PHI); the caller keeps no result
            logger.warning("claims: %s", error)
        return result

    def _scan_due(self) -> bool:
        now = time.monotonic() if self._clock is None else self._clock()
        if self._last_scan is not None and now - self._last_scan < SCAN_INTERVAL_S:
            return False
        self._last_scan = now
        return True

    def _poll_due(self) -> bool:
        if self._clock is None:
            return True
        now = self._clock()
        if self._last_poll is not None and now - self._last_poll < self._poll_interval_s:
            return False
        self._last_poll = now
        return True

    async def submit(
        self,
        *,
        poll: bool | None = True,
        dry_run: bool = False,
        progress: Callable[[str], None] | None = None,
        stop: Callable[[], bool] = lambda: False,
    ) -> SubmitResult:
        """Send every due claim in batches, then (x12) poll for responses. ``stop()`` is asked
        before each batch and the poll: a stop takes the request on the wire, not the rest
        (one started after it would be cut off by the runtime's stop, and put in review)."""
        result = SubmitResult()
        say = progress or (lambda _text: None)
        # Every pass: an intent a dead process left is taken once it is older than any
        # request can take, and not before (another process may be sending it right now).
        recovered = await self.lifecycle.recover(self.stale_after)
        if recovered:
            logger.warning("%d claim batch(es) were interrupted mid-send: in review", recovered)
        if dry_run:
            due = await self.lifecycle.due()
            say(f"{len(due)} claim(s) would be sent to the {self._claims.endpoint_kind} endpoint")
            return result
        kind = self._claims.endpoint_kind
        async with self._client_factory(self._claims) as client:
            handed = _Handed()
            client.event_hooks = {
                **client.event_hooks,
                "request": [*client.event_hooks["request"], handed.hook],
            }
            while not stop():
                try:
                    batch = await self.lifecycle.take_batch(kind, self._batch_limit)
                except ClaimsError as exc:
                    result.errors.append(str(exc))
                    break
                if batch is None:
                    break
                count, control = len(batch.claim_ids), batch.interchange_control
                say(f"sending {count} claim(s), interchange {control:09d}")
                state, go_on = await self._send(client, batch, result, handed)
                say(f"  {state}")
                if not go_on:
                    # Not taken (unreachable, refused unread, a wrong address) or no clear
                    # answer (an outage, a timeout): the next batch would meet the same, and
                    # one outage would put every ready claim in review. The rest waits.
                    break
            polling = kind == "x12" and self._claims.poll_responses
            if polling and not stop() and (poll or (poll is None and self._poll_due())):
                result.responses += await self._poll(client, result)
        if result.submitted or result.in_review or result.refused or result.responses:
            logger.info(
                "claims: %d submitted, %d in review, %d refused, %d not sent, %d responses",
                result.submitted, result.in_review, result.refused, result.not_sent,
                result.responses,
            )  # fmt: skip
        return result

    async def _send(
        self, client: httpx.AsyncClient, batch: Batch, result: SubmitResult, handed: _Handed
    ) -> tuple[str, bool]:
        """Send one batch and settle it, whatever happens: (what became of it, go on?)."""
        count = len(batch.claim_ids)
        if batch.kind == "fhir":
            headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
            if batch.identifier:
                headers["If-None-Exist"] = f"identifier={batch.identifier}"
            url = "Claim"
        else:
            headers = {"Content-Type": X12_MEDIA, "Accept": f"{X12_MEDIA}, */*"}
            url = "submissions"
        before = handed.count
        try:
            async with asyncio.timeout(self._send_limit_s):
                response = await client.post(url, content=batch.payload, headers=headers)
        except Exception as exc:
            return await self._failed(batch, result, exc, left=handed.count > before)
        status = response.status_code
        if 200 <= status < 300:
            return await self._received(batch, response, result), True
        if status in _UNREAD:
            await self.lifecycle.not_sent(batch.id, f"not taken: HTTP {status}")
            result.not_sent += count
            if status in _CREDENTIALS:
                result.errors.append(
                    f"the claims endpoint refused our credentials (HTTP {status}): check "
                    "[claims] auth; the claims stay ready"
                )
            return "not sent", False
        if status == 413:
            # Too large to be read (a body limit in front of the endpoint): nothing was taken,
            # nothing to correct. Smaller batches go on; one claim alone is a limit to mend.
            await self.lifecycle.not_sent(batch.id, "not taken: HTTP 413, too large")
            result.not_sent += count
            if count > 1:
                self._batch_limit = max(1, count // 2)
                return f"not sent (HTTP 413: too large; next {self._batch_limit})", True
            result.errors.append(
                "the claims endpoint answered HTTP 413 (too large) to one claim alone: a body "
                "limit in front of it; ask the clearinghouse; the claims stay ready"
            )
            return "not sent (HTTP 413: too large)", False
        if 300 <= status < 400 or status in _ADDRESS:
            what = "moved elsewhere" if status < 400 else "does not take submissions there"
            await self.lifecycle.not_sent(batch.id, f"not taken: HTTP {status}, wrong address")
            result.not_sent += count
            result.errors.append(
                f"the claims endpoint answered HTTP {status} (it {what}): check [claims] "
                "endpoint_url; the claims stay ready"
            )
            return f"not sent (HTTP {status}: wrong address)", False
        if status >= 500:
            await self.lifecycle.ambiguous(batch.id, f"HTTP {status}")
            result.in_review += count
            return f"in review (HTTP {status})", False
        await self.lifecycle.refused(batch.id, f"HTTP {status}")
        result.refused += count
        return f"refused (HTTP {status})", True

    async def _failed(
        self, batch: Batch, result: SubmitResult, exc: Exception, *, left: bool
    ) -> tuple[str, bool]:
        """Settle a batch whose request raised (``left``: it was handed to the transport)."""
        count = len(batch.claim_ids)
        name = type(exc).__name__  # the type only: an exception's text may quote a claim
        if isinstance(exc, UpstreamError) and exc.failure is Failure.AUTH:
            # The bearer auth (the token refused again after reading the file anew, or the
            # file unreadable: the endpoint answered 401 without reading the request), or
            # the TLS handshake failed or was refused. Its message names no claim.
            await self.lifecycle.not_sent(batch.id, "not taken: credentials or TLS refused")
            result.not_sent += count
            result.errors.append(
                f"the claims endpoint did not take our credentials or TLS ({exc.message}): "
                "check [claims] auth, token_file and the TLS files; the claims stay ready"
            )
            return "not sent", False
        # h11 refusing to form the request (a header no request can carry) sends nothing.
        left = left and not isinstance(exc, httpx.LocalProtocolError)
        if isinstance(exc, _NO_CONNECTION) or not left:
            await self.lifecycle.not_sent(batch.id, f"not sent: {name}")
            result.not_sent += count
            if not isinstance(exc, _NO_CONNECTION):  # unreachable is routine; this is not
                result.errors.append(f"sending failed before the request left ({name})")
            return "not sent", False
        if isinstance(exc, TimeoutError):
            outcome = f"no answer within {self._send_limit_s:g} s"
        elif isinstance(exc, httpx.HTTPError):
            # The request (or part of it) left the box and no answer came, or none that can
            # be read (a body that is not the gzip it claims): it may have landed.
            outcome = f"no answer: {name}"
        else:
            outcome = f"failed after it left: {name}"
            result.errors.append(f"sending failed after the request left ({name})")
        await self.lifecycle.ambiguous(batch.id, outcome)
        result.in_review += count
        return f"in review ({outcome})", False

    async def _received(self, batch: Batch, response: httpx.Response, result: SubmitResult) -> str:
        count = len(batch.claim_ids)
        outcome = f"received: HTTP {response.status_code}"
        if batch.kind == "fhir":
            body: Any = None
            if response.content:
                try:
                    body = response.json()
                except ValueError:
                    body = None
            refusal = fhir_outcome(body)
            if refusal is not None:
                await self.lifecycle.refused(batch.id, refusal)
                result.refused += count
                return "refused"
            await self.lifecycle.delivered(batch.id, outcome)
            result.submitted += count
            return "submitted and acknowledged"
        await self.lifecycle.sent(batch.id, outcome)
        result.submitted += count
        text = response.text
        if text.lstrip().startswith("ISA"):
            try:
                applied = await self.lifecycle.apply_response(text, "sync:submission")
                result.responses += 0 if applied.duplicate else 1
            except AckError as exc:
                result.errors.append(f"the answer's 999 could not be read: {exc}")
            except (ValueError, OverflowError) as exc:
                result.errors.append(f"the answer's 999 could not be read ({type(exc).__name__})")
        return "submitted"

    async def _poll(self, client: httpx.AsyncClient, result: SubmitResult) -> int:
        """Fetch and apply new response files; the cursor moves after each applied file."""
        rows = await self._store.query("SELECT value FROM meta WHERE key = ?", (CURSOR_KEY,))
        since = (
            ""
            if not rows
            else bytes(rows[0][0]).decode()
            if isinstance(rows[0][0], bytes)
            else str(rows[0][0])
        )
        try:
            # Bounded as a submission is: a page dribbled without end would hold the sync
            # round, and the sync lease with it (every lane of the outbox), for ever.
            async with asyncio.timeout(self._send_limit_s):
                response = await client.get("responses", params={"since": since})
        except TimeoutError:
            result.errors.append(f"polling responses: no answer within {self._send_limit_s:g} s")
            return 0
        except UpstreamError as exc:
            # A token refused or unreadable, TLS refused, an answer past 64 MB: our words,
            # naming a file at most (what a person must mend), never a claim.
            result.errors.append(f"polling responses: {exc.message}")
            return 0
        except httpx.HTTPError as exc:  # unreachable, cut off, a body that cannot be decoded
            result.errors.append(f"polling responses: {type(exc).__name__}")
            return 0
        if response.status_code != 200:
            result.errors.append(f"polling responses: HTTP {response.status_code}")
            return 0
        try:
            page = response.json()
            items = page["responses"]
            following = page.get("next")
            # No next (absent or null): ask from the same place again.
            cursor = since if following is None else str(following)
            if not isinstance(items, list):
                raise TypeError("responses is not a list")
        except (ValueError, KeyError, TypeError, AttributeError):
            result.errors.append("polling responses: not the documented JSON")
            return 0
        applied = 0
        for item in items:
            fields = item if isinstance(item, dict) else {}
            ident = str(fields.get("id", "?"))
            try:
                done = await self.lifecycle.apply_response(str(item["body"]), "sync:poll")
                applied += 0 if done.duplicate else 1
            except AckError as exc:
                # Kept out of the cursor's way (the clearinghouse will not change the file):
                # the rest still apply, and this one is kept on a list for staff.
                await self.lifecycle.note_unreadable(
                    ident, str(fields.get("kind", "?")), str(exc), str(fields.get("body", ""))
                )
                result.errors.append(f"response {ident}: {exc} (kept on the unreadable list)")
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                result.errors.append(
                    f"response {ident}: not a response file ({type(exc).__name__})"
                )
        await self._store.transact(lambda conn: db.set_meta(conn, CURSOR_KEY, cursor.encode()))
        return applied
