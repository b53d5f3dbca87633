"""Start and drive the loopback FHIR R4 peer (``server.mjs``) from Python tests.

Usage::

    with FhirPeer() as peer:
        httpx.get(f"{peer.base_url}/metadata")
        peer.fault("status", status=503, count=1)
        assert peer.count("Observation") == 0
"""

from __future__ import annotations

import selectors
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import httpx

PEER_DIR = Path(__file__).resolve().parent
SERVER_SCRIPT = PEER_DIR / "server.mjs"
NODE_MODULES = PEER_DIR / "node_modules"
READY_PREFIX = "LISTENING "

FaultMode = Literal["none", "status", "close", "delay"]
FaultAfter = Literal["request", "response"]


class FhirPeerError(RuntimeError):
    """The peer could not be started or did not answer a control call."""


class FhirPeer:
    """A ``node server.mjs --port 0`` subprocess on 127.0.0.1 with its control endpoints."""

    def __init__(self, *, startup_timeout: float = 60.0, node: str | None = None) -> None:
        self.startup_timeout = startup_timeout
        self.node = node or shutil.which("node") or "node"
        self.port: int | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._stderr_lines: list[str] = []
        self._stderr_thread: threading.Thread | None = None
        self._client: httpx.Client | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        if self._proc is not None:
            raise FhirPeerError("FHIR peer already started")
        if not (NODE_MODULES / "@medplum" / "fhir-router").is_dir():
            raise FhirPeerError(
                f"{NODE_MODULES} is missing (or lacks @medplum/fhir-router): run `make test`, "
                "or install the peer's packages with `npm ci --prefix tests/fhir_peer`"
            )
        if shutil.which(self.node) is None and not Path(self.node).is_file():
            raise FhirPeerError(
                "Node.js (`node`) is not on PATH: run `make deps-system` (or `make test`)"
            )
        self._proc = subprocess.Popen(
            [self.node, str(SERVER_SCRIPT), "--port", "0", "--exit-on-stdin-close"],
            cwd=PEER_DIR,
            # Never written: if this process dies the pipe closes and the peer exits too.
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._stderr_thread = threading.Thread(
            target=self._drain_stderr, name="fhir-peer-stderr", daemon=True
        )
        self._stderr_thread.start()
        try:
            self.port = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self._client = httpx.Client(base_url=self.control_url, timeout=30.0)
        return self

    def _drain_stderr(self) -> None:
        proc = self._proc
        assert proc is not None
        assert proc.stderr is not None
        for line in proc.stderr:
            self._stderr_lines.append(line.rstrip("\n"))

    def _wait_ready(self) -> int:
        proc = self._proc
        assert proc is not None
        assert proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        seen: list[str] = []
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise FhirPeerError(
                        f"FHIR peer did not print {READY_PREFIX.strip()!r} within "
                        f"{self.startup_timeout:.0f} s{self._diagnostics(seen)}"
                    )
                if not sel.select(timeout=min(remaining, 0.5)):
                    if proc.poll() is not None:
                        raise FhirPeerError(
                            f"FHIR peer exited with code {proc.returncode} before it was ready"
                            f"{self._diagnostics(seen)}"
                        )
                    continue
                line = proc.stdout.readline()
                if not line:  # EOF: the process is gone
                    proc.wait(timeout=5)
                    raise FhirPeerError(
                        f"FHIR peer exited with code {proc.returncode} before it was ready"
                        f"{self._diagnostics(seen)}"
                    )
                line = line.strip()
                if line.startswith(READY_PREFIX):
                    return int(line[len(READY_PREFIX) :])
                seen.append(line)

    def _diagnostics(self, stdout_lines: list[str]) -> str:
        proc, thread = self._proc, self._stderr_thread
        if thread is not None and proc is not None and proc.poll() is not None:
            thread.join(timeout=2)  # let the last stderr lines of a dead process arrive
        parts = []
        if stdout_lines:
            parts.append("stdout:\n" + "\n".join(stdout_lines[-20:]))
        parts.append("stderr:\n" + ("\n".join(self._stderr_lines[-40:]) or "(empty)"))
        return "\n" + "\n".join(parts)

    def stop(self, timeout: float = 10.0) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=2)
            self._stderr_thread = None
        if proc.stderr is not None:
            proc.stderr.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def control_url(self) -> str:
        if self.port is None:
            raise FhirPeerError("FHIR peer not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """FHIR base, e.g. ``http://127.0.0.1:41234/fhir/R4`` (no trailing slash)."""
        return f"{self.control_url}/fhir/R4"

    @property
    def stderr(self) -> str:
        return "\n".join(self._stderr_lines)

    # -- control endpoints -----------------------------------------------------------------

    def _control(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._client is None:
            raise FhirPeerError("FHIR peer not started")
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise FhirPeerError(
                f"control call {method} {path} failed: {exc!r}{self._diagnostics([])}"
            ) from exc
        if response.status_code != 200:
            raise FhirPeerError(
                f"control call {method} {path} -> {response.status_code}: {response.text}"
            )
        return response.json()

    def count(self, resource_type: str) -> int:
        """How many resources of ``resource_type`` the peer currently stores."""
        return int(
            self._control("GET", "/__control/count", params={"type": resource_type})["count"]
        )

    def fault(
        self,
        mode: FaultMode,
        *,
        status: int = 503,
        count: int = 1,
        delay_ms: int = 0,
        after: FaultAfter = "request",
    ) -> dict[str, Any]:
        """Inject a fault into the next ``count`` requests under ``/fhir``.

        ``status``: answer ``status`` + OperationOutcome (after="request": without processing;
        after="response": process first, then answer ``status``). ``close``: destroy the socket
        without a reply (after="response": process first, so the write happens but the reply is
        lost). ``delay``: sleep ``delay_ms`` then process. ``none``: clear.
        """
        spec = {
            "mode": mode,
            "status": status,
            "count": count,
            "delay_ms": delay_ms,
            "after": after,
        }
        result: dict[str, Any] = self._control("POST", "/__control/fault", json=spec)
        return result

    def clear_fault(self) -> None:
        self.fault("none")

    def reject(self, marker: str | None, status: int = 422) -> None:
        """Refuse (entry ``status``, 422 by default) every batch entry whose resource contains
        ``marker``."""
        self._control("POST", "/__control/reject", json={"marker": marker, "status": status})

    def reset(self) -> None:
        """Drop every stored resource and clear any pending fault."""
        self._control("POST", "/__control/reset")


__all__ = ["FhirPeer", "FhirPeerError"]
