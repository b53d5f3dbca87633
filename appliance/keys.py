"""Keys and encryption at rest: envelope encryption with a key-encryption key (KEK).

* The **KEK** is 32 random bytes in a file: in production the systemd credential directory
  (``$CREDENTIALS_DIRECTORY/kek``, provisioned by Ansible, TPM-sealed where the box has one);
  in development ``appliance init`` writes a 0600 file. It never touches the database.
* **Data keys** (AES-256-GCM), the **blind-index key** (HMAC-SHA-256) and the box's
  **Ed25519 signing key** (audit checkpoints) are random, wrapped by the KEK with AES-GCM
  and stored in ``data_keys``. Each wrapped key's associated data names its purpose and
  version, so a wrapped key cannot be swapped for another.
* Every PHI ciphertext is ``nonce(12) || ciphertext || tag(16)`` with associated data
  ``table NUL row-identity NUL key-version``: a ciphertext copied into another row, or
  relabelled with another key version, fails authentication (:class:`TamperedDataError`).
* **Blind indexes** are HMAC-SHA-256 digests (truncated to 16 bytes) of normalised values
  under the blind-index key, so the kiosk can find a patient by family name + birth date
  or by identifier without any plaintext in the database.

See docs/adr/0002-envelope-encryption.md for the choices and what was left out.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import stat
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from appliance.errors import KeyFileError, TamperedDataError, WrongKeyError

KEK_BYTES = 32
NONCE_BYTES = 12
BLIND_DIGEST_BYTES = 16
_FINGERPRINT_LABEL = b"appliance kek fingerprint v1"


class KeyPurpose(StrEnum):
    """What a wrapped key in ``data_keys`` is for."""

    DATA = "data"
    BLIND = "blind"
    SIGNING = "signing"


class KeyState(StrEnum):
    """Lifecycle of a data key: new writes use the one active key; old ones only decrypt."""

    ACTIVE = "active"
    DECRYPT_ONLY = "decrypt_only"
    RETIRED = "retired"


# --- the key-encryption key file ------------------------------------------------------------


def generate_kek_file(path: Path) -> None:
    """Create a new random KEK at ``path`` (mode 0600); refuses to overwrite an existing one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(
            f"{path}: a key-encryption key already exists; refusing to overwrite it "
            "(that would make the database unreadable)"
        ) from exc
    try:
        os.write(fd, secrets.token_bytes(KEK_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)


def read_kek_file(path: Path) -> bytes:
    """Read and check the KEK file; every failure is one line naming the file and the fix."""
    try:
        info = path.stat()
    except FileNotFoundError as exc:
        raise KeyFileError(
            f"{path}: key-encryption key file not found; run 'appliance init' for a "
            "development key, or check keys.kek_file / the systemd credential"
        ) from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the key-encryption key ({exc.strerror})") from exc
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path}: the key-encryption key must be a regular file")
    if info.st_mode & 0o077:
        raise KeyFileError(
            f"{path}: the key-encryption key is readable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run 'chmod 600 {path}'"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the key-encryption key ({exc.strerror})") from exc
    if len(data) != KEK_BYTES:
        raise KeyFileError(
            f"{path}: the key-encryption key must be exactly {KEK_BYTES} bytes, found {len(data)}"
        )
    return data


def kek_fingerprint(kek: bytes) -> str:
    """A short public fingerprint of a KEK, stored in the database to name a mismatch."""
    return hmac.new(kek, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:16]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- wrapping ------------------------------------------------------------------------------


def _wrap_aad(purpose: KeyPurpose, version: int) -> bytes:
    return f"appliance-key\x00{purpose}\x00{version}".encode()


def wrap_key(kek: bytes, purpose: KeyPurpose, version: int, key: bytes) -> bytes:
    """Wrap ``key`` under the KEK, bound to its purpose and version."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(kek).encrypt(nonce, key, _wrap_aad(purpose, version))


def unwrap_key(kek: bytes, purpose: KeyPurpose, version: int, wrapped: bytes) -> bytes:
    """Unwrap a key; raises :class:`InvalidTag` when the KEK (or the binding) is wrong."""
    return AESGCM(kek).decrypt(
        wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _wrap_aad(purpose, version)
    )


# --- the keyring ---------------------------------------------------------------------------


def _aad(table: str, row: str, version: int) -> bytes:
    return f"{table}\x00{row}\x00{version}".encode()


def normalise_name(value: str) -> str:
    """Case-, accent- and punctuation-insensitive form of a name for blind indexing."""
    decomposed = unicodedata.normalize("NFKD", value)
    return "".join(ch for ch in decomposed.casefold() if ch.isalnum())


@dataclass(frozen=True, slots=True)
class Keyring:
    """The unwrapped keys of one database, held in memory by a process that needs them."""

    data_keys: dict[int, AESGCM]
    active_version: int
    blind_key: bytes
    signing_key: Ed25519PrivateKey
    kek_fingerprint: str

    def encrypt(self, table: str, row: str, plaintext: bytes) -> tuple[int, bytes]:
        """Encrypt under the active data key; returns ``(key_version, blob)``."""
        version = self.active_version
        nonce = secrets.token_bytes(NONCE_BYTES)
        blob = nonce + self.data_keys[version].encrypt(nonce, plaintext, _aad(table, row, version))
        return version, blob

    def encrypt_with(self, version: int, table: str, row: str, plaintext: bytes) -> bytes:
        """Encrypt under a given key version (re-encryption during rotation)."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self.data_keys[version].encrypt(nonce, plaintext, _aad(table, row, version))

    def decrypt(self, table: str, row: str, version: int, blob: bytes) -> bytes:
        """Decrypt and authenticate; a moved, altered or relabelled ciphertext is refused."""
        key = self.data_keys.get(version)
        if key is None:
            raise TamperedDataError(f"{table} row {row}: no data key version {version} on this box")
        try:
            return key.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(table, row, version))
        except InvalidTag as exc:
            raise TamperedDataError(
                f"{table} row {row}: ciphertext failed authentication (altered, copied from "
                "another row, or wrong key version)"
            ) from exc

    def seal(self, table: str, row: str, text: str) -> bytes:
        """Self-describing ciphertext for small free-text fields (upstream error messages).

        ``version (4 bytes) || nonce || ciphertext``, bound to table and row like resources.
        """
        version, blob = self.encrypt(table, row, text.encode())
        return version.to_bytes(4, "big") + blob

    def unseal(self, table: str, row: str, sealed: bytes) -> str:
        """Open :meth:`seal` output (raises :class:`TamperedDataError` when it does not verify)."""
        version = int.from_bytes(sealed[:4], "big")
        return self.decrypt(table, row, version, sealed[4:]).decode()

    def blind(self, kind: str, value: str) -> bytes:
        """Keyed digest of a normalised value, for equality look-ups on PHI."""
        msg = f"{kind}\x00{value}".encode()
        return hmac.new(self.blind_key, msg, hashlib.sha256).digest()[:BLIND_DIGEST_BYTES]

    def name_birthdate_index(self, family: str, birth_date: str) -> bytes:
        """Blind index of family name + birth date (YYYY-MM-DD) as the kiosk looks them up."""
        return self.blind("name_dob", f"{normalise_name(family)}|{birth_date.strip()}")

    def identifier_index(self, system: str, value: str) -> bytes:
        """Blind index of an identifier (system + value, value stripped of spaces and dashes)."""
        cleaned = "".join(ch for ch in value if ch.isalnum()).upper()
        return self.blind("identifier", f"{system.strip()}|{cleaned}")

    def patient_key(self, patient_reference: str) -> bytes:
        """Pseudonymous patient key for index columns and audit records."""
        return self.blind("patient", patient_reference)

    @property
    def signing_public_key(self) -> Ed25519PublicKey:
        """The box's audit-signing public key."""
        return self.signing_key.public_key()

    def signing_public_key_hex(self) -> str:
        """Raw Ed25519 public key as hex, for export and upstream verification."""
        return self.signing_public_key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _insert_key(
    conn: sqlite3.Connection, kek: bytes, purpose: KeyPurpose, state: KeyState, key: bytes
) -> int:
    version = int(conn.execute("SELECT coalesce(max(version), 0) + 1 FROM data_keys").fetchone()[0])
    conn.execute(
        "INSERT INTO data_keys (version, purpose, state, wrapped, created_at) VALUES (?,?,?,?,?)",
        (version, purpose.value, state.value, wrap_key(kek, purpose, version, key), _now()),
    )
    return version


def _signing_raw(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def ensure_keys(conn: sqlite3.Connection, kek: bytes) -> bool:
    """Create the first data, blind-index and signing keys if the database has none.

    Runs in its own write transaction; returns True when keys were created.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("SELECT 1 FROM data_keys LIMIT 1").fetchone() is not None:
            conn.execute("COMMIT")
            return False
        _insert_key(conn, kek, KeyPurpose.DATA, KeyState.ACTIVE, AESGCM.generate_key(256))
        _insert_key(conn, kek, KeyPurpose.BLIND, KeyState.ACTIVE, secrets.token_bytes(32))
        _insert_key(
            conn,
            kek,
            KeyPurpose.SIGNING,
            KeyState.ACTIVE,
            _signing_raw(Ed25519PrivateKey.generate()),
        )
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('kek_fingerprint', ?)",
            (kek_fingerprint(kek),),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return True


# What a function that seals or opens sealed columns on its own connection is given: the
# keyring, or (better, in a long-running process) a way to get the current one on that
# connection, ``Store.current_keyring``, so a data-key rotation is seen first.
KeySource = Keyring | Callable[[sqlite3.Connection], Keyring]


def keyring_of(source: KeySource, conn: sqlite3.Connection) -> Keyring:
    """The keyring ``source`` gives on ``conn`` (to seal: inside the write transaction)."""
    return source if isinstance(source, Keyring) else source(conn)


def load_keyring(conn: sqlite3.Connection, kek: bytes, kek_path: Path | str = "kek") -> Keyring:
    """Unwrap every usable key; fails closed with one clear line when the KEK is wrong."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'kek_fingerprint'").fetchone()
    expected = None if row is None else str(row[0])
    actual = kek_fingerprint(kek)
    if expected is not None and expected != actual:
        raise WrongKeyError(
            f"{kek_path}: this key-encryption key (fingerprint {actual}) is not the one that "
            f"protects this database (fingerprint {expected}); nothing was read. Restore the "
            "right key file or point keys.kek_file at it"
        )
    data: dict[int, AESGCM] = {}
    active: int | None = None
    blind: bytes | None = None
    signing: Ed25519PrivateKey | None = None
    rows = conn.execute(
        "SELECT version, purpose, state, wrapped FROM data_keys WHERE state != 'retired' "
        "ORDER BY version"
    ).fetchall()
    for version, purpose, state, wrapped in rows:
        try:
            raw = unwrap_key(kek, KeyPurpose(purpose), version, wrapped)
        except InvalidTag as exc:
            raise WrongKeyError(
                f"{kek_path}: the key-encryption key does not unwrap data key {version} "
                f"({purpose}); the key file or the database's key table is wrong"
            ) from exc
        if purpose == KeyPurpose.DATA:
            data[version] = AESGCM(raw)
            if state == KeyState.ACTIVE:
                active = version
        elif purpose == KeyPurpose.BLIND and state == KeyState.ACTIVE:
            blind = raw
        elif purpose == KeyPurpose.SIGNING and state == KeyState.ACTIVE:
            signing = Ed25519PrivateKey.from_private_bytes(raw)
    if active is None or blind is None or signing is None:
        raise WrongKeyError(
            f"{kek_path}: the database has no complete key set; run 'appliance init' first"
        )
    return Keyring(data, active, blind, signing, actual)
