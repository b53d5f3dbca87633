"""One exception root for the appliance; every message is a single line an operator can act on."""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose."""


class ConfigError(ApplianceError):
    """The site configuration is missing, malformed or invalid (lists every problem)."""

    def __init__(self, problems: list[str], source: str = "site config") -> None:
        self.problems = list(problems)
        self.source = source
        count = len(self.problems)
        head = f"{source}: {count} problem{'s' if count != 1 else ''}"
        super().__init__(head + "".join(f"\n  - {p}" for p in self.problems))


class KeyFileError(ApplianceError):
    """A key file is missing, unreadable, of the wrong size or too widely readable."""


class WrongKeyError(ApplianceError):
    """The key-encryption key does not unwrap this database's data keys."""


class TamperedDataError(ApplianceError):
    """A ciphertext failed authentication: altered, moved to another row, or wrong key version."""


class StoreError(ApplianceError):
    """The store could not complete an operation (disk full, corrupt database, locked)."""


class InvalidResourceError(ApplianceError):
    """A FHIR resource failed validation; nothing was written."""


class NotFoundError(ApplianceError):
    """The requested record does not exist."""
