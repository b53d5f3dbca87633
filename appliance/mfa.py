"""TOTP second factor (RFC 6238), recovery codes and the pre-MFA login step.

HIPAA 164.312(d) person authentication; ONC 170.315(d)(13) multi-factor authentication;
OWASP ASVS 4.0.3 V2.7-V2.8 (time-based one-time passwords) and V2.6 (look-up secrets).

* **Secret**: 160 random bits (RFC 4226 recommends 160), base32, SHA-1, 6 digits, 30 s —
  the parameters every authenticator app understands. Stored sealed with the store's
  keyring (``mfa_totp.secret``, bound to the user id), re-sealed by key rotation.
* **Window**: a code of the previous, current or next 30 s step is accepted (clock drift
  of a phone), and only if its step is newer than the last accepted one, so a code — or
  an older code seen over a shoulder — is never accepted twice (ASVS V2.8.4).
* **Recovery codes**: ten single-use 80-bit codes, kept as salted SHA-256 (ASVS V2.6.2
  allows a salted fast hash below 112 bits of entropy; 80 bits make guessing hopeless
  online and costly offline).
* **Challenge**: after the right password, a user with a second factor (or an admin who
  must enrol one) holds only a *challenge* token — a separate cookie, accepted by the MFA
  pages alone, with a 5-minute life and 5 attempts. The session is created only when the
  second factor is proven, with a new token (no fixation across the step).

Time is a parameter (``now``) everywhere; every function runs on the database thread.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import pyotp
import segno

from appliance import db
from appliance.fhir import utc_text
from appliance.keys import KeySource, keyring_of

DIGITS = 6
STEP_S = 30
DRIFT_STEPS = 1  # one step either side: RFC 6238 section 5.2 recommends at most one
RECOVERY_CODES = 10
CHALLENGE_TTL_S = 300
CHALLENGE_MAX_ATTEMPTS = 5
SEAL_LABEL = "mfa_totp.secret"  # the seal's binding; also in key_rotation.SEALED_COLUMNS
_RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i: read off paper


class ChallengePurpose(StrEnum):
    """Why a password-verified user holds a challenge instead of a session."""

    VERIFY = "verify"  # enter the code of an enrolled second factor
    ENROL = "enrol"  # an administrator without a second factor must set one up first


class Method(StrEnum):
    """How the second factor was proven."""

    TOTP = "totp"
    RECOVERY_CODE = "recovery code"


@dataclass(frozen=True, slots=True)
class Challenge:
    """The pre-MFA state: a correct password, nothing more."""

    user_id: int
    username: str
    role: str
    purpose: ChallengePurpose
    csrf: str
    next_path: str
    attempts: int


def _step(now: datetime) -> int:
    return int(now.timestamp()) // STEP_S


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def is_enabled(conn: sqlite3.Connection, user_id: int) -> bool:
    """Whether ``user_id`` has a confirmed second factor."""
    row = conn.execute(
        "SELECT 1 FROM mfa_totp WHERE user_id = ? AND confirmed_at IS NOT NULL", (user_id,)
    ).fetchone()
    return row is not None


def begin_enrolment(
    conn: sqlite3.Connection, keyring: KeySource, user_id: int, *, now: datetime
) -> str:
    """The secret of a pending enrolment, made now if none is pending.

    Reloading the enrolment page shows the same secret (the person may have scanned it
    already); an account with a confirmed factor must have it reset first.
    """
    with db.transaction_sync(conn):
        row = conn.execute(
            "SELECT secret, confirmed_at FROM mfa_totp WHERE user_id = ?", (user_id,)
        ).fetchone()
        if row is not None:
            if row[1] is not None:
                raise ValueError("a second factor is already enrolled; reset it first")
            return keyring_of(keyring, conn).unseal(SEAL_LABEL, str(user_id), bytes(row[0]))
        secret = pyotp.random_base32(32)  # 32 base32 characters = 160 bits
        conn.execute(
            "INSERT INTO mfa_totp (user_id, secret, created_at) VALUES (?,?,?)",
            (
                user_id,
                keyring_of(keyring, conn).seal(SEAL_LABEL, str(user_id), secret),
                utc_text(now),
            ),
        )
    return secret


def provisioning_uri(secret: str, username: str, issuer: str) -> str:
    """The ``otpauth://`` URI an authenticator app reads from the QR code."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_S).provisioning_uri(
        name=username, issuer_name=issuer
    )


def qr_data_uri(uri: str) -> str:
    """The QR code of ``uri`` as an SVG ``data:`` URI (an ``<img>``: no inline script)."""
    return str(segno.make(uri, error="m").svg_data_uri(scale=6, border=2))


def _matching_step(secret: str, code: str, now: datetime, last_step: int) -> int | None:
    code = "".join(code.split())
    if len(code) != DIGITS or not (code.isascii() and code.isdigit()):
        return None  # "²²²²²²" passes isdigit(); compare_digest refuses non-ASCII text
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_S)
    current = _step(now)
    found = None
    for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1):
        # Every candidate is compared (no early exit), in constant time.
        if hmac.compare_digest(totp.at(step * STEP_S), code) and step > last_step:
            found = step
    return found


def _new_recovery_codes(conn: sqlite3.Connection, user_id: int) -> list[str]:
    conn.execute("DELETE FROM mfa_recovery_codes WHERE user_id = ?", (user_id,))
    codes = []
    for _ in range(RECOVERY_CODES):
        raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(16))  # ~79 bits
        code = "-".join(raw[i : i + 4] for i in range(0, 16, 4))
        salt = secrets.token_bytes(16)
        conn.execute(
            "INSERT INTO mfa_recovery_codes (user_id, salt, code_hash) VALUES (?,?,?)",
            (user_id, salt, _recovery_hash(salt, raw)),
        )
        codes.append(code)
    return codes


def _recovery_hash(salt: bytes, normalised: str) -> bytes:
    return hashlib.sha256(salt + normalised.encode()).digest()


def confirm_enrolment(
    conn: sqlite3.Connection, keyring: KeySource, user_id: int, code: str, *, now: datetime
) -> list[str] | None:
    """Prove the pending secret with a code; returns the new recovery codes, or None."""
    with db.transaction_sync(conn):
        row = conn.execute(
            "SELECT secret, last_step FROM mfa_totp WHERE user_id = ? AND confirmed_at IS NULL",
            (user_id,),
        ).fetchone()
        if row is None:
            return None
        secret = keyring_of(keyring, conn).unseal(SEAL_LABEL, str(user_id), bytes(row[0]))
        step = _matching_step(secret, code, now, int(row[1]))
        if step is None:
            return None
        conn.execute(
            "UPDATE mfa_totp SET confirmed_at = ?, last_step = ? WHERE user_id = ?",
            (utc_text(now), step, user_id),
        )
        return _new_recovery_codes(conn, user_id)


def verify(
    conn: sqlite3.Connection, keyring: KeySource, user_id: int, code: str, *, now: datetime
) -> Method | None:
    """Check a TOTP code or an unused recovery code; consumes what it accepts."""
    with db.transaction_sync(conn):
        row = conn.execute(
            "SELECT secret, last_step FROM mfa_totp WHERE user_id = ? AND confirmed_at IS NOT NULL",
            (user_id,),
        ).fetchone()
        if row is None:
            return None
        secret = keyring_of(keyring, conn).unseal(SEAL_LABEL, str(user_id), bytes(row[0]))
        step = _matching_step(secret, code, now, int(row[1]))
        if step is not None:
            conn.execute("UPDATE mfa_totp SET last_step = ? WHERE user_id = ?", (step, user_id))
            return Method.TOTP
        normalised = "".join(ch for ch in code.lower() if ch.isalnum())
        if len(normalised) != 16:
            return None
        found = None
        for code_id, salt, stored in conn.execute(
            "SELECT id, salt, code_hash FROM mfa_recovery_codes "
            "WHERE user_id = ? AND used_at IS NULL",
            (user_id,),
        ).fetchall():
            if hmac.compare_digest(_recovery_hash(bytes(salt), normalised), bytes(stored)):
                found = code_id
        if found is None:
            return None
        conn.execute(
            "UPDATE mfa_recovery_codes SET used_at = ? WHERE id = ?", (utc_text(now), found)
        )
        return Method.RECOVERY_CODE


def recovery_codes_left(conn: sqlite3.Connection, user_id: int) -> int:
    """How many unused recovery codes ``user_id`` has."""
    row = conn.execute(
        "SELECT count(*) FROM mfa_recovery_codes WHERE user_id = ? AND used_at IS NULL",
        (user_id,),
    ).fetchone()
    return int(row[0])


def regenerate_recovery_codes(conn: sqlite3.Connection, user_id: int) -> list[str]:
    """Replace every recovery code of an enrolled account (the old ones stop working)."""
    with db.transaction_sync(conn):
        if not is_enabled(conn, user_id):
            raise ValueError("no second factor is enrolled")
        return _new_recovery_codes(conn, user_id)


def remove(conn: sqlite3.Connection, user_id: int) -> None:
    """Delete the second factor and recovery codes (inside the caller's transaction)."""
    conn.execute("DELETE FROM mfa_totp WHERE user_id = ?", (user_id,))
    conn.execute("DELETE FROM mfa_recovery_codes WHERE user_id = ?", (user_id,))


# -- the pre-MFA step ------------------------------------------------------------------------


def create_challenge(
    conn: sqlite3.Connection,
    user_id: int,
    purpose: ChallengePurpose,
    next_path: str,
    *,
    now: datetime,
) -> str:
    """Start the second step for a password-verified user; returns the challenge token."""
    token = secrets.token_urlsafe(32)
    expired = utc_text(now - timedelta(seconds=CHALLENGE_TTL_S))
    with db.transaction_sync(conn):
        conn.execute("DELETE FROM mfa_challenges WHERE created_at < ?", (expired,))
        conn.execute(
            "INSERT INTO mfa_challenges (token_hash, user_id, purpose, csrf, next_path, "
            "created_at) VALUES (?,?,?,?,?,?)",
            (
                _token_hash(token),
                user_id,
                purpose.value,
                secrets.token_urlsafe(32),
                next_path,
                utc_text(now),
            ),
        )
    return token


def load_challenge(conn: sqlite3.Connection, token: str, *, now: datetime) -> Challenge | None:
    """The live challenge for ``token`` (None when unknown, expired or used up)."""
    row = conn.execute(
        "SELECT c.user_id, u.username, u.role, c.purpose, c.csrf, c.next_path, c.created_at, "
        "c.attempts, u.disabled FROM mfa_challenges c JOIN users u ON u.id = c.user_id "
        "WHERE c.token_hash = ?",
        (_token_hash(token),),
    ).fetchone()
    if row is None:
        return None
    user_id, username, role, purpose, csrf, next_path, created, attempts, disabled = row
    age = (now - datetime.fromisoformat(created)).total_seconds()
    if disabled or age > CHALLENGE_TTL_S or attempts >= CHALLENGE_MAX_ATTEMPTS:
        end_challenge(conn, token)
        return None
    return Challenge(
        int(user_id), username, role, ChallengePurpose(purpose), csrf, next_path, int(attempts)
    )


def count_failed_attempt(conn: sqlite3.Connection, token: str) -> None:
    """One more wrong code against this challenge (it dies after the fifth)."""
    with db.transaction_sync(conn):
        conn.execute(
            "UPDATE mfa_challenges SET attempts = attempts + 1 WHERE token_hash = ?",
            (_token_hash(token),),
        )


def end_challenge(conn: sqlite3.Connection, token: str) -> None:
    """Forget a challenge (used, expired or abandoned)."""
    with db.transaction_sync(conn):
        conn.execute("DELETE FROM mfa_challenges WHERE token_hash = ?", (_token_hash(token),))
