"""An upstream FHIR server as the sync agent sees it: one HTTP client, errors put in classes.

The classes follow the Medplum agent's queue (STYLE.md): **transient** (connection refused or
reset, 5xx, 429) → retry later with backoff; **ambiguous** (the request went out but no answer
came back) → resend, which is safe only because every write we send is idempotent;
**too large** (413, or a 400 whose OperationOutcome says the bundle has too many entries) →
send smaller bundles; **permanent** (other 4xx) → the server refused the content.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import httpx

from appliance.config import AuthKind, UpstreamConfig
from appliance.errors import ApplianceError, KeyFileError

logger = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"


class Failure(StrEnum):
    """How a request failed, which decides what the agent does next."""

    TRANSIENT = "transient"
    AMBIGUOUS = "ambiguous"
    TOO_LARGE = "too_large"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class UpstreamError(Exception):
    """A failed exchange with the upstream, classified; ``message`` is free of PHI."""

    failure: Failure
    message: str
    retry_after_s: float | None = None

    def __str__(self) -> str:
        return f"{self.failure}: {self.message}"


def outcome_text(body: Any) -> str:
    """The diagnostics of an OperationOutcome, as one line (the server's words)."""
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        parts = []
        for issue in body.get("issue", []):
            text = (
                issue.get("diagnostics")
                or issue.get("details", {}).get("text")
                or issue.get("code")
            )
            if text:
                parts.append(str(text))
        return "; ".join(parts)[:500] or "OperationOutcome without diagnostics"
    return ""


_TOO_LARGE_WORDS = ("too many", "too large", "entries", "payload too large")


def classify_response(status: int, body: Any, retry_after: str | None) -> UpstreamError:
    """Put a non-2xx answer to a whole request into its class."""
    text = outcome_text(body) or f"HTTP {status}"
    if status == 413 or (status == 400 and any(w in text.lower() for w in _TOO_LARGE_WORDS)):
        return UpstreamError(Failure.TOO_LARGE, text)
    if status == 429 or status >= 500:
        delay = None
        if retry_after is not None:
            try:
                delay = max(0.0, float(retry_after))
            except ValueError:
                delay = None
        return UpstreamError(Failure.TRANSIENT, text, delay)
    return UpstreamError(Failure.PERMANENT, text)


def build_client(upstream: UpstreamConfig) -> httpx.AsyncClient:
    """An HTTP client for one upstream, authenticated as the site config says."""
    headers = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}
    kwargs: dict[str, Any] = {}
    if upstream.auth is AuthKind.BEARER:
        assert upstream.token_file is not None  # the config parser requires it
        try:
            token = upstream.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise KeyFileError(
                f"{upstream.token_file}: cannot read the bearer token ({exc.strerror})"
            ) from exc
        headers["Authorization"] = f"Bearer {token}"
    elif upstream.auth is AuthKind.MTLS:
        assert upstream.client_cert_file is not None
        assert upstream.client_key_file is not None
        kwargs["cert"] = (str(upstream.client_cert_file), str(upstream.client_key_file))
        if upstream.ca_file is not None:
            kwargs["verify"] = str(upstream.ca_file)
    elif upstream.auth is AuthKind.SMART:
        raise ApplianceError(
            f"sync.upstream {upstream.name}: SMART Backend Services authentication is not "
            "available in this release; use bearer or mtls (see docs/site-config.md)"
        )
    return httpx.AsyncClient(
        base_url=upstream.base_url,
        headers=headers,
        timeout=httpx.Timeout(upstream.timeout_s, connect=min(10.0, upstream.timeout_s)),
        **kwargs,
    )


async def post_bundle(client: httpx.AsyncClient, bundle: dict[str, Any]) -> dict[str, Any]:
    """POST a batch/transaction Bundle to the server base; returns the response Bundle."""
    try:
        response = await client.post("", json=bundle)
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
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 300:
        raise classify_response(response.status_code, body, response.headers.get("Retry-After"))
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise UpstreamError(
            Failure.TRANSIENT, f"HTTP {response.status_code} without a response Bundle"
        )
    return body
