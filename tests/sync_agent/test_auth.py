"""Upstream authentication against real servers on loopback: SMART Backend Services, a static
bearer token, and mutual TLS (tests/sync_agent/token_server.py is the other end)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from appliance.config import AuthKind, UpstreamConfig
from appliance.errors import ConfigError, KeyFileError
from appliance.store import Store
from sync_agent.auth import (
    ASSERTION_LIFETIME_S,
    DEFAULT_SCOPE,
    SmartBackendAuth,
    client_assertion,
    load_signing_key,
    public_jwks,
    read_token_file,
)
from sync_agent.link_health import probe
from sync_agent.outbox_delivery import Deliverer
from sync_agent.transport import build_client
from sync_agent.upstream import Failure, UpstreamError, post_bundle
from tests import factories
from tests.fhir_peer.peer import FhirPeer
from tests.sync_agent.token_server import FakeClock, ServerTls, TokenServer, serving

CLIENT_ID = "appliance-site-7"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# -- keys and certificates --------------------------------------------------------------------


def _pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _new_key(algorithm: str) -> PrivateKey:
    if algorithm == "RS384":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP384R1())


def _states(db_path: Path) -> list[tuple[str, int]]:
    conn = sqlite3.connect(db_path)
    rows = conn.execute(
        "SELECT state, count(*) FROM outbox GROUP BY state ORDER BY state"
    ).fetchall()
    conn.close()
    return rows


def _chain(exc: BaseException) -> str:
    """Every exception raised with ``exc`` (causes and contexts), as text and as repr."""
    seen: list[str] = []
    current: BaseException | None = exc
    while current is not None:
        seen += [str(current), repr(current)]
        current = current.__cause__ or current.__context__
    return "\n".join(seen)


def _bundle(n: int = 1) -> dict[str, Any]:
    entry = {"resource": {"resourceType": "Device"}, "request": {"method": "POST", "url": "Device"}}
    return {"resourceType": "Bundle", "type": "batch", "entry": [entry] * n}


async def _patient_with_readings(store: Store, n: int) -> None:
    [pat] = await store.create([factories.patient()], "user:nurse1")
    ref = f"Patient/{pat.logical_id}"
    await store.create(
        [factories.bp_observation(ref, systolic=110 + i) for i in range(n)], "service:devices"
    )


# -- SMART fixtures -----------------------------------------------------------------------------


@dataclass
class Smart:
    server: TokenServer
    clock: FakeClock
    upstream: UpstreamConfig
    key_file: Path

    def auth(self, **overrides: Any) -> SmartBackendAuth:
        args: dict[str, Any] = {
            "client_id": CLIENT_ID,
            "token_url": self.server.token_url,
            "key": load_signing_key(self.key_file, self.upstream.algorithm),
            "clock": self.clock.now,
            "monotonic": self.clock.monotonic,
            "timeout": 5.0,
        } | overrides
        return SmartBackendAuth(**args)

    def client(self, **overrides: Any) -> httpx.AsyncClient:
        return build_client(self.upstream, auth=self.auth(**overrides))


@pytest.fixture(params=["RS384", "ES384"])
def algorithm(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def smart(tmp_path: Path, algorithm: str) -> AsyncIterator[Smart]:
    clock = FakeClock()
    server = TokenServer(clock=clock)
    key = _new_key(algorithm)
    key_file = _write(tmp_path / "smart-key.pem", _pem(key))
    server.register(CLIENT_ID, public_jwks(load_signing_key(key_file, algorithm))["keys"][0])
    async with serving(server.create_app()) as port:
        server.token_url = f"http://127.0.0.1:{port}/token"
        upstream = UpstreamConfig(
            name="ehr",
            base_url=f"http://127.0.0.1:{port}/fhir",
            auth=AuthKind.SMART,
            client_id=CLIENT_ID,
            token_url=server.token_url,
            private_key_file=key_file,
            algorithm=algorithm,
            timeout_s=5.0,
        )
        yield Smart(server, clock, upstream, key_file)


# -- the client assertion and the key file -----------------------------------------------------


async def test_assertion_carries_the_backend_services_claims_and_the_thumbprint_kid(
    tmp_path: Path, algorithm: str
) -> None:
    key_file = _write(tmp_path / "k.pem", _pem(_new_key(algorithm)))
    key = load_signing_key(key_file, algorithm)
    now = datetime(2026, 11, 26, 12, tzinfo=UTC)
    token_url = "https://ehr.example/oauth2/token"
    assertion = client_assertion(key, CLIENT_ID, token_url, now=now, jti="jti-1")
    [public] = public_jwks(key)["keys"]
    assert "d" not in public  # the JWKS to register holds no private part
    verifier = RSAKey.import_key(public) if algorithm == "RS384" else ECKey.import_key(public)
    decoded = jwt.decode(assertion, verifier, algorithms=[algorithm])
    assert decoded.header == {"alg": algorithm, "kid": verifier.thumbprint(), "typ": "JWT"}
    assert public["kid"] == verifier.thumbprint()
    exp = int(now.timestamp()) + ASSERTION_LIFETIME_S
    assert decoded.claims == {
        "iss": CLIENT_ID,
        "sub": CLIENT_ID,
        "aud": token_url,
        "exp": exp,
        "jti": "jti-1",
    }
    assert exp - int(now.timestamp()) <= 300


def _ec_p256() -> bytes:
    return _pem(ec.generate_private_key(ec.SECP256R1()))


def _public_only() -> bytes:
    return (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


@pytest.mark.parametrize(
    ("algorithm", "content", "mode", "words"),
    [
        ("RS384", lambda: _pem(_new_key("ES384")), 0o600, "not an RSA private key"),
        ("ES384", lambda: _pem(_new_key("RS384")), 0o600, "not an EC P-384 private key"),
        ("ES384", _ec_p256, 0o600, "secp256r1; ES384 needs P-384"),
        ("RS384", lambda: _pem(rsa.generate_private_key(65537, 1024)), 0o600, "2048 bits"),
        ("ES384", _public_only, 0o600, "holds a public key"),
        (
            "ES384",
            lambda: b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            0o600,
            "unencrypted PEM",
        ),
        ("ES384", lambda: _pem(_new_key("ES384")), 0o644, "chmod 600"),
        ("ES384", None, 0o600, "not found"),
    ],
    ids=[
        "ec-for-rs384",
        "rsa-for-es384",
        "p256",
        "rsa-1024",
        "public",
        "garbage",
        "0644",
        "missing",
    ],
)
def test_an_unusable_private_key_is_refused_naming_the_file_not_the_key(
    tmp_path: Path,
    algorithm: str,
    content: Callable[[], bytes] | None,
    mode: int,
    words: str,
) -> None:
    path = tmp_path / "smart-key.pem"
    data = b""
    if content is not None:
        data = content()
        _write(path, data, mode)
    with pytest.raises(KeyFileError) as caught:
        load_signing_key(path, algorithm)
    message = str(caught.value)
    assert str(path) in message
    assert words in message
    assert "\n" not in message
    body_lines = [line for line in data.decode().splitlines() if line and "-----" not in line]
    assert not any(line in message for line in body_lines)


async def test_build_client_stops_at_start_when_the_smart_key_is_wrong(tmp_path: Path) -> None:
    key_file = _write(tmp_path / "k.pem", _pem(_new_key("ES384")))
    upstream = UpstreamConfig(
        name="ehr",
        base_url="http://127.0.0.1:9/fhir",
        auth=AuthKind.SMART,
        client_id=CLIENT_ID,
        token_url="http://127.0.0.1:9/token",
        private_key_file=key_file,
        algorithm="RS384",
    )
    with pytest.raises(KeyFileError, match=str(key_file)):
        build_client(upstream)


# -- SMART end to end ---------------------------------------------------------------------------


async def test_outbox_drains_over_many_bundles_with_one_token(
    smart: Smart, store: Store, db_path: Path
) -> None:
    await _patient_with_readings(store, 6)
    async with smart.client() as client:
        result = await Deliverer(store, client, max_entries=2, rng=random.Random(1)).drain()
    assert (result.delivered, result.dead, result.error) == (7, 0, None)
    assert len(smart.server.bundles) >= 4
    assert (smart.server.issued, smart.server.token_requests, smart.server.unauthorized) == (
        1,
        1,
        0,
    )
    assert smart.server.scopes == [DEFAULT_SCOPE]
    [token] = smart.server.tokens
    assert set(smart.server.auth_headers) == {f"Bearer {token}"}
    assert _states(db_path) == [("delivered", 7)]


async def test_the_scope_in_the_site_config_is_the_one_asked_for(smart: Smart) -> None:
    narrow = "system/Observation.cu system/Patient.rs"
    upstream = replace(smart.upstream, scope=narrow)
    auth = SmartBackendAuth.from_config(
        upstream, timeout=5.0, clock=smart.clock.now, monotonic=smart.clock.monotonic
    )
    async with build_client(upstream, auth=auth) as client:
        await post_bundle(client, {"resourceType": "Bundle", "type": "batch", "entry": []})
    assert smart.server.scopes == [narrow]


async def test_token_is_refreshed_shortly_before_it_expires(smart: Smart) -> None:
    async with smart.client() as client:
        await post_bundle(client, _bundle())
        smart.clock.advance(200)  # expires_in 300, refreshed 60 s early
        await post_bundle(client, _bundle())
        assert smart.server.issued == 1
        smart.clock.advance(45)
        await post_bundle(client, _bundle())
    assert smart.server.issued == 2
    assert smart.server.unauthorized == 0  # refreshed ahead of time, never refused
    first, second = smart.server.tokens
    assert smart.server.auth_headers == [f"Bearer {first}"] * 2 + [f"Bearer {second}"]


@pytest.mark.parametrize("answered", [float("nan"), float("inf"), -5, "300", True, 10**400, 10**12])
async def test_an_expires_in_that_is_not_a_lifetime_counts_as_the_default(
    smart: Smart, answered: object
) -> None:
    smart.server.answered_expires_in = answered  # the endpoint's own tokens last 300 s
    async with smart.client() as client:
        await post_bundle(client, _bundle())
        smart.clock.advance(200)  # the default lifetime is 300 s, refreshed 60 s early
        await post_bundle(client, _bundle())
        assert smart.server.issued == 1  # before (NaN): a new token for every request
        smart.clock.advance(45)
        await post_bundle(client, _bundle())
    assert smart.server.issued == 2
    assert smart.server.unauthorized == 0


async def test_a_token_answer_nested_too_deep_is_an_auth_failure_not_a_crash(
    smart: Smart,
) -> None:
    smart.server.answer_raw = b"[" * 200_000
    async with smart.client() as client:
        with pytest.raises(UpstreamError) as caught:  # before: RecursionError, the process died
            await post_bundle(client, _bundle())
        assert caught.value.failure is Failure.AUTH
        await post_bundle(client, _bundle())  # the next answer is a token again
    assert smart.server.issued == 1


@pytest.mark.parametrize(
    "token",
    [
        "opaque-token-value\n",
        "opaque-token-value ",
        "opaque-token value",
        "opaque-token-v\u00e4lue",
        "opaque-token-value\u0000",
        "opaque-token-value\u007f",
    ],
    ids=["line-break", "trailing-space", "space", "non-ascii", "nul", "del"],
)
async def test_an_access_token_no_header_can_carry_is_an_auth_failure_not_a_dead_link(
    smart: Smart,
    store: Store,
    db_path: Path,
    token: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await _patient_with_readings(store, 1)
    answer = json.dumps({"access_token": token, "token_type": "bearer", "expires_in": 300})
    smart.server.answer_raw = answer.encode()
    caplog.set_level(logging.DEBUG)
    async with smart.client() as client:
        with pytest.raises(UpstreamError) as caught:
            await post_bundle(client, _bundle())
        smart.server.answer_raw = answer.encode()
        result = await Deliverer(store, client, max_entries=8, rng=random.Random(1)).drain()
    # Before: sent, and refused by h11 before leaving the box ("Illegal header value", with
    # the token in it); transient with a transport error as cause: "unreachable: check the
    # internet link", probed and drained again twice a second for ever.
    assert caught.value.failure is Failure.AUTH
    assert caught.value.message.startswith(f"token endpoint {smart.server.token_url} answered")
    assert "a control or non-ASCII character" in caught.value.message
    assert "opaque" not in _chain(caught.value)
    assert "opaque" not in caplog.text
    assert smart.server.fhir_requests == 0  # never sent
    assert result.error is not None
    assert result.error.startswith("auth: token endpoint")
    assert (result.link_down, result.unreachable, result.dead) == (True, False, 0)
    assert _states(db_path) == [("pending", 2)]


async def test_a_401_for_a_revoked_token_causes_exactly_one_refresh_and_one_retry(
    smart: Smart,
) -> None:
    async with smart.client() as client:
        await post_bundle(client, _bundle())
        smart.server.revoke_all()
        answer = await post_bundle(client, _bundle(2))
    assert answer["type"] == "batch-response"
    assert (smart.server.issued, smart.server.unauthorized, smart.server.fhir_requests) == (2, 1, 3)
    assert len(smart.server.bundles) == 2


async def test_a_second_401_is_an_auth_failure_and_the_outbox_stays_pending(
    smart: Smart, store: Store, db_path: Path
) -> None:
    await _patient_with_readings(store, 2)
    smart.server.refuse_every_token = True
    async with smart.client() as client:
        result = await Deliverer(store, client, max_entries=8, rng=random.Random(1)).drain()
    assert result.error is not None
    assert result.error.startswith(f"{Failure.AUTH}:")
    assert "HTTP 401" in result.error
    assert (result.link_down, result.unreachable, result.dead) == (True, False, 0)
    assert (smart.server.issued, smart.server.unauthorized) == (2, 2)  # one retry, no more
    assert _states(db_path) == [("pending", 3)]


async def test_an_unregistered_key_is_an_auth_failure_with_the_servers_oauth_text(
    smart: Smart, store: Store, db_path: Path, tmp_path: Path
) -> None:
    await _patient_with_readings(store, 1)
    other = _write(tmp_path / "other.pem", _pem(_new_key(smart.upstream.algorithm)))
    async with smart.client(key=load_signing_key(other, smart.upstream.algorithm)) as client:
        result = await Deliverer(store, client, max_entries=8, rng=random.Random(1)).drain()
    assert result.error is not None
    assert result.error.startswith("auth: token endpoint refused the client: invalid_client")
    assert smart.server.refusals[0] in result.error  # the server's own words
    assert (result.dead, result.unreachable, smart.server.fhir_requests) == (0, False, 0)
    assert _states(db_path) == [("pending", 2)]


@pytest.mark.parametrize("status", [400, 401])
async def test_token_endpoint_invalid_client_is_an_auth_failure(smart: Smart, status: int) -> None:
    smart.server.fail_tokens(status, "invalid_client")
    async with smart.client() as client:
        with pytest.raises(UpstreamError) as caught:
            await post_bundle(client, _bundle())
    assert caught.value.failure is Failure.AUTH
    assert "invalid_client: told to fail" in caught.value.message


async def test_token_endpoint_503_is_transient_and_delivery_resumes_when_it_heals(
    smart: Smart, store: Store, db_path: Path
) -> None:
    await _patient_with_readings(store, 2)
    smart.server.fail_tokens(503)
    async with smart.client() as client:
        deliverer = Deliverer(store, client, max_entries=8, rng=random.Random(1))
        failed = await deliverer.drain()
        assert failed.error is not None
        assert failed.error.startswith("transient: token endpoint")
        # Backoff, not probing: the FHIR server may be answering.
        assert (failed.link_down, failed.unreachable, failed.dead) == (True, False, 0)
        assert _states(db_path) == [("pending", 3)]
        smart.server.heal()
        assert (await deliverer.drain()).delivered == 3
    assert _states(db_path) == [("delivered", 3)]


async def test_a_token_endpoints_retry_after_date_counts_from_its_own_date_not_our_clock(
    smart: Smart,
) -> None:
    # The token server dates its answers by the real clock (Hypercorn's Date header); the
    # box's clock (the FakeClock) stands days away from it, as a box without a battery
    # clock does before NTP answers. The server asks for two minutes, on its own clock.
    later = format_datetime(datetime.now(UTC) + timedelta(minutes=2), usegmt=True)
    smart.server.fail_tokens(503, retry_after=later)
    async with smart.client() as client:
        with pytest.raises(UpstreamError) as caught:
            await post_bundle(client, _bundle())
    assert caught.value.failure is Failure.TRANSIENT
    # Before: counted from the box's clock, the lag came on top (here 0 or a whole day).
    # Both dates are whole seconds: the answer may be dated a second after ``later`` was.
    assert caught.value.retry_after_s in (119.0, 120.0)


async def test_a_408_from_the_token_endpoint_is_transient_not_an_auth_failure(
    smart: Smart,
) -> None:
    smart.server.fail_tokens(408, retry_after="30")
    async with smart.client() as client:
        with pytest.raises(UpstreamError) as caught:
            await post_bundle(client, _bundle())
    # Before: auth ("token endpoint refused the client"), as if the registration were wrong.
    assert caught.value.failure is Failure.TRANSIENT
    assert caught.value.retry_after_s == 30.0


async def test_unreachable_token_endpoint_is_transient_and_the_outbox_stays_pending(
    smart: Smart, store: Store, db_path: Path
) -> None:
    await _patient_with_readings(store, 1)
    async with smart.client(token_url="http://127.0.0.1:9/token") as client:
        result = await Deliverer(store, client, max_entries=8, rng=random.Random(1)).drain()
    assert result.error == "transient: token endpoint: no token (ConnectError)"
    assert (result.link_down, result.dead, smart.server.fhir_requests) == (True, 0, 0)
    assert _states(db_path) == [("pending", 2)]


async def test_concurrent_requests_share_one_token_fetch(smart: Smart) -> None:
    async with smart.client() as client:
        answers = await asyncio.gather(*(post_bundle(client, _bundle()) for _ in range(10)))
    assert len(answers) == 10
    assert (smart.server.token_requests, smart.server.issued) == (1, 1)


async def test_requests_waiting_on_a_failed_token_fetch_share_its_failure(smart: Smart) -> None:
    smart.server.fail_tokens(503)
    async with smart.client() as client:
        outcomes = await asyncio.gather(
            *(post_bundle(client, _bundle()) for _ in range(10)), return_exceptions=True
        )
        assert all(
            isinstance(o, UpstreamError) and o.failure is Failure.TRANSIENT for o in outcomes
        )
        assert smart.server.token_requests == 1  # before: 10, one after the other
        smart.server.heal()
        await post_bundle(client, _bundle())  # a request after the failure fetches again
    assert (smart.server.token_requests, smart.server.issued) == (2, 1)


async def test_a_replayed_assertion_is_refused(smart: Smart) -> None:
    key = load_signing_key(smart.key_file, smart.upstream.algorithm)
    form = {
        "grant_type": "client_credentials",
        "scope": DEFAULT_SCOPE,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": client_assertion(
            key, CLIENT_ID, smart.server.token_url, now=smart.clock.now(), jti="once"
        ),
    }
    async with httpx.AsyncClient() as http:
        first = await http.post(smart.server.token_url, data=form)
        second = await http.post(smart.server.token_url, data=form)
        smart.clock.advance(ASSERTION_LIFETIME_S + 10)
        form["client_assertion"] = client_assertion(
            key,
            CLIENT_ID,
            smart.server.token_url,
            now=smart.clock.now() - timedelta(minutes=10),
            jti="late",
        )
        expired = await http.post(smart.server.token_url, data=form)
    assert first.status_code == 200
    assert second.json() == {
        "error": "invalid_client",
        "error_description": "jti was used before (replay)",
    }
    assert expired.json()["error"] == "invalid_client"


async def test_the_reachability_probe_needs_no_token(smart: Smart) -> None:
    async with smart.client() as client:
        assert await probe(client, 2.0)
    assert smart.server.token_requests == 0


async def test_neither_token_nor_assertion_is_logged(
    smart: Smart, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with smart.client() as client:
        await post_bundle(client, _bundle())
        smart.server.revoke_all()
        await post_bundle(client, _bundle())
    tokens = [h.removeprefix("Bearer ") for h in smart.server.auth_headers]
    assert len(set(tokens)) == 2
    assert "access token obtained" in caplog.text
    assert not any(token in caplog.text for token in tokens)
    assert "eyJ" not in caplog.text  # no JWT (header or assertion) either


# -- static bearer token ----------------------------------------------------------------------


def test_a_bearer_token_file_open_to_others_is_warned_about_naming_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = _write(tmp_path / "token", b"a-token\n", mode=0o644)
    upstream = UpstreamConfig(
        name="hie", base_url="https://127.0.0.1:1/fhir", auth=AuthKind.BEARER, token_file=token_file
    )
    with caplog.at_level(logging.WARNING, logger="sync_agent.auth"):
        build_client(upstream)  # not refused (yet): that would stop the sync on an upgrade
    [warned] = [r.getMessage() for r in caplog.records if "bearer token" in r.getMessage()]
    assert str(token_file) in warned
    assert "chmod 600" in warned
    assert "a-token" not in caplog.text


@pytest.mark.parametrize(
    ("base_url", "token_url", "refused"),
    [
        ("http://ehr.example/fhir", "https://ehr.example/token", {"base_url"}),
        ("https://ehr.example/fhir", "http://10.0.0.5/token", {"token_url"}),
        ("http://127.0.0.1:8080/fhir", "http://[::1]:9/token", set()),  # loopback: tests
        ("http://localhost/fhir", "https://ehr.example/token", set()),
    ],
)
def test_the_sync_refuses_to_send_credentials_in_clear_text_beyond_loopback(
    base_url: str, token_url: str, refused: set[str], tmp_path: Path
) -> None:
    key_file = _write(tmp_path / "smart-key.pem", _pem(_new_key("ES384")))
    smart = UpstreamConfig(
        name="ehr",
        base_url=base_url,
        auth=AuthKind.SMART,
        client_id=CLIENT_ID,
        token_url=token_url,
        private_key_file=key_file,
        algorithm="ES384",
    )
    bearer = replace(smart, auth=AuthKind.BEARER, token_file=_write(tmp_path / "token", b"t\n"))
    for upstream, expected in ((smart, refused), (bearer, refused & {"base_url"})):
        if not expected:
            build_client(upstream)
            continue
        with pytest.raises(ConfigError) as caught:
            build_client(upstream)
        assert {p.split(": ", 1)[0] for p in caught.value.problems} == {
            f"sync.upstream 'ehr'.{key}" for key in expected
        }
        assert all("use https" in p for p in caught.value.problems)


@pytest.mark.parametrize(
    "token",
    ["00Dxx0000001gPL!AR8AQJXg5oj8jXSgxJfA0lBog", "key:secret", "a%2Fb*c", "=padded-first"],
)
async def test_a_token_outside_b64token_that_a_header_carries_is_taken(
    tmp_path: Path, fhir_peer: FhirPeer, token: str
) -> None:
    # Servers issue tokens outside RFC 6750's strict b64token (Salesforce's hold "!"); HTTP
    # carries them. Refusing them stopped a box that worked (the review of this session).
    token_file = _write(tmp_path / "token", f"{token}\n".encode())
    assert read_token_file(token_file) == token
    upstream = UpstreamConfig(
        name="ehr", base_url=fhir_peer.base_url, auth=AuthKind.BEARER, token_file=token_file
    )
    async with build_client(upstream) as client:
        response = await client.get("Patient")
    assert response.request.headers["Authorization"] == f"Bearer {token}"
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"first-half\nsecond-half\n", "not one bearer token"),  # two lines pasted
        (b"first-half second-half\n", "not one bearer token"),
        (b"first-half\tsecond-half", "not one bearer token"),
        (b"first-half\x00\n", "not one bearer token"),
        ("first-h\u00e4lf\n".encode(), "not one bearer token"),
        (b"\xfffirst-half\n", "not UTF-8 text"),
    ],
    ids=["line-break", "space", "tab", "nul", "non-ascii", "not-utf8"],
)
def test_a_bearer_token_file_that_is_not_one_token_stops_the_start_naming_the_file(
    tmp_path: Path, content: bytes, words: str
) -> None:
    token_file = _write(tmp_path / "token", content)
    upstream = UpstreamConfig(
        name="hie", base_url="https://127.0.0.1:1/fhir", auth=AuthKind.BEARER, token_file=token_file
    )
    with pytest.raises(KeyFileError) as caught:  # before: taken, and never sendable
        build_client(upstream)
    assert str(caught.value).startswith(f"{token_file}: ")
    assert words in str(caught.value)
    assert "first" not in _chain(caught.value)  # before (not UTF-8): the bytes, in the cause


async def test_a_bearer_token_file_rotated_to_what_is_not_one_token_is_an_auth_failure(
    tmp_path: Path,
) -> None:
    server = TokenServer(clock=FakeClock())
    server.tokens["old-token"] = float("inf")
    token_file = _write(tmp_path / "token", b"old-token\n")
    async with serving(server.create_app()) as port:
        upstream = UpstreamConfig(
            name="hie",
            base_url=f"http://127.0.0.1:{port}/fhir",
            auth=AuthKind.BEARER,
            token_file=token_file,
        )
        async with build_client(upstream) as client:
            await post_bundle(client, _bundle())
            server.revoke_all()
            token_file.write_text("new-token\nnew-token-2\n")  # two pasted for one
            with pytest.raises(UpstreamError) as caught:
                await post_bundle(client, _bundle())
    # Before: sent, refused by h11 before leaving the box, transient with the token in the
    # cause's text: a dead link, for ever.
    assert caught.value.failure is Failure.AUTH
    assert str(token_file) in caught.value.message
    assert "new-token" not in _chain(caught.value)
    assert server.auth_headers == ["Bearer old-token", "Bearer old-token"]


def test_a_client_certificate_without_its_key_is_refused_beside_any_auth(tmp_path: Path) -> None:
    upstream = UpstreamConfig(
        name="ehr",
        base_url="https://127.0.0.1:1/fhir",
        auth=AuthKind.BEARER,
        token_file=_write(tmp_path / "token", b"t\n"),
        client_cert_file=tmp_path / "client.pem",
    )
    with pytest.raises(ConfigError) as caught:  # before: the certificate silently ignored
        build_client(upstream)
    assert caught.value.problems == [
        "sync.upstream 'ehr'.client_key_file: required with the other half of the certificate"
    ]


async def test_bearer_token_file_is_read_again_after_a_401(tmp_path: Path) -> None:
    server = TokenServer(clock=FakeClock())
    server.tokens["old-token"] = float("inf")
    token_file = _write(tmp_path / "token", b"old-token\n")
    async with serving(server.create_app()) as port:
        upstream = UpstreamConfig(
            name="hie",
            base_url=f"http://127.0.0.1:{port}/fhir",
            auth=AuthKind.BEARER,
            token_file=token_file,
        )
        async with build_client(upstream) as client:
            await post_bundle(client, _bundle())
            server.revoke_all()
            server.tokens["new-token"] = float("inf")
            token_file.write_text("new-token\n")  # rotated without a restart
            await post_bundle(client, _bundle())
            server.revoke_all()
            with pytest.raises(UpstreamError) as caught:
                await post_bundle(client, _bundle())
    assert server.auth_headers == [
        "Bearer old-token",
        "Bearer old-token",
        "Bearer new-token",
        "Bearer new-token",
    ]
    assert caught.value.failure is Failure.AUTH
    assert str(token_file) in caught.value.message


# -- mutual TLS ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    server: ServerTls
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from a CA the server does not trust
    stranger_key: Path


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], common_name: str, *, server: bool
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    folder = tmp_path / "pki"
    folder.mkdir()
    ca, other = _ca("Test EHR CA"), _ca("Some other CA")
    server_key, server_cert = _leaf(ca, "127.0.0.1", server=True)
    client_key, client_cert = _leaf(ca, CLIENT_ID, server=False)
    stranger_key, stranger_cert = _leaf(other, "stranger", server=False)
    return Pki(
        ca=_write(folder / "ca.pem", _cert_pem(ca[1]), 0o644),
        other_ca=_write(folder / "other-ca.pem", _cert_pem(other[1]), 0o644),
        server=ServerTls(
            certfile=_write(folder / "server.pem", _cert_pem(server_cert), 0o644),
            keyfile=_write(folder / "server-key.pem", _pem(server_key)),
            client_ca=folder / "ca.pem",
        ),
        client_cert=_write(folder / "client.pem", _cert_pem(client_cert), 0o644),
        client_key=_write(folder / "client-key.pem", _pem(client_key)),
        stranger_cert=_write(folder / "stranger.pem", _cert_pem(stranger_cert), 0o644),
        stranger_key=_write(folder / "stranger-key.pem", _pem(stranger_key)),
    )


@pytest.fixture
async def mtls(pki: Pki) -> AsyncIterator[tuple[TokenServer, UpstreamConfig]]:
    server = TokenServer(clock=FakeClock())
    async with serving(server.create_app(require_token=False), tls=pki.server) as port:
        upstream = UpstreamConfig(
            name="ehr",
            base_url=f"https://127.0.0.1:{port}/fhir",
            auth=AuthKind.MTLS,
            client_cert_file=pki.client_cert,
            client_key_file=pki.client_key,
            ca_file=pki.ca,
            timeout_s=5.0,
        )
        yield server, upstream


@pytest.mark.parametrize("auth", [AuthKind.MTLS, AuthKind.NONE, AuthKind.BEARER])
def test_a_client_certificate_over_http_beyond_loopback_is_refused(
    pki: Pki, tmp_path: Path, auth: AuthKind
) -> None:
    upstream = UpstreamConfig(
        name="ehr",
        base_url="http://ehr.example/fhir",
        auth=auth,
        token_file=_write(tmp_path / "token", b"a-token\n") if auth is AuthKind.BEARER else None,
        client_cert_file=pki.client_cert,
        client_key_file=pki.client_key,
        ca_file=pki.ca,
    )
    with pytest.raises(ConfigError) as caught:  # before (mtls, none): no TLS, records in clear
        build_client(upstream)
    [problem] = caught.value.problems
    assert problem.startswith("sync.upstream 'ehr'.base_url: http ")
    assert "presents no TLS client certificate" in problem
    assert ("bearer credentials in clear text" in problem) is (auth is AuthKind.BEARER)
    assert problem.endswith("use https (http only on loopback, for tests)")
    assert str(caught.value).startswith("upstream 'ehr': 1 problem\n  - sync.upstream 'ehr'")
    build_client(replace(upstream, base_url="http://127.0.0.1:9/fhir"))  # loopback: tests


async def test_mtls_bundle_goes_through_with_the_configured_client_certificate(
    mtls: tuple[TokenServer, UpstreamConfig],
) -> None:
    server, upstream = mtls
    async with build_client(upstream) as client:
        answer = await post_bundle(client, _bundle(2))
    assert answer["type"] == "batch-response"
    assert server.bundles == [["Device", "Device"]]


async def test_a_client_certificate_is_presented_beside_a_bearer_token(
    mtls: tuple[TokenServer, UpstreamConfig], tmp_path: Path
) -> None:
    server, upstream = mtls
    server.tokens["a-token"] = float("inf")
    both = replace(
        upstream, auth=AuthKind.BEARER, token_file=_write(tmp_path / "token", b"a-token\n")
    )
    async with build_client(both) as client:  # before: the certificate was never loaded
        answer = await post_bundle(client, _bundle(1))
    assert answer["type"] == "batch-response"
    assert server.auth_headers == ["Bearer a-token"]


async def test_mtls_without_a_client_certificate_is_a_clear_auth_failure(
    mtls: tuple[TokenServer, UpstreamConfig], store: Store, db_path: Path
) -> None:
    server, upstream = mtls
    await _patient_with_readings(store, 1)
    without_cert = replace(
        upstream, auth=AuthKind.NONE, client_cert_file=None, client_key_file=None
    )
    async with build_client(without_cert) as client:
        result = await Deliverer(store, client, max_entries=8, rng=random.Random(1)).drain()
    assert result.error is not None
    assert result.error.startswith("auth: TLS with 127.0.0.1:")
    assert "client certificate" in result.error
    # A configuration problem: backoff (not probing), nothing dead, nothing marked.
    assert (result.link_down, result.unreachable, result.dead, result.ambiguous) == (
        True,
        False,
        0,
        0,
    )
    assert _states(db_path) == [("pending", 2)]
    assert server.bundles == []


async def test_mtls_with_a_certificate_from_an_unknown_ca_is_refused(
    mtls: tuple[TokenServer, UpstreamConfig], pki: Pki
) -> None:
    server, upstream = mtls
    stranger = replace(
        upstream, client_cert_file=pki.stranger_cert, client_key_file=pki.stranger_key
    )
    async with build_client(stranger) as client:
        with pytest.raises(UpstreamError) as caught:
            await post_bundle(client, _bundle())
    assert caught.value.failure is Failure.AUTH
    assert "client certificate" in caught.value.message
    assert server.bundles == []


async def test_mtls_server_not_trusted_by_ca_file_is_a_clear_auth_failure(
    mtls: tuple[TokenServer, UpstreamConfig], pki: Pki
) -> None:
    server, upstream = mtls
    async with build_client(replace(upstream, ca_file=pki.other_ca)) as client:
        with pytest.raises(UpstreamError) as caught:
            await post_bundle(client, _bundle())
    assert caught.value.failure is Failure.AUTH
    assert "we do not trust the server's certificate" in caught.value.message
    assert caught.value.__cause__ is None  # not mistaken for an unreachable link
    assert server.bundles == []


def test_mtls_client_key_open_to_others_is_refused(pki: Pki, tmp_path: Path) -> None:
    pki.client_key.chmod(0o640)
    upstream = UpstreamConfig(
        name="ehr",
        base_url="https://127.0.0.1:9/fhir",
        auth=AuthKind.MTLS,
        client_cert_file=pki.client_cert,
        client_key_file=pki.client_key,
        ca_file=pki.ca,
    )
    with pytest.raises(KeyFileError, match="chmod 600"):
        build_client(upstream)


def test_mtls_certificate_and_key_that_do_not_match_are_refused(pki: Pki) -> None:
    upstream = UpstreamConfig(
        name="ehr",
        base_url="https://127.0.0.1:9/fhir",
        auth=AuthKind.MTLS,
        client_cert_file=pki.client_cert,
        client_key_file=pki.stranger_key,
        ca_file=pki.ca,
    )
    with pytest.raises(KeyFileError) as caught:
        build_client(upstream)
    assert "do not load together" in str(caught.value)
    assert str(pki.client_cert) in str(caught.value)
