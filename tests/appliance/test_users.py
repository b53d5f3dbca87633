"""Staff accounts and sessions on a real SQLite file: hashing, login checks, expiry."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError

from appliance import db, users
from appliance.users import (
    DuplicateUserError,
    InvalidUsernameError,
    Role,
    UserError,
    WeakPasswordError,
)

NOW = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
PASSWORD = "correct horse battery"


@pytest.fixture
def conn(db_path: Path) -> Iterator[sqlite3.Connection]:
    connection = db.connect_sync(db_path)
    try:
        yield connection
    finally:
        connection.close()


def _stored_hash(conn: sqlite3.Connection, username: str) -> str:
    row = conn.execute("SELECT password_hash FROM users WHERE username = ?", (username,))
    return str(row.fetchone()[0])


def test_password_is_hashed_with_argon2id_at_owasp_parameters(conn: sqlite3.Connection) -> None:
    users.create_user(conn, "nurse1", PASSWORD, Role.NURSE, now=NOW)
    stored = _stored_hash(conn, "nurse1")
    assert stored.startswith("$argon2id$v=19$")
    params = dict(p.split("=") for p in stored.split("$")[3].split(","))
    assert int(params["m"]) >= 19456
    assert int(params["t"]) >= 2
    assert params["p"] == "1"
    assert PASSWORD not in stored


def test_right_password_returns_the_user(conn: sqlite3.Connection) -> None:
    user_id = users.create_user(conn, "nurse1", PASSWORD, "nurse", now=NOW)
    user = users.authenticate(conn, "nurse1", PASSWORD)
    assert user == users.User(user_id, "nurse1", Role.NURSE)
    assert user.actor == "user:nurse1"


def test_wrong_password_unknown_user_and_disabled_account_are_refused(
    conn: sqlite3.Connection,
) -> None:
    users.create_user(conn, "nurse1", PASSWORD, Role.NURSE, now=NOW)
    users.create_user(conn, "gone", PASSWORD, Role.NURSE, now=NOW)
    conn.execute("UPDATE users SET disabled = 1 WHERE username = 'gone'")
    assert users.authenticate(conn, "nurse1", PASSWORD + "!") is None
    assert users.authenticate(conn, "nobody", PASSWORD) is None
    assert users.authenticate(conn, "gone", PASSWORD) is None
    assert users.authenticate(conn, "Not A Username", PASSWORD) is None
    assert users.authenticate(conn, "nurse1", "x" * 100_000) is None


def test_unknown_user_still_costs_a_verification(
    conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    verified: list[str] = []

    class CountingHasher(PasswordHasher):
        def verify(self, hash: str | bytes, password: str | bytes) -> bool:
            verified.append(str(hash))
            return super().verify(hash, password)

    hasher = users.HASHER
    monkeypatch.setattr(
        users,
        "HASHER",
        CountingHasher(hasher.time_cost, hasher.memory_cost, hasher.parallelism, type=Type.ID),
    )
    assert users.authenticate(conn, "nobody", PASSWORD) is None
    assert users.authenticate(conn, "Not A Username", PASSWORD) is None
    assert len(verified) == 2


def test_hash_made_with_weaker_parameters_is_upgraded_on_login(conn: sqlite3.Connection) -> None:
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1, type=Type.ID)
    conn.execute(
        "INSERT INTO users (username, role, password_hash, created_at) VALUES (?,?,?,?)",
        ("old", "nurse", weak.hash(PASSWORD), "2026-01-01T00:00:00.000000Z"),
    )
    assert users.authenticate(conn, "old", PASSWORD) is not None
    upgraded = _stored_hash(conn, "old")
    assert "m=19456,t=2,p=1" in upgraded
    assert users.authenticate(conn, "old", PASSWORD) is not None


def test_corrupt_stored_hash_refuses_instead_of_crashing(conn: sqlite3.Connection) -> None:
    conn.execute(
        "INSERT INTO users (username, role, password_hash, created_at) VALUES (?,?,?,?)",
        ("broken", "nurse", "not-a-hash", "2026-01-01T00:00:00.000000Z"),
    )
    with pytest.raises(InvalidHashError):
        users.HASHER.verify("not-a-hash", PASSWORD)
    assert users.authenticate(conn, "broken", PASSWORD) is None


@pytest.mark.parametrize(
    ("username", "password", "role", "error"),
    [
        ("A", PASSWORD, "nurse", InvalidUsernameError),
        ("Nurse1", PASSWORD, "nurse", InvalidUsernameError),
        ("nurse one", PASSWORD, "nurse", InvalidUsernameError),
        ("x" * 33, PASSWORD, "nurse", InvalidUsernameError),
        ("nurse1", "short pass", "nurse", WeakPasswordError),
        ("nurse1", PASSWORD, "janitor", UserError),
    ],
)
def test_bad_accounts_are_refused_with_a_clear_error(
    conn: sqlite3.Connection, username: str, password: str, role: str, error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        users.create_user(conn, username, password, role, now=NOW)
    assert PASSWORD not in str(info.value)
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0


def test_duplicate_username_is_refused(conn: sqlite3.Connection) -> None:
    users.create_user(conn, "nurse1", PASSWORD, Role.NURSE, now=NOW)
    with pytest.raises(DuplicateUserError):
        users.create_user(conn, "nurse1", PASSWORD, Role.ADMIN, now=NOW)


def test_session_token_is_stored_only_as_its_sha256(conn: sqlite3.Connection) -> None:
    user_id = users.create_user(conn, "nurse1", PASSWORD, Role.NURSE, now=NOW)
    token, csrf = users.create_session(conn, user_id, now=NOW)
    assert len(token) >= 43
    assert len(csrf) >= 43
    assert token != csrf
    [(stored,)] = conn.execute("SELECT token_hash FROM sessions").fetchall()
    assert stored == hashlib.sha256(token.encode()).digest()
    dump = "\n".join(conn.iterdump())
    assert token not in dump


def test_session_loads_and_touching_restarts_the_idle_timer(conn: sqlite3.Connection) -> None:
    user_id = users.create_user(conn, "nurse1", PASSWORD, Role.NURSE, now=NOW)
    token, csrf = users.create_session(conn, user_id, now=NOW)
    later = NOW + timedelta(seconds=800)
    session = users.load_session(conn, token, now=later, idle_timeout_s=900)
    assert session is not None
    assert (session.user.username, session.csrf, session.seen_at) == ("nurse1", csrf, later)
    # 1600 s after login but 800 s after the last use: still alive.
    assert users.load_session(conn, token, now=later + timedelta(seconds=800), idle_timeout_s=900)


def test_idle_session_expires_and_is_deleted(conn: sqlite3.Connection) -> None:
    user_id = users.create_user(conn, "nurse1", PASSWORD, Role.NURSE, now=NOW)
    token, _ = users.create_session(conn, user_id, now=NOW)
    expired = NOW + timedelta(seconds=901)
    assert users.load_session(conn, token, now=expired, idle_timeout_s=900) is None
    assert conn.execute("SELECT count(*) FROM sessions").fetchone()[0] == 0


def test_untouched_check_does_not_keep_a_session_alive(conn: sqlite3.Connection) -> None:
    user_id = users.create_user(conn, "nurse1", PASSWORD, Role.NURSE, now=NOW)
    token, _ = users.create_session(conn, user_id, now=NOW)
    check = NOW + timedelta(seconds=600)
    assert users.load_session(conn, token, now=check, idle_timeout_s=900, touch=False)
    assert (
        users.load_session(conn, token, now=NOW + timedelta(seconds=901), idle_timeout_s=900)
        is None
    )


def test_busy_session_still_ends_at_the_absolute_timeout(conn: sqlite3.Connection) -> None:
    user_id = users.create_user(conn, "nurse1", PASSWORD, Role.NURSE, now=NOW)
    token, _ = users.create_session(conn, user_id, now=NOW)
    moment = NOW
    for _ in range(4):
        moment += timedelta(seconds=600)
        assert users.load_session(
            conn, token, now=moment, idle_timeout_s=900, absolute_timeout_s=2400
        )
    moment += timedelta(seconds=600)
    assert (
        users.load_session(conn, token, now=moment, idle_timeout_s=900, absolute_timeout_s=2400)
        is None
    )


def test_deleted_and_disabled_sessions_do_not_load(conn: sqlite3.Connection) -> None:
    user_id = users.create_user(conn, "nurse1", PASSWORD, Role.NURSE, now=NOW)
    token, _ = users.create_session(conn, user_id, now=NOW)
    users.delete_session(conn, token)
    assert users.load_session(conn, token, now=NOW, idle_timeout_s=900) is None
    token, _ = users.create_session(conn, user_id, now=NOW)
    conn.execute("UPDATE users SET disabled = 1 WHERE id = ?", (user_id,))
    assert users.load_session(conn, token, now=NOW, idle_timeout_s=900) is None
    assert users.load_session(conn, "made-up-token", now=NOW, idle_timeout_s=900) is None
