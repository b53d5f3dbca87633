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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiortc import RTCIceServer

from appliance.errors import ConfigError

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


class IceServerSettings(Protocol):
    """A STUN or TURN server as the site config gives it (``appliance.config``)."""

    @property
    def urls(self) -> tuple[str, ...]: ...
    @property
    def username(self) -> str | None: ...
    @property
    def credential_file(self) -> Path | None: ...
    @property
    def secret_file(self) -> Path | None: ...
    @property
    def credential_ttl_s(self) -> int: ...


@dataclass(frozen=True, slots=True)
class IceServer:
    """One STUN or TURN server, and the credential each party is given for it.

    A static account (``username``, ``credential``) is the same for everyone; with a shared
    ``secret`` each party gets its own short-lived credential (:func:`rest_credential`).
    """

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None
    secret: bytes | None = None
    ttl_s: int = 14_400

    def __repr__(self) -> str:  # credentials and secrets never reach a log line
        how = "shared secret" if self.secret else "static account" if self.username else "none"
        return f"IceServer(urls={self.urls!r}, credentials={how})"

    def login(self, who: str, now: Callable[[], float] = time.time) -> tuple[str, str] | None:
        """(username, credential) for ``who`` (a participant id, or "box"); None for STUN."""
        if self.secret is not None:
            made = rest_credential(self.secret, who, ttl_s=self.ttl_s, now=now)
            return made.username, made.credential
        if self.username is not None and self.credential is not None:
            return self.username, self.credential
        return None

    def for_box(self) -> RTCIceServer:
        """For one of the box's own peer connections (aiortc)."""
        login = self.login("box")
        if login is None:
            return RTCIceServer(urls=list(self.urls))
        return RTCIceServer(urls=list(self.urls), username=login[0], credential=login[1])

    def for_browser(self, participant_id: str) -> dict[str, Any]:
        """As one participant's browser ``RTCPeerConnection`` takes it (``iceServers``)."""
        body: dict[str, Any] = {"urls": list(self.urls)}
        login = self.login(participant_id)
        if login is not None:
            body["username"], body["credential"] = login
        return body


def ice_servers(settings: Iterable[IceServerSettings]) -> list[IceServer]:
    """The configured servers, each credential or shared secret read from its file (at
    start). A file missing, unreadable or empty is a :class:`ConfigError` naming it."""
    servers, problems = [], []
    for server in settings:
        credential = secret = None
        try:
            if server.credential_file is not None:
                credential = server.credential_file.read_text(encoding="utf-8").strip()
                if not credential:
                    problems.append(f"{server.credential_file}: the TURN credential file is empty")
            if server.secret_file is not None:
                secret = server.secret_file.read_bytes().strip()
                if not secret:
                    problems.append(f"{server.secret_file}: the TURN secret file is empty")
        except OSError as exc:
            problems.append(f"{exc.filename}: cannot read ({exc.strerror})")
            continue
        servers.append(
            IceServer(
                urls=tuple(server.urls),
                username=server.username,
                credential=credential,
                secret=secret,
                ttl_s=server.credential_ttl_s,
            )
        )
    if problems:
        raise ConfigError(problems, "video.ice_server")
    return servers
