"""The appliance core: config, keys and encryption, the store, the audit chain and the CLI.

Nothing here imports ``services``, ``sync_agent`` or ``web`` (STYLE.md, rule 1).
"""

__version__ = "0.1.0"
