"""Video visits: rooms, the signalling schema, and the forwarding media relay (issue 7).

``rooms`` and ``signalling`` are pure (no I/O, clock passed in); ``forwarding`` is the one
module that adapts to aiortc internals; ``service`` glues them to the box's peer
connections, transport-independent (the WebSocket route is ``web/video.py``). See
docs/video.md.
"""
