"""Staff identity: accounts with argon2id password hashes, and server-side sessions.

Passwords are hashed with argon2id at OWASP's minimum (ASVS 4.0.3 V2.4.4 / OWASP Password
Storage Cheat Sheet: m = 19 MiB, t = 2, p = 1). A stored hash made with older parameters
is upgraded on the next successful login. A login for an unknown or disabled account still
runs one verification against a dummy hash, so the response time does not reveal which
usernames exist.

A session is a random bearer token (``secrets.token_urlsafe(32)``, 256 bits) held only by
the browser; the database keeps its SHA-256, so a copy of the database cannot be replayed
as a login. Each session carries its own CSRF token. Sessions end after
``idle_timeout_s`` without use (HIPAA 164.312(a)(2)(iii) automatic logoff, ONC
170.315(d)(5)) and after ``absolute_timeout_s`` whatever the activity.

Every function takes a raw :class:`sqlite3.Connection` and runs on the database thread
(callers in the event loop use :func:`appliance.db.run_sync`); each write is one
``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from appliance import db
from appliance.errors import ApplianceError
from appliance.fhir import utc_text

USERNAME_PATTERN = re.compile(r"[a-z0-9._-]{2,32}")
MIN_PASSWORD_LENGTH = 12
# Longer inputs are refused before hashing: argon2 would accept them, but hashing megabytes
# on every attempt is a cheap denial of service (ASVS allows a maximum of at least 64).
MAX_PASSWORD_LENGTH = 1024
ABSOLUTE_TIMEOUT_S = 12 * 3600

# OWASP Password Storage Cheat Sheet, argon2id row 1: 19 MiB, 2 iterations, 1 lane.
HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1, type=Type.ID)


class Role(StrEnum):
    """What a staff member may do; persisted as its value (``users.role``)."""

    NURSE = "nurse"
    PROVIDER = "provider"
    ADMIN = "admin"


class UserError(ApplianceError):
    """A staff account could not be created as asked."""


class InvalidUsernameError(UserError):
    """The username is not 2-32 of a-z, 0-9, '.', '_', '-'."""


class WeakPasswordError(UserError):
    """The password is shorter than the minimum (or absurdly long)."""


class DuplicateUserError(UserError):
    """An account with this username already exists."""


@dataclass(frozen=True, slots=True)
class User:
    """A staff account as the web layer sees it (never the hash)."""

    id: int
    username: str
    role: Role

    @property
    def actor(self) -> str:
        """The audit actor for this person: ``user:<username>``."""
        return f"user:{self.username}"


@dataclass(frozen=True, slots=True)
class Session:
    """A live login: whose it is, its CSRF token, when it began and was last used."""

    user: User
    csrf: str
    created_at: datetime
    seen_at: datetime


@functools.cache
def _dummy_hash() -> str:
    """A hash with the current parameters, verified against when the account is unknown."""
    return HASHER.hash(secrets.token_urlsafe(16))


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def create_user(
    conn: sqlite3.Connection, username: str, password: str, role: Role | str, *, now: datetime
) -> int:
    """Create a staff account and return its id; raises a :class:`UserError` subclass."""
    if not USERNAME_PATTERN.fullmatch(username):
        raise InvalidUsernameError(
            f"username {username!r} must be 2-32 characters of a-z, 0-9, '.', '_' or '-'"
        )
    if len(password) < MIN_PASSWORD_LENGTH:
        raise WeakPasswordError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise WeakPasswordError(f"the password must have at most {MAX_PASSWORD_LENGTH} characters")
    try:
        checked_role = Role(role)
    except ValueError:
        raise UserError(f"unknown role {role!r}; expected one of {', '.join(Role)}") from None
    password_hash = HASHER.hash(password)
    with db.transaction_sync(conn):
        try:
            cursor = conn.execute(
                "INSERT INTO users (username, role, password_hash, created_at) VALUES (?,?,?,?)",
                (username, checked_role.value, password_hash, utc_text(now)),
            )
        except sqlite3.IntegrityError:
            raise DuplicateUserError(f"a user named {username!r} already exists") from None
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def authenticate(conn: sqlite3.Connection, username: str, password: str) -> User | None:
    """The account if ``password`` is right and the account enabled, else None.

    Takes about the same time whether or not the account exists. Upgrades the stored hash
    when the hashing parameters have changed since it was made.
    """
    row = None
    if USERNAME_PATTERN.fullmatch(username) and len(password) <= MAX_PASSWORD_LENGTH:
        row = conn.execute(
            "SELECT id, role, password_hash, disabled FROM users WHERE username = ?", (username,)
        ).fetchone()
    if row is None or row[3]:
        with contextlib.suppress(VerificationError):
            HASHER.verify(_dummy_hash(), password[:MAX_PASSWORD_LENGTH])
        return None
    user_id, role, stored_hash, _ = row
    try:
        HASHER.verify(stored_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if HASHER.check_needs_rehash(stored_hash):
        with db.transaction_sync(conn):
            conn.execute(
                "UPDATE users SET password_hash = ? WHERE id = ?",
                (HASHER.hash(password), user_id),
            )
    return User(int(user_id), username, Role(role))


def create_session(conn: sqlite3.Connection, user_id: int, *, now: datetime) -> tuple[str, str]:
    """Start a session for ``user_id``; returns ``(token, csrf)`` (the token is not stored)."""
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    stamp = utc_text(now)
    expired = utc_text(now - timedelta(seconds=ABSOLUTE_TIMEOUT_S))
    with db.transaction_sync(conn):
        # Sessions nobody came back to would otherwise stay forever; the fixed-width UTC
        # text compares correctly as a string.
        conn.execute("DELETE FROM sessions WHERE created_at < ?", (expired,))
        conn.execute(
            "INSERT INTO sessions (token_hash, user_id, csrf, created_at, seen_at) "
            "VALUES (?,?,?,?,?)",
            (_token_hash(token), user_id, csrf, stamp, stamp),
        )
    return token, csrf


def load_session(
    conn: sqlite3.Connection,
    token: str,
    *,
    now: datetime,
    idle_timeout_s: float,
    absolute_timeout_s: float = ABSOLUTE_TIMEOUT_S,
    touch: bool = True,
) -> Session | None:
    """The live session for ``token``, or None (an expired one is deleted).

    ``touch`` records this use (``seen_at = now``), which restarts the idle timer. A
    background check (the live feed asking "is this session still valid?") passes
    ``touch=False``, so an open page alone never keeps a session alive.
    """
    digest = _token_hash(token)
    # A plain read first: most requests only need to know the session, and a guessed or
    # stale token must not take the write lock.
    row = conn.execute(
        "SELECT s.csrf, s.created_at, s.seen_at, u.id, u.username, u.role, u.disabled "
        "FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.token_hash = ?",
        (digest,),
    ).fetchone()
    if row is None:
        return None
    csrf, created_text, seen_text, user_id, username, role, disabled = row
    created_at = datetime.fromisoformat(created_text)
    seen_at = datetime.fromisoformat(seen_text)
    idle = (now - seen_at).total_seconds()
    age = (now - created_at).total_seconds()
    if disabled or idle > idle_timeout_s or age > absolute_timeout_s:
        delete_session(conn, token)
        return None
    if touch:
        seen_at = now
        with db.transaction_sync(conn):
            conn.execute(
                "UPDATE sessions SET seen_at = ? WHERE token_hash = ?", (utc_text(now), digest)
            )
    return Session(User(int(user_id), username, Role(role)), csrf, created_at, seen_at)


def delete_session(conn: sqlite3.Connection, token: str) -> None:
    """End a session (logout); a token that matches nothing is ignored."""
    with db.transaction_sync(conn):
        conn.execute("DELETE FROM sessions WHERE token_hash = ?", (_token_hash(token),))


class LoginThrottle:
    """Slows down repeated login failures per account and per client address.

    After ``free_failures`` failures within ``window_s`` for either key, each further
    attempt waits ``base_delay_s`` doubled per extra failure, capped at ``max_delay_s``.
    Accounts are never locked: an attacker guessing must not be able to lock the nurses
    out of the clinic (OWASP ASVS V2.2.1 allows throttling instead of lockout). Held in
    memory by the one web process; time is a parameter, so tests need no sleeping.
    """

    def __init__(
        self,
        *,
        window_s: float = 900.0,
        free_failures: int = 5,
        base_delay_s: float = 0.5,
        max_delay_s: float = 5.0,
        max_keys: int = 10_000,
    ) -> None:
        self.window_s = window_s
        self.free_failures = free_failures
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.max_keys = max_keys
        self._failures: dict[str, list[float]] = {}

    def _recent(self, key: str, now: float) -> list[float]:
        kept = [t for t in self._failures.get(key, ()) if now - t < self.window_s]
        if kept:
            self._failures[key] = kept
        else:
            self._failures.pop(key, None)
        return kept

    def delay_s(self, keys: Sequence[str], now: datetime) -> float:
        """Seconds to wait before checking this attempt's password."""
        stamp = now.timestamp()
        count = max((len(self._recent(key, stamp)) for key in keys), default=0)
        if count < self.free_failures:
            return 0.0
        extra = count - self.free_failures
        return min(self.base_delay_s * 2.0 ** min(extra, 16), self.max_delay_s)

    def failed(self, keys: Sequence[str], now: datetime) -> None:
        """Count a failed attempt against every key."""
        if len(self._failures) >= self.max_keys:
            # A flood of distinct keys: forget the oldest half rather than grow without bound.
            for key in list(self._failures)[: self.max_keys // 2]:
                del self._failures[key]
        stamp = now.timestamp()
        for key in keys:
            self._recent(key, stamp)
            self._failures.setdefault(key, []).append(stamp)

    def succeeded(self, key: str) -> None:
        """Forget the failures of ``key`` (the account that just logged in)."""
        self._failures.pop(key, None)
