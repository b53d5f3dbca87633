"""One sender at a time per store: the sync process's rounds and ``appliance sync once``.

Two processes sending from the same store would read the same due items and POST them to
the EHR at the same moment. Every write is a conditional create or a version-checked update,
so one of them should find the other's copy; but a conditional create is not atomic under
concurrent requests on HAPI (#3141), Microsoft's FHIR server (#1382) or Medplum (#4234), and
two at once can make two copies. So a round — the outbox drain, the edits, the pull and the
audit export — runs only while this process holds the store's *sync lease*: an ``flock``
on a file beside the database (``<database>.sync-lock``). The kernel drops the lock when its
holder dies (kill -9, a crash, the power), so a dead holder never keeps the others out.

The sync process tries the lease at each round and skips the round while another process
holds it. ``appliance sync once`` waits for it, and says so while it waits by holding a
second lock, ``<database>.sync-want``: the sync process does not take the lease again while
that one is held, so a long catch-up (round after round at once, each freeing the lease for
a moment only) lets ``sync once`` in after the round under way, not after the last one.

The lock file holds one fixed-size record (:data:`RECORD_SIZE` bytes) saying how its last
holder left. It is written in place (``pwrite`` over the same bytes, never truncated): a
full disk cannot refuse that once the file exists, and no moment leaves it empty. Page cache
only, no fsync: it costs nothing on an SD card; a power cut may lose it, and a box takes
longer to boot again than the wait it stands for.

* blank: the round ended, with nothing sent left unanswered;
* ``round <pid> <since>``: the holder died in its round, or a step that sends ended by an
  exception (the store failing under it, a cancellation). A request it sent may be with the
  server still, and a resend that overtook it could make a second copy (above): the next
  holder does not send before the EHR has had the time to apply it (the upstream's request
  timeout, from when the lease is taken: :attr:`Turn.unsure_until`);
* ``hold <until>``: that wait, not over when the round that found it ended (the process
  was stopped meanwhile): the next holder keeps it.

The lease cannot be had while the record cannot be written (a new file on a full disk): a
round that sent with no record behind it would leave no wait after a crash.

Nothing here touches the database: what the wait means for the steps is the caller's
(``SyncLoop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from appliance.errors import StoreError

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".sync-lock"
WANT_SUFFIX = ".sync-want"
RECORD_SIZE = 96
"""Bytes of the lock file's record (``hold <ISO time with microseconds and offset>`` fits)."""
WAIT_POLL_S = 0.2
"""How often a holder-to-be waiting for the lease tries again (``flock`` has no timeout)."""

_ROUND = b"round"
_HOLD = b"hold"


def lock_path(database: Path) -> Path:
    """The lease's file for the store at ``database``."""
    return database.with_name(database.name + LOCK_SUFFIX)


def want_path(database: Path) -> Path:
    """The file a process waiting for the lease holds locked while it waits."""
    return database.with_name(database.name + WANT_SUFFIX)


def _record(content: bytes) -> bytes:
    assert len(content) < RECORD_SIZE
    return content.ljust(RECORD_SIZE - 1) + b"\n"


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
    sending: bool = False
    """A step that sends is under way (:meth:`send`)."""

    @contextlib.contextmanager
    def send(self) -> Iterator[None]:
        """Around a step that sends to the EHR: ended by an exception, it may have left a
        request unanswered, and the lease is left saying so (the next holder waits)."""
        self.sending = True
        yield
        self.sending = False  # not reached on an exception: the round ends "unsettled"


def _parse(content: bytes) -> tuple[bool, datetime | None]:
    """(the holder died in its round, the hold it left) from the file's record."""
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
        self._database = database
        self._path = None if database is None else lock_path(database)
        self._want = None if database is None else want_path(database)
        self._unsure_s = unsure_s
        self._clock = clock

    @property
    def path(self) -> Path | None:
        """The lock file (None: no file, see the class)."""
        return self._path

    def _open(self, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(
                f"cannot open the sync lock file {path}: {exc.strerror or exc}; "
                "it must be writable by the user the sync process runs as"
            ) from exc
        if os.geteuid() == 0 and self._database is not None:
            # Made by root (``appliance sync once`` run as root before the sync process ever
            # ran): give it to the database's owner, or the sync process could not open it.
            with contextlib.suppress(OSError):
                owner = os.stat(self._database)
                os.fchown(fd, owner.st_uid, owner.st_gid)
        return fd

    def _flock(self, path: Path) -> int | None:
        """An fd of ``path`` holding its lock, or None when another holds it."""
        fd = self._open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {path}: {exc.strerror or exc}") from exc
        return fd

    def _try_lock(self) -> int | None:
        assert self._path is not None
        return self._flock(self._path)

    def _wanted(self) -> bool:
        """Whether a process is waiting for the lease (it holds the want lock)."""
        assert self._want is not None
        fd = self._flock(self._want)
        if fd is None:
            return True
        os.close(fd)
        return False

    def _take(self, fd: int) -> Turn:
        """Read how the last holder left, and say that a round is under way. Raises (the
        caller frees the lock) when that cannot be written."""
        now = self._clock()
        crashed, until = _parse(os.pread(fd, RECORD_SIZE, 0))
        if crashed:
            until = now + timedelta(seconds=self._unsure_s)
            logger.warning(
                "the last sync round did not end (its process was killed or crashed, or a "
                "step failed while sending); nothing is sent before %s, in case a request it "
                "had sent is with the upstream still",
                until.isoformat(timespec="seconds"),
            )
        if until is not None and until - now > timedelta(seconds=self._unsure_s):
            until = now + timedelta(seconds=self._unsure_s)  # a clock set back
        record = b"%s %d %s" % (_ROUND, os.getpid(), now.isoformat(timespec="seconds").encode())
        try:
            self._write(fd, record)
        except OSError as exc:
            raise StoreError(
                f"{self._path}: cannot write the sync lock file ({exc.strerror or exc}); "
                "nothing is sent until it can be (free space on the data volume)"
            ) from exc
        wait_s = 0.0 if until is None else max(0.0, (until - now).total_seconds())
        return Turn(unsure_until=until, crashed=crashed, wait_s=wait_s)

    @staticmethod
    def _write(fd: int, content: bytes) -> None:
        """The record, in place (the file's first block, allocated by its first write)."""
        if os.pwrite(fd, _record(content), 0) != RECORD_SIZE:
            raise OSError(0, "short write")

    def _leave(self, fd: int, turn: Turn) -> None:
        """The round ended with nothing sent unanswered: say so, and pass on a wait not over
        yet. Not written: the record says "round", and the next holder waits (safe side)."""
        until = turn.unsure_until
        content = b""
        if until is not None and self._clock() < until:
            content = b"%s %s" % (_HOLD, until.isoformat().encode())
        try:
            self._write(fd, content)
        except OSError as exc:
            logger.warning("cannot write the sync lock file %s: %s", self._path, exc.strerror)

    async def _wait_for_lock(self, on_wait: Callable[[], None] | None) -> int:
        """The lease, once free; meanwhile the want lock is held (the module docstring)."""
        assert self._want is not None
        fd = self._try_lock()
        if fd is not None:
            return fd
        if on_wait is not None:
            on_wait()
        want = self._flock(self._want)
        try:
            while True:
                await asyncio.sleep(WAIT_POLL_S)
                if want is None:  # another process waits too: in line behind it
                    want = self._flock(self._want)
                fd = self._try_lock()
                if fd is not None:
                    return fd
        finally:
            if want is not None:
                os.close(want)

    @contextlib.asynccontextmanager
    async def round(
        self, *, wait: bool = False, on_wait: Callable[[], None] | None = None
    ) -> AsyncIterator[Turn | None]:
        """Hold the lease for one round: the :class:`Turn`, or None when another process
        holds it, or waits for it, and not ``wait``. ``wait``: until it is free (``on_wait``
        is told once, when it was not free at first).

        A round that ends by an exception while a step sends (:meth:`Turn.send`) leaves the
        record saying "round": a request it sent may be unanswered."""
        if self._path is None:
            yield Turn(unsure_until=None, crashed=False, wait_s=0.0)
            return
        if wait:
            fd: int | None = await self._wait_for_lock(on_wait)
        else:
            fd = None if self._wanted() else self._try_lock()
            if fd is None:
                yield None
                return
        assert fd is not None
        try:
            turn = self._take(fd)
            try:
                yield turn
            except BaseException:
                if not turn.sending:
                    self._leave(fd, turn)
                raise
            self._leave(fd, turn)
        finally:
            os.close(fd)  # releases the lock
