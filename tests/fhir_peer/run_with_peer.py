"""Run a command with the Medplum FHIR peer on loopback as its upstream (``make run``).

Starts the peer, exports ``APPLIANCE_DEMO_UPSTREAM`` with its base URL, runs the command,
and stops the peer when the command ends, so the demo shows readings reaching an EHR.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.fhir_peer.peer import FhirPeer, FhirPeerError


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write("usage: python -m tests.fhir_peer.run_with_peer COMMAND [ARGS...]\n")
        return 2
    env = dict(os.environ)
    try:
        peer = FhirPeer().start()
    except FhirPeerError as exc:
        sys.stderr.write(f"demo upstream not started ({exc}); readings will wait in the outbox\n")
        peer = None
    if peer is not None:
        env["APPLIANCE_DEMO_UPSTREAM"] = peer.base_url
        sys.stdout.write(f"  Demo upstream EHR (Medplum FHIR peer): {peer.base_url}\n")
        sys.stdout.flush()
    child = subprocess.Popen(argv, env=env)
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)
        return child.wait()
    finally:
        if peer is not None:
            peer.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
