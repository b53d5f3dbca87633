"""Short-lived TURN credentials for each participant (the "TURN REST API" scheme).

A TURN server configured with a username and a credential file hands that one account to
every browser in every visit, where it can be read out of the page and used by anyone for
as long as the account lives. With ``secret_file`` instead, the box shares a secret with the
TURN server (coturn: ``use-auth-secret`` and ``static-auth-secret``) and gives each
participant, and each of its own peer connections, a credential of its own that expires:

* username: ``<expiry, Unix seconds>:<who>``, where *who* is the participant's random id
  (or ``box``), never a name: TURN servers log usernames;
* credential: base64 of HMAC-SHA-1 over the username, keyed with the shared secret.

SHA-1 is what the scheme and coturn define (draft-uberti-behave-turn-rest-00 §2.2); the
HMAC keeps its strength there. The TURN server checks the expiry on each allocation and
refresh, so the lifetime (``credential_ttl_s``) must outlast a visit; a resumed or
reconnected participant is given a fresh one.
"""

from __future__ import annotations

import base64
import hmac
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

_WHO = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class TurnCredential:
    username: str
    credential: str = ""

    def __repr__(self) -> str:  # the credential is a secret: never in a log line
        return f"TurnCredential(username={self.username!r}, credential=<hidden>)"


def rest_credential(
    secret: bytes, who: str, *, ttl_s: int, now: Callable[[], float] = time.time
) -> TurnCredential:
    """A credential for ``who`` valid for ``ttl_s`` seconds from ``now()``."""
    if not secret:
        raise ValueError("the TURN shared secret is empty")
    if not _WHO.fullmatch(who):
        raise ValueError("who must be an id of 1-64 letters, digits, '-' or '_'")
    username = f"{int(now()) + ttl_s}:{who}"
    digest = hmac.new(secret, username.encode(), "sha1").digest()
    return TurnCredential(username, base64.b64encode(digest).decode("ascii"))


def expiry_of(username: str) -> int:
    """The Unix time a REST username expires at (as a TURN server reads it)."""
    head, sep, _ = username.partition(":")
    if not sep or not (head.isascii() and head.isdigit()):
        raise ValueError("not a TURN REST username")
    return int(head)
