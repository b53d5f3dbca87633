"""The one exception device decoders raise (STYLE.md rule 4)."""

from __future__ import annotations


class ProtocolError(ValueError):
    """Device bytes that do not decode; the message names the field, never dumps the payload."""
