"""Video visits: rooms, the signalling schema, and the forwarding media relay (issue 7).

``rooms`` and ``signalling`` are pure (no I/O, clock passed in); ``forwarding`` is the one
module that adapts to aiortc internals. See docs/video.md.
"""
