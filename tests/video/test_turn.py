"""Short-lived TURN credentials (services/video/turn.py), checked against the scheme's own
arithmetic: the credential a TURN server would compute from the username and its secret."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.video.turn import TurnCredential, expiry_of, rest_credential

SECRET = b"shared-with-coturn-test-only"


def test_the_credential_is_what_the_turn_server_computes() -> None:
    made = rest_credential(SECRET, "a1b2c3d4e5f6", ttl_s=3600, now=lambda: 1_800_000_000.7)
    assert made.username == "1800003600:a1b2c3d4e5f6"
    # coturn (use-auth-secret): base64(HMAC-SHA1(static-auth-secret, username)).
    expected = base64.b64encode(
        hmac.new(SECRET, b"1800003600:a1b2c3d4e5f6", hashlib.sha1).digest()
    ).decode()
    assert made.credential == expected
    assert expiry_of(made.username) == 1_800_003_600


def test_each_participant_and_each_moment_gets_its_own() -> None:
    first = rest_credential(SECRET, "aaaa", ttl_s=600, now=lambda: 1000.0)
    other = rest_credential(SECRET, "bbbb", ttl_s=600, now=lambda: 1000.0)
    later = rest_credential(SECRET, "aaaa", ttl_s=600, now=lambda: 1001.0)
    assert len({first.credential, other.credential, later.credential}) == 3
    assert rest_credential(b"another-secret", "aaaa", ttl_s=600, now=lambda: 1000.0) != first


def test_the_credential_never_shows_in_a_repr() -> None:
    made = rest_credential(SECRET, "box", ttl_s=600)
    assert made.credential not in repr(made)
    assert "box" in repr(made)
    assert repr(TurnCredential("u", "secret-value")).count("secret-value") == 0


@pytest.mark.parametrize("who", ["", "a:b", "Jane Doe", "x" * 65])
def test_a_username_that_would_not_parse_is_refused(who: str) -> None:
    with pytest.raises(ValueError, match="1-64 letters"):
        rest_credential(SECRET, who, ttl_s=600)


def test_an_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        rest_credential(b"", "box", ttl_s=600)


@given(
    who=st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
    ttl_s=st.integers(600, 86_400),
    now=st.floats(0, 4e9),
)
def test_a_made_username_carries_its_expiry(who: str, ttl_s: int, now: float) -> None:
    made = rest_credential(SECRET, who, ttl_s=ttl_s, now=lambda: now)
    assert expiry_of(made.username) == int(now) + ttl_s


@given(st.text(max_size=40))
def test_any_other_text_is_a_clear_value_error(text: str) -> None:
    head, sep, _ = text.partition(":")
    if sep and head.isascii() and head.isdigit():
        assert expiry_of(text) == int(head)
        return
    with pytest.raises(ValueError, match="not a TURN REST username"):
        expiry_of(text)
