"""The one exception device decoders raise (STYLE.md convention 4).

A transport catches :class:`ProtocolError`, logs it once and resynchronises; nothing else may
escape a decoder. Because that log line leaves the device, the message is one line naming the
offending field, the flags and the lengths involved, and never the payload or a decoded value
(a reading or its date is PHI). Where raw bytes genuinely help, at most 32 hex characters.
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """Device bytes that do not decode; the one-line message names the field, never the data."""
