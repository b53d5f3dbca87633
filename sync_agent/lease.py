"""One sender at a time per store: the sync process's rounds and ``appliance sync once``.

Two processes sending from the same store would read the same due items and POST them to
the EHR at the same moment. Every write is a conditional create or a version-checked update,
so one of them should find the other's copy; but a conditional create is not atomic under
concurrent requests on HAPI (#3141), Microsoft's FHIR server (#1382) or Medplum (#4234), and
two at once can make two copies. So a round — the outbox drain, the edits, the pull and the
audit export — runs only while this process holds the store's *sync lease*: an ``flock``
on a file beside the database (``<database>.sync-lock``). The sync process takes it for each
round and skips a round while ``appliance sync once`` holds it; ``sync once`` waits for the
sync process's round to end. The kernel drops the lock when its holder dies (kill -9, a
crash, the power), so a dead holder never keeps the others out.

The file's content says how its last holder left (page cache only, no fsync: it costs
nothing on an SD card; a power cut loses it, and a box takes longer to boot again than the
wait it stands for):

* empty: the round ended; every bundle it sent was answered and recorded (or, its answer
  lost, its items marked to wait, ``outbox.unsure_until``);
* ``round <pid> <since>``: the holder died in a round. A request it sent may be with the
  server still, and a resend that overtook it could make a second copy (above): the next
  holder does not send what could have been in it before the EHR had the time to apply it
  (the upstream's request timeout, from when the lease is taken: :attr:`Turn.unsure_until`);
* ``hold <until>``: that wait, not over when the round that found it ended: the next holder
  keeps it.

Nothing here touches the database: what the wait means for the outbox, the edits and the
export is the caller's (``SyncLoop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from appliance.errors import StoreError

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".sync-lock"
WAIT_POLL_S = 0.2
"""How often a holder-to-be waiting for the lease tries again (``flock`` has no timeout)."""

_ROUND = b"round"
_HOLD = b"hold"


def lock_path(database: Path) -> Path:
    """The lease's file for the store at ``database``."""
    return database.with_name(database.name + LOCK_SUFFIX)


@dataclass(slots=True)
class Turn:
    """The lease, held for one round."""

    unsure_until: datetime | None
    """Not before this may the round send what an earlier holder could have had in flight
    (it died in its round): None when the last holder left cleanly."""
    crashed: bool
    """The last holder died in its round (found now, not a hold left by an earlier round)."""
    wait_s: float
    """Seconds from taking the lease to :attr:`unsure_until` (0 when there is no wait)."""


def _parse(content: bytes) -> tuple[bool, datetime | None]:
    """(the holder died in its round, the hold it left) from the file's content."""
    words = content.split()
    if not words:
        return False, None
    if words[0] == _HOLD and len(words) >= 2:
        with contextlib.suppress(ValueError):
            until = datetime.fromisoformat(words[1].decode())
            if until.tzinfo is not None:
                return False, until
    # "round …", or anything else (a torn write): taken as a round that did not end.
    return True, None


class SyncLease:
    """The sync lease of one store (module docstring). No file (a store without a path, as
    in some tests): every round gets it at once, no wait is ever found."""

    def __init__(
        self,
        database: Path | None,
        *,
        unsure_s: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._path = None if database is None else lock_path(database)
        self._unsure_s = unsure_s
        self._clock = clock

    @property
    def path(self) -> Path | None:
        """The lock file (None: no file, see the class)."""
        return self._path

    def _open(self) -> int:
        assert self._path is not None
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(
                f"cannot open the sync lock file {self._path}: {exc.strerror or exc}; "
                "it must be writable by the user the sync process runs as"
            ) from exc
        if os.geteuid() == 0:
            # Made by root (``appliance sync once`` run as root before the sync process ever
            # ran): give it to the database's owner, or the sync process could not open it.
            with contextlib.suppress(OSError):
                owner = os.stat(self._path.with_name(self._path.name.removesuffix(LOCK_SUFFIX)))
                os.fchown(fd, owner.st_uid, owner.st_gid)
        return fd

    def _try_lock(self) -> int | None:
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {self._path}: {exc.strerror or exc}") from exc
        return fd

    def _take(self, fd: int) -> Turn:
        """Read how the last holder left, and say that a round is under way."""
        now = self._clock()
        crashed, until = _parse(os.pread(fd, 200, 0))
        if crashed:
            until = now + timedelta(seconds=self._unsure_s)
            logger.warning(
                "the last sync round did not end (its process was killed or crashed, or the "
                "store failed under it); nothing is sent before %s, in case a request it had "
                "sent is with the upstream still",
                until.isoformat(timespec="seconds"),
            )
        if until is not None and until - now > timedelta(seconds=self._unsure_s):
            until = now + timedelta(seconds=self._unsure_s)  # a clock set back
        self._write(fd, b"%s %d %s\n" % (_ROUND, os.getpid(), now.isoformat().encode()))
        wait_s = 0.0 if until is None else max(0.0, (until - now).total_seconds())
        return Turn(unsure_until=until, crashed=crashed, wait_s=wait_s)

    def _write(self, fd: int, content: bytes) -> None:
        # Truncate first: a shorter content must not leave a longer one's tail behind.
        try:
            os.ftruncate(fd, 0)
            if content:
                os.pwrite(fd, content, 0)
        except OSError as exc:  # a full disk: the next holder then finds "round" or nothing
            logger.warning("cannot write the sync lock file %s: %s", self._path, exc.strerror)

    def _leave(self, fd: int, turn: Turn) -> None:
        """The round ended: say so, and pass on a wait not over yet."""
        until = turn.unsure_until
        if until is not None and self._clock() < until:
            self._write(fd, b"%s %s\n" % (_HOLD, until.isoformat().encode()))
        else:
            self._write(fd, b"")

    @contextlib.asynccontextmanager
    async def round(
        self, *, wait: bool = False, on_wait: Callable[[], None] | None = None
    ) -> AsyncIterator[Turn | None]:
        """Hold the lease for one round: the :class:`Turn`, or None when another process holds
        it and not ``wait``. ``wait``: try again every :data:`WAIT_POLL_S` until it is free
        (``on_wait`` is called once, when it was not free at first).

        A round that ends by an exception (the process being cancelled, the store failing
        under it) leaves the file saying "round": a request it sent may be unanswered."""
        if self._path is None:
            yield Turn(unsure_until=None, crashed=False, wait_s=0.0)
            return
        fd = self._try_lock()
        if fd is None:
            if not wait:
                yield None
                return
            if on_wait is not None:
                on_wait()
            while fd is None:
                await asyncio.sleep(WAIT_POLL_S)
                fd = self._try_lock()
        try:
            turn = self._take(fd)
            yield turn
            self._leave(fd, turn)
        finally:
            os.close(fd)  # releases the lock
