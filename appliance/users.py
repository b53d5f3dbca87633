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

from appliance import audit, db, mfa
from appliance.audit import AuditAction, AuditEvent
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


class UnknownUserError(UserError):
    """No account has this id."""


class LastAdminError(UserError):
    """The change would leave no enabled administrator, or an admin would lock themselves out."""


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
    must_change_password: bool = False
    mfa_enabled: bool = False


@functools.cache
def _dummy_hash() -> str:
    """A hash with the current parameters, verified against when the account is unknown."""
    return HASHER.hash(secrets.token_urlsafe(16))


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def check_password_policy(password: str) -> None:
    """Raise :class:`WeakPasswordError` unless ``password`` meets the policy (ASVS V2.1).

    Length is the rule (12 to 1024 characters, any characters); no composition rules,
    which ASVS 2.1.9 forbids.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise WeakPasswordError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise WeakPasswordError(f"the password must have at most {MAX_PASSWORD_LENGTH} characters")


def create_user(
    conn: sqlite3.Connection,
    username: str,
    password: str,
    role: Role | str,
    *,
    now: datetime,
    must_change_password: bool = False,
    actor: str | None = None,
) -> int:
    """Create a staff account and return its id; raises a :class:`UserError` subclass.

    With ``actor`` (an administrator in the web UI) the creation is audited in the same
    transaction.
    """
    if not USERNAME_PATTERN.fullmatch(username):
        raise InvalidUsernameError(
            f"username {username!r} must be 2-32 characters of a-z, 0-9, '.', '_' or '-'"
        )
    check_password_policy(password)
    try:
        checked_role = Role(role)
    except ValueError:
        raise UserError(f"unknown role {role!r}; expected one of {', '.join(Role)}") from None
    password_hash = HASHER.hash(password)
    with db.transaction_sync(conn):
        try:
            cursor = conn.execute(
                "INSERT INTO users (username, role, password_hash, created_at, "
                "must_change_password) VALUES (?,?,?,?,?)",
                (username, checked_role.value, password_hash, utc_text(now), must_change_password),
            )
        except sqlite3.IntegrityError:
            raise DuplicateUserError(f"a user named {username!r} already exists") from None
        if actor is not None:
            _audit_admin(conn, actor, username, f"created with role {checked_role.value}", now)
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
        "SELECT s.csrf, s.created_at, s.seen_at, u.id, u.username, u.role, u.disabled, "
        "u.must_change_password, EXISTS (SELECT 1 FROM mfa_totp m WHERE m.user_id = u.id "
        "AND m.confirmed_at IS NOT NULL) "
        "FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.token_hash = ?",
        (digest,),
    ).fetchone()
    if row is None:
        return None
    csrf, created_text, seen_text, user_id, username, role, disabled, must_change, mfa = row
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
    return Session(
        User(int(user_id), username, Role(role)),
        csrf,
        created_at,
        seen_at,
        must_change_password=bool(must_change),
        mfa_enabled=bool(mfa),
    )


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


# -- administration (web UI, admin only) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserSummary:
    """One row of the user-administration table (never the hash, never the MFA secret)."""

    id: int
    username: str
    role: Role
    disabled: bool
    mfa_enabled: bool
    must_change_password: bool
    created_at: datetime


def _audit_admin(
    conn: sqlite3.Connection, actor: str, username: str, detail: str, now: datetime
) -> None:
    """An account change, audited inside the caller's transaction (``config`` action)."""
    audit.append(
        conn,
        [AuditEvent(actor, AuditAction.CONFIG, entity=f"User/{username}", detail=detail)],
        now=now,
    )


def list_users(conn: sqlite3.Connection) -> list[UserSummary]:
    """Every staff account, by username."""
    rows = conn.execute(
        "SELECT u.id, u.username, u.role, u.disabled, u.must_change_password, u.created_at, "
        "EXISTS (SELECT 1 FROM mfa_totp m WHERE m.user_id = u.id AND m.confirmed_at IS NOT NULL) "
        "FROM users u ORDER BY u.username"
    ).fetchall()
    return [
        UserSummary(
            int(uid),
            name,
            Role(role),
            bool(disabled),
            bool(mfa),
            bool(must_change),
            datetime.fromisoformat(created),
        )
        for uid, name, role, disabled, must_change, created, mfa in rows
    ]


def user_by_id(conn: sqlite3.Connection, user_id: int) -> User:
    """The account with ``user_id``; raises :class:`UnknownUserError`."""
    row = conn.execute("SELECT username, role FROM users WHERE id = ?", (user_id,)).fetchone()
    if row is None:
        raise UnknownUserError(f"no user with id {user_id}")
    return User(user_id, row[0], Role(row[1]))


def end_sessions(conn: sqlite3.Connection, user_id: int) -> int:
    """Delete every session and pending MFA step of ``user_id`` (inside the caller's
    transaction); returns how many sessions ended."""
    conn.execute("DELETE FROM mfa_challenges WHERE user_id = ?", (user_id,))
    return conn.execute("DELETE FROM sessions WHERE user_id = ?", (user_id,)).rowcount


def reset_password(
    conn: sqlite3.Connection, user_id: int, password: str, *, actor: str, now: datetime
) -> None:
    """An administrator sets a new password: the person must change it at next login,
    and every session of theirs ends."""
    check_password_policy(password)
    password_hash = HASHER.hash(password)
    with db.transaction_sync(conn):
        target = user_by_id(conn, user_id)
        conn.execute(
            "UPDATE users SET password_hash = ?, must_change_password = 1 WHERE id = ?",
            (password_hash, user_id),
        )
        end_sessions(conn, user_id)
        _audit_admin(conn, actor, target.username, "password reset", now)


def change_own_password(
    conn: sqlite3.Connection,
    user_id: int,
    current: str,
    new: str,
    *,
    keep_token: str | None,
    now: datetime,
) -> bool:
    """The person changes their own password; False when ``current`` is wrong.

    Other sessions of the account end (a stolen session does not survive a change);
    the one holding ``keep_token`` stays.
    """
    check_password_policy(new)
    row = conn.execute(
        "SELECT username, password_hash FROM users WHERE id = ?", (user_id,)
    ).fetchone()
    if row is None:
        return False
    try:
        HASHER.verify(row[1], current)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    if current == new:
        raise WeakPasswordError("the new password must differ from the current one")
    password_hash = HASHER.hash(new)
    keep = b"" if keep_token is None else _token_hash(keep_token)
    with db.transaction_sync(conn):
        conn.execute(
            "UPDATE users SET password_hash = ?, must_change_password = 0 WHERE id = ?",
            (password_hash, user_id),
        )
        conn.execute("DELETE FROM sessions WHERE user_id = ? AND token_hash != ?", (user_id, keep))
        audit.append(
            conn,
            [
                AuditEvent(
                    f"user:{row[0]}",
                    AuditAction.CONFIG,
                    entity=f"User/{row[0]}",
                    detail="password changed",
                )
            ],
            now=now,
        )
    return True


def _enabled_admins(conn: sqlite3.Connection) -> int:
    return int(
        conn.execute("SELECT count(*) FROM users WHERE role = 'admin' AND disabled = 0").fetchone()[
            0
        ]
    )


def set_disabled(
    conn: sqlite3.Connection,
    user_id: int,
    disabled: bool,
    *,
    acting_user_id: int,
    actor: str,
    now: datetime,
) -> None:
    """Disable or enable an account (disabling ends its sessions at once).

    Refuses (:class:`LastAdminError`) to let an administrator disable themselves or the
    last enabled administrator: the box would be left with nobody to manage it.
    """
    with db.transaction_sync(conn):
        target = user_by_id(conn, user_id)
        if disabled:
            if user_id == acting_user_id:
                raise LastAdminError("you cannot disable your own account")
            if target.role is Role.ADMIN and _enabled_admins(conn) <= 1:
                raise LastAdminError("the last enabled administrator cannot be disabled")
        conn.execute("UPDATE users SET disabled = ? WHERE id = ?", (int(disabled), user_id))
        if disabled:
            end_sessions(conn, user_id)
        _audit_admin(conn, actor, target.username, "disabled" if disabled else "enabled", now)


def reset_second_factor(
    conn: sqlite3.Connection, user_id: int, *, acting_user_id: int, actor: str, now: datetime
) -> None:
    """An administrator removes someone's second factor (lost phone): the person enrols
    again at next login if their role requires it; their sessions end."""
    with db.transaction_sync(conn):
        target = user_by_id(conn, user_id)
        if user_id == acting_user_id:
            raise LastAdminError("ask another administrator to reset your own second factor")
        mfa.remove(conn, user_id)
        end_sessions(conn, user_id)
        _audit_admin(conn, actor, target.username, "second factor reset", now)
