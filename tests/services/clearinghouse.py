"""A test clearinghouse and a test FHIR payer on 127.0.0.1: raw asyncio HTTP/1.1, no mocks.

Speaks the protocol of docs/claims.md: ``POST /x12/submissions`` takes an 837 interchange,
validates it with real pyx12 and answers 200 with a 999 (also queued for polling);
``GET /x12/responses?since=N`` lists queued 999/277CA/835 files; :meth:`adjudicate` makes
the 277CA and 835 of everything accepted so far ("later"). ``POST /fhir/Claim`` is a FHIR
payer that answers 201 with the Claim. Directives: ``reject_999`` (claim numbers the 999
rejects), ``reject_277`` (the 277CA rejects), ``pay`` (claim number → cents paid: less than
billed), ``drop_next`` (read the next submission, keep it, close without answering — the
lost response), ``garble_next`` (keep it, answer with a body that is not the gzip it claims:
an answer that cannot be read; ``garble_poll`` the same for the next responses page), ``token`` (a bearer token every request must carry, else
401, unread), ``answers`` (statuses the next submissions get, unread: a redirect, a proxy's
404, an outage's 503), ``hold_next`` (read and keep the next submission, answer it once the
event is set: a request on the wire), ``dribble_next`` (answer the next submission one byte
per so many seconds: no read waits long, the answer never ends), ``dribble_poll`` (the same
for the next responses page), and :meth:`stop` (a connection is then refused). Every file is synthetic.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from services.claims.model import money
from services.claims.x12_read import Interchange, read
from services.claims.x12_validation import validate_x12


def envelope(fic: str, version: str, sets: list[list[str]], control: int, when: datetime) -> str:
    """ISA..IEA around transaction sets given as segment lists (ST..SE counted here)."""
    isa = "*".join([
        "ISA", "00", " " * 10, "00", " " * 10, "ZZ", f"{'RECV01':<15}", "ZZ", f"{'SUBMIT01':<15}",
        when.strftime("%y%m%d"), when.strftime("%H%M"), "^", "00501", f"{control:09d}", "0",
        "T", ":",
    ])  # fmt: skip
    segs = [isa, f"GS*{fic}*RECV01*SUBMIT01*{when:%Y%m%d}*{when:%H%M}*{control}*X*{version}"]
    for n, body in enumerate(sets, 1):
        st = f"{n:04d}"
        segs += [f"ST*{body[0]}*{st}*{version}", *body[1:], f"SE*{len(body) + 1}*{st}"]
    segs += [f"GE*{len(sets)}*{control}", f"IEA*1*{control:09d}"]
    return "".join(s + "~\n" for s in segs)


@dataclass
class Submitted:
    """One claim the clearinghouse holds (from an 837 it received)."""

    claim_number: str
    st_control: str
    billed: str
    accepted_999: bool


@dataclass
class Clearinghouse:
    """The server's state; tests set the directives and read what it received."""

    when: datetime
    reject_999: set[str] = field(default_factory=set)
    reject_277: set[str] = field(default_factory=set)
    pay: dict[str, int] = field(default_factory=dict)
    drop_next: bool = False
    garble_next: bool = False
    garble_poll: bool = False
    # The next responses pages answered as given instead (a broken clearinghouse), in order.
    raw_pages: list[bytes] = field(default_factory=list)
    token: str | None = None
    answers: list[int] = field(default_factory=list)
    turned_away: list[int] = field(default_factory=list)  # statuses answered unread, in order
    hold_next: asyncio.Event | None = None
    dribble_next: float | None = None
    dribble_poll: float | None = None
    received: list[str] = field(default_factory=list)  # 837 interchanges, in order
    claims: list[Submitted] = field(default_factory=list)
    responses: list[tuple[str, str]] = field(default_factory=list)  # (kind, body)
    fhir_claims: list[dict[str, Any]] = field(default_factory=list)
    fhir_if_none_exist: list[str] = field(default_factory=list)
    adjudicated: set[str] = field(default_factory=set)
    control: int = 500
    port: int = 0
    _server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        """The x12 endpoint base URL."""
        return f"http://127.0.0.1:{self.port}/x12"

    @property
    def fhir_url(self) -> str:
        """The FHIR payer base URL."""
        return f"http://127.0.0.1:{self.port}/fhir"

    async def start(self) -> None:
        """Listen on 127.0.0.1 (a fresh port, or the same one again after a stop)."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening (a connection to the port is then refused)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _next_control(self) -> int:
        self.control += 1
        return self.control

    # -- HTTP ----------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {
                k.strip().lower(): v.strip()
                for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            answer = self._route(method, target, headers, body)
            if answer is None:  # the lost response: taken, never answered
                writer.close()
                return
            if self.hold_next is not None and method == "POST" and answer[0] < 300:
                held, self.hold_next = self.hold_next, None
                await held.wait()
            status, media, payload = answer
            garbled = ""
            if self.garble_next and method == "POST":
                self.garble_next, garbled = False, "Content-Encoding: gzip\r\n"
            elif self.garble_poll and method == "GET":
                self.garble_poll, garbled = False, "Content-Encoding: gzip\r\n"
            moved = ""
            if 300 <= status < 400:
                moved = f"Location: https://127.0.0.1:{self.port}{urlsplit(target).path}\r\n"
            data = (
                f"HTTP/1.1 {status} X\r\nContent-Type: {media}\r\n{garbled}{moved}"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            if method == "GET" and self.dribble_poll is not None:
                pace, self.dribble_poll = self.dribble_poll, None
            elif method == "POST" and self.dribble_next is not None:
                pace, self.dribble_next = self.dribble_next, None
            else:
                writer.write(data)
                await writer.drain()
                return
            for n in range(len(data)):
                writer.write(data[n : n + 1])
                await writer.drain()
                await asyncio.sleep(pace)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _route(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, str, bytes] | None:
        url = urlsplit(target)
        if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
            self.turned_away.append(401)
            return 401, "text/plain", b"unauthorized"
        if method == "POST" and self.answers:
            status = self.answers.pop(0)
            self.turned_away.append(status)
            return status, "text/plain", b"not here"
        if method == "POST" and url.path == "/x12/submissions":
            return self._submission(body.decode("ascii"))
        if method == "GET" and url.path == "/x12/responses" and self.raw_pages:
            return 200, "application/json", self.raw_pages.pop(0)
        if method == "GET" and url.path == "/x12/responses":
            since = int((parse_qs(url.query).get("since") or ["0"])[0] or 0)
            items = [
                {"id": str(n), "kind": kind, "body": text}
                for n, (kind, text) in enumerate(self.responses, 1)
                if n > since
            ]
            page = {"responses": items, "next": str(len(self.responses))}
            return 200, "application/json", json.dumps(page).encode()
        if method == "POST" and url.path == "/fhir/Claim":
            claim = json.loads(body)
            claim["id"] = f"payer-{len(self.fhir_claims) + 1}"
            self.fhir_claims.append(claim)
            self.fhir_if_none_exist.append(headers.get("if-none-exist", ""))
            return 201, "application/fhir+json", json.dumps(claim).encode()
        return 404, "text/plain", b"not found"

    # -- X12 -----------------------------------------------------------------------------

    def _submission(self, text: str) -> tuple[int, str, bytes] | None:
        self.received.append(text)
        verdict = validate_x12(text)
        if not verdict.valid:
            self.responses.append(("999", verdict.ack))
            return 200, "application/edi-x12", verdict.ack.encode()
        parsed = read(text)
        ack = self._999(parsed)
        self.responses.append(("999", ack))
        if self.drop_next:
            self.drop_next = False
            return None
        return 200, "application/edi-x12", ack.encode()

    def _999(self, parsed: Interchange) -> str:
        group = parsed.groups[0]
        body = ["999", f"AK1*HC*{group.control}*{group.version}"]
        accepted = 0
        for tset in group.sets:
            clm = next(s for s in tset.segments if s.id == "CLM")
            ok = clm.get(1) not in self.reject_999
            self.claims.append(Submitted(clm.get(1), tset.control, clm.get(2), ok))
            body.append(f"AK2*837*{tset.control}*{group.version}")
            if not ok:
                # The subscriber's member id (NM1*IL, element 9) has an invalid code value.
                body += ["IK3*NM1*14*2010BA*8", "IK4*9*67*7"]
            body.append("IK5*A" if ok else "IK5*R*5")
            accepted += ok
        sets = len(group.sets)
        code = "A" if accepted == sets else ("R" if accepted == 0 else "P")
        body.append(f"AK9*{code}*{sets}*{sets}*{accepted}")
        return envelope("FA", "005010X231A1", [body], self._next_control(), self.when)

    def adjudicate(self) -> None:
        """Make the 277CA and then the 835 of every claim accepted by a 999 so far."""
        todo = [c for c in self.claims if c.accepted_999 and c.claim_number not in self.adjudicated]
        if not todo:
            return
        self.adjudicated |= {c.claim_number for c in todo}
        day = self.when.strftime("%Y%m%d")
        status = [
            "277", f"BHT*0085*08*{self.control}*{day}*1200*TH", "HL*1**20*1",
            "NM1*PR*2*TEST MAC*****PI*MAC01", "TRN*1*0", f"DTP*050*D8*{day}",
            f"DTP*009*D8*{day}", "HL*2*1*21*1", "NM1*41*2*TEST CLINIC*****46*SUBMIT01",
            "TRN*2*BATCH", f"STC*A1:19:PR*{day}*WQ*0", "HL*3*2*19*1",
            "NM1*85*2*TEST CLINIC*****XX*1234567893",
        ]  # fmt: skip
        for n, c in enumerate(todo, 4):
            status += [f"HL*{n}*3*PT", "NM1*QC*1*TESTPERSON*ADA", f"TRN*2*{c.claim_number}"]
            if c.claim_number in self.reject_277:
                status.append(f"STC*A7:562:85*{day}*U*{c.billed}")
            else:
                status += [f"STC*A2:20:PR*{day}*WQ*{c.billed}", f"REF*1K*ICN{c.claim_number}"]
        self.responses.append(
            ("277CA", envelope("HN", "005010X214", [status], self._next_control(), self.when))
        )
        paid = [c for c in todo if c.claim_number not in self.reject_277]
        if not paid:
            return
        remit = ["835", "BPR*I*0*C*NON************" + day, "TRN*1*CHK1*1512345678",
                 "N1*PR*TEST MAC", "N1*PE*TEST CLINIC*XX*1234567893", "LX*1"]  # fmt: skip
        for c in paid:
            billed = int(c.billed.replace(".", "")) if "." in c.billed else int(c.billed) * 100
            cents = self.pay.get(c.claim_number, billed)
            patient = (billed - cents) // 2 if cents < billed else 0
            contractual = billed - cents - patient
            remit.append(
                f"CLP*{c.claim_number}*1*{c.billed}*{money(cents)}*{money(patient)}*MB*"
                f"ICN{c.claim_number}*11*1"
            )
            if contractual:
                remit.append(f"CAS*CO*45*{money(contractual)}")
            if patient:
                remit.append(f"CAS*PR*2*{money(patient)}")
            remit += ["NM1*QC*1*TESTPERSON*ADA", f"SVC*HC:Q3014*{c.billed}*{money(cents)}**1"]
        self.responses.append(
            ("835", envelope("HP", "005010X221A1", [remit], self._next_control(), self.when))
        )
