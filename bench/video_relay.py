"""Video relay CPU: the forwarding relay against aiortc's ``MediaRelay``, in the same run.

The relay runs in its own process (this file with ``--serve``), so its CPU time
(``time.process_time``, all threads) is the relay's alone. In this process, one publisher
sends 640x480@30 VP8 (or ``--size``; a scrolling checkerboard with a band of noise; aiortc's
encoder is CBR, 500 kbps unless the relay's REMB moves it); the viewers run in a third
process and count the frames they receive without decoding them (their receivers are
tapped with ``services.video.forwarding``), so the machine's second core is not spent on
decoding, and the publisher's encoder does not share an interpreter with 16 viewers.
For 0, 1, 2, 4 (and 8, 16) viewers the relay's CPU and each viewer's frame rate are
measured over a window: the cost per incoming stream is the CPU with no viewer, the cost
per extra viewer the least-squares slope over all the counts.

Then latency: numbered 320x240 frames (tests/video/media.py) from made to decoded, direct
peer to peer and through the relay process with 1, 4 and 8 viewers (the others in the
viewers' process); the figure is the worst p95 added.

Baseline, same run: aiortc ``MediaRelay`` (decode once, ``subscribe`` per viewer, so each
viewer's sender re-encodes). Loopback only (ICE gathers 127.0.0.1); no STUN.

    python bench/video_relay.py [--quick] [--seconds S] [--windows N]
                                [--viewers 0,1,2,4,8,16] [--size 640x480|1280x720]

Each step measures ``--windows`` consecutive windows (3; 1 with ``--quick``) and reports
their median CPU (and every window's); fps is the slowest viewer over all of them.

With 16 among the viewer counts, the 16-viewer step is reported on its own against the
issue's goal (every viewer ≥ 29.5 fps, the relay within 25 % of a core).

For an A/B of the relay's send path: ``--send-path stock`` gives each viewer's sender
aiortc's own RTP loop (``ForwardingRelay(frame_sender=False)``), ``frame`` the relay's
``_FrameSender`` run by each viewer's sender task (``direct_send=False``), ``direct`` (the
default) the same, with each frame sent as it is complete (``_FrameSender.send_now``);
``--forwarding-only`` skips ``MediaRelay`` and the latency runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aioice
import aioice.ice
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.contrib.media import MediaRelay
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcdtlstransport import RTCCertificate, RTCDtlsTransport
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcicetransport import RTCIceGatherer, RTCIceTransport
from aiortc.rtcrtpparameters import (
    RTCRtpCodecParameters,
    RTCRtpHeaderExtensionParameters,
    RTCRtpSendParameters,
)
from av import VideoFrame
from pylibsrtp import Policy, Session

from services.video.forwarding import ForwardingRelay, publisher_receiver
from tests.video.media import NumberedVideoTrack, read_frame_id

WIDTH, HEIGHT, SQUARE = 640, 480, 32
NOISE_ROWS = 16  # a band of sensor-like noise; the bitrate it costs is reported (kbps_in)
WARM_UP_S = 2.0  # after viewers join, before measuring
LATENCY_SKIP = 30  # the first second: the stream settling
SETTLE_S = 10.0  # after the publisher connects: REMB ramps its bitrate up to aiortc's cap
SEND_PATH_ENV = "VIDEO_RELAY_SEND_PATH"  # how --send-path reaches the relay process
RECEIVE_PATH_ENV = "VIDEO_RELAY_RECEIVE_PATH"  # how --receive-path reaches it


def loopback_only(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return ["127.0.0.1"]


aioice.ice.get_host_addresses = loopback_only  # keep ICE on 127.0.0.1


def peer() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


def emit(figure: str, value: float, unit: str, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"figure": figure, "value": round(value, 2), "unit": unit, **extra}
    print(json.dumps(row), flush=True)
    return row


class ScrollingCheckerboard(VideoStreamTrack):
    """WIDTHxHEIGHT@30 frames (640x480 unless ``--size``) of a checkerboard scrolling 4 px a frame."""

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        shift = (pts // 3000 * 4) % (2 * SQUARE)
        light = bytes(16 + 200 * (((x + shift) // SQUARE) % 2) for x in range(WIDTH))
        dark = bytes(216 - 200 * (((x + shift) // SQUARE) % 2) for x in range(WIDTH))
        rows = [(light if (y // SQUARE) % 2 else dark) * SQUARE for y in range(0, HEIGHT, SQUARE)]
        rows[-1] = os.urandom(WIDTH * NOISE_ROWS) + rows[-1][WIDTH * NOISE_ROWS :]
        frame = VideoFrame(WIDTH, HEIGHT, "yuv420p")
        frame.planes[0].update(b"".join(rows)[: WIDTH * HEIGHT])  # 720 is not a multiple of 32
        for plane in frame.planes[1:]:
            plane.update(b"\x80" * plane.buffer_size)
        frame.pts, frame.time_base = pts, time_base
        return frame


# -- the relay process ---------------------------------------------------------------------


class RelayServer:
    """One relay (forwarding or MediaRelay) driven by JSON lines on stdin."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        send_path = os.environ.get(SEND_PATH_ENV, "direct")
        receive_path = os.environ.get(RECEIVE_PATH_ENV, "drain")
        direct = receive_path != "stock"
        self.forwarding = ForwardingRelay(
            "video",
            frame_sender=send_path != "stock",
            direct_send=send_path == "direct",
            direct_receive=direct,
            drain_reads=receive_path == "drain",
        )
        self.media_relay = MediaRelay()
        self.source: MediaStreamTrack | None = None
        self.pcs: dict[str, RTCPeerConnection] = {}

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command["op"]
        if op == "publish":
            pc = self.pcs["publisher"] = peer()

            @pc.on("track")
            def on_track(track: MediaStreamTrack) -> None:
                self.source = track
                if self.mode == "forwarding":
                    self.forwarding.attach(publisher_receiver(pc, track))

            await pc.setRemoteDescription(RTCSessionDescription(command["sdp"], "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            return {"sdp": pc.localDescription.sdp}
        if op == "view":
            pc = self.pcs[command["name"]] = peer()
            if self.mode == "forwarding":
                self.forwarding.add_viewer(pc, command["name"])
            else:
                assert self.source is not None
                pc.addTrack(self.media_relay.subscribe(self.source, buffered=False))
            await pc.setLocalDescription(await pc.createOffer())
            return {"sdp": pc.localDescription.sdp}
        if op == "answer":
            answer = RTCSessionDescription(command["sdp"], "answer")
            await self.pcs[command["name"]].setRemoteDescription(answer)
            return {}
        if op == "cpu":
            stats = self.forwarding.stats
            return {
                "cpu": time.process_time(),
                "cpu_system": os.times().system,  # of it, in the kernel (socket calls)
                # times the process slept and was woken (each costs a cold start)
                "wakeups": resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw,
                "wall": time.monotonic(),
                "bytes_in": stats.bytes_in,
                "keyframe_requests": stats.keyframe_requests_sent,
                "frames_dropped": sum(v.frames_dropped for v in stats.viewers.values()),
                # packets the publisher's connection handed over as read (--receive-path)
                "packets_direct": direct.packets if (direct := self.forwarding.direct) else 0,
                # datagrams read in the same callback as the one before them
                "drained": direct.drained if direct else 0,
            }
        raise ValueError(op)

    async def serve(self) -> None:
        await serve_lines(self.handle)
        self.forwarding.stop()
        await asyncio.gather(*(pc.close() for pc in self.pcs.values()))


class ViewerServer:
    """The viewers, in a process of their own: each counts frames through a tapped receiver.

    Kept out of the publisher's process so that, at 16 viewers, the publisher's encoder and
    the viewers do not share one interpreter (one GIL): what limits the frame rate is then
    the relay, not the harness.
    """

    def __init__(self) -> None:
        self.viewers: dict[str, tuple[RTCPeerConnection, ForwardingRelay]] = {}

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command["op"]
        if op == "view":
            pc, counter = peer(), ForwardingRelay("video")

            @pc.on("track")
            def on_track(track: MediaStreamTrack) -> None:
                counter.attach(publisher_receiver(pc, track))  # counts, never decodes

            self.viewers[command["name"]] = (pc, counter)
            await pc.setRemoteDescription(RTCSessionDescription(command["sdp"], "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            return {"sdp": pc.localDescription.sdp}
        if op == "wait":
            await wait_connected(self.viewers[command["name"]][0])
            return {}
        if op == "frames":
            return {"frames": [c.stats.frames_in for _, c in self.viewers.values()]}
        raise ValueError(op)

    async def close(self) -> None:
        for _, counter in self.viewers.values():
            counter.stop()
        await asyncio.gather(*(pc.close() for pc, _ in self.viewers.values()))


async def serve_lines(handle: Any) -> None:
    """Answer JSON-line commands on stdin until ``stop``."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = json.loads(line)
        if command["op"] == "stop":
            break
        reply = await handle(command)
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


async def serve_viewers() -> None:
    server = ViewerServer()
    try:
        await serve_lines(server.handle)
    finally:
        await server.close()


# -- this process: publisher and viewers ----------------------------------------------------


class RelayProcess:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def call(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        await self.process.stdin.drain()
        reply: dict[str, Any] = json.loads(await self.process.stdout.readline())
        return reply


async def wait_connected(pc: RTCPeerConnection) -> None:
    for _ in range(500):
        if pc.connectionState == "connected":
            return
        await asyncio.sleep(0.02)
    raise RuntimeError("peer connection did not connect")


async def start_relay(mode: str) -> RelayProcess:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        mode,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    return RelayProcess(process)


async def stop_relay(relay: RelayProcess) -> None:
    process = relay.process
    if process.returncode is None:
        assert process.stdin is not None
        process.stdin.write(b'{"op": "stop"}\n')
        await process.stdin.drain()
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()


async def publish(relay: RelayProcess, publisher: RTCPeerConnection) -> None:
    await publisher.setLocalDescription(await publisher.createOffer())
    answer = await relay.call(op="publish", sdp=publisher.localDescription.sdp)
    await publisher.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
    await wait_connected(publisher)


async def view(relay: RelayProcess, pc: RTCPeerConnection, name: str) -> None:
    offer = await relay.call(op="view", name=name)
    await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    await relay.call(op="answer", name=name, sdp=pc.localDescription.sdp)
    await wait_connected(pc)


async def measure_mode(
    mode: str, viewer_counts: list[int], seconds: float, windows: int = 1
) -> list[dict[str, Any]]:
    relay = await start_relay(mode)
    viewers = await start_relay("viewers")
    publisher = peer()
    publisher.addTrack(ScrollingCheckerboard())
    joined = 0
    rows = []
    try:
        await publish(relay, publisher)
        await asyncio.sleep(SETTLE_S)
        for count in viewer_counts:
            if joined < count:
                await join_viewers(relay, viewers, [f"viewer-{n}" for n in range(joined, count)])
                joined = count
            await asyncio.sleep(WARM_UP_S)
            samples = []
            for _ in range(windows):  # consecutive windows: the step's figure is the median
                start = await relay.call(op="cpu")
                frames_before = (await viewers.call(op="frames"))["frames"]
                await asyncio.sleep(seconds)
                end = await relay.call(op="cpu")
                frames_after = (await viewers.call(op="frames"))["frames"]
                wall = end["wall"] - start["wall"]
                fps = [
                    (after - before) / wall
                    for after, before in zip(frames_after, frames_before, strict=True)
                ]
                samples.append((100 * (end["cpu"] - start["cpu"]) / wall, start, end, wall, fps))
            cpus = [sample[0] for sample in samples]
            cpu, start, end, wall, _ = sorted(samples, key=lambda sample: sample[0])[
                len(samples) // 2
            ]
            row = {
                "viewers": count,
                "cpu_percent": round(cpu, 2),
                "system_percent": round(100 * (end["cpu_system"] - start["cpu_system"]) / wall, 2),
                "wakeups_per_s": round((end["wakeups"] - start["wakeups"]) / wall),
            }
            if windows > 1:
                row["cpu_windows"] = [round(c, 2) for c in cpus]
            if mode == "forwarding":  # VP8 payload into the relay (MediaRelay's is the same)
                row["kbps_in"] = round((end["bytes_in"] - start["bytes_in"]) * 8 / wall / 1000)
                for key in ("keyframe_requests", "frames_dropped", "packets_direct", "drained"):
                    row[key] = end[key] - start[key]
            if samples[0][4]:  # every window's slowest viewer counts
                fps = [f for sample in samples for f in sample[4]]
                row |= {"fps_min": round(min(fps), 1), "fps_mean": round(statistics.mean(fps), 1)}
            sys.stderr.write(f"{mode}: {row}\n")
            rows.append(row)
    finally:
        await stop_relay(relay)
        await stop_relay(viewers)
        await publisher.close()
    return rows


async def join_viewers(relay: RelayProcess, viewers: RelayProcess, names: list[str]) -> None:
    """Viewers in the viewers' process join the relay's published stream, one by one."""
    for name in names:
        offer = await relay.call(op="view", name=name)
        answer = await viewers.call(op="view", name=name, sdp=offer["sdp"])
        await relay.call(op="answer", name=name, sdp=answer["sdp"])
        await viewers.call(op="wait", name=name)


async def measure_latency(through_relay: bool, frames: int, viewers: int = 1) -> list[float]:
    """Made → decoded (ms) for numbered 320x240 frames: direct, or through the relay process.

    Through the relay with ``viewers`` > 1, the others join first from the viewers' process
    (counting frames, not decoding), so the relay forwards to all of them while the one
    viewer here measures.
    """
    camera = NumberedVideoTrack()
    publisher, viewer = peer(), peer()
    publisher.addTrack(camera)
    arrivals: list[tuple[int | None, float]] = []
    enough = asyncio.Event()

    async def consume(track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                assert isinstance(frame, VideoFrame)
                arrivals.append((read_frame_id(frame), time.monotonic()))
                if len(arrivals) >= frames + LATENCY_SKIP:
                    enough.set()

    tasks: list[asyncio.Task[None]] = []
    viewer.on("track", lambda track: tasks.append(asyncio.ensure_future(consume(track))))
    relay = await start_relay("forwarding") if through_relay else None
    others = await start_relay("viewers") if relay is not None and viewers > 1 else None
    try:
        if relay is not None:
            await publish(relay, publisher)
            if others is not None:
                await join_viewers(relay, others, [f"other-{n}" for n in range(viewers - 1)])
            await view(relay, viewer, "viewer")
        else:
            await publisher.setLocalDescription(await publisher.createOffer())
            await viewer.setRemoteDescription(publisher.localDescription)
            await viewer.setLocalDescription(await viewer.createAnswer())
            await publisher.setRemoteDescription(viewer.localDescription)
        await asyncio.wait_for(enough.wait(), frames / 10)
    finally:
        if relay is not None:
            await stop_relay(relay)
        if others is not None:
            await stop_relay(others)
        await asyncio.gather(publisher.close(), viewer.close())
        for task in tasks:
            task.cancel()
    return [
        (arrived - camera.made_at[frame_id]) * 1000
        for frame_id, arrived in arrivals[LATENCY_SKIP:]
        if frame_id is not None
    ]


async def keyed_transport(sink: tuple[str, int]) -> RTCDtlsTransport:
    """A viewer's DTLS transport as the handshake and ICE leave it, without either: keyed
    for SRTP (random synthetic keys), ``connected``, its ICE connection nominated on a
    real UDP socket on 127.0.0.1 to ``sink``. Every send goes through the real layers."""
    dtls = RTCDtlsTransport(
        RTCIceTransport(RTCIceGatherer()), [RTCCertificate.generateCertificate()]
    )
    policy = Policy(key=os.urandom(30), ssrc_type=Policy.SSRC_ANY_OUTBOUND)
    policy.allow_repeat_tx = True
    dtls._tx_srtp = Session(policy)
    dtls._set_state(DtlsState.CONNECTED)
    connection = dtls.transport._connection
    _, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: aioice.ice.StunProtocol(connection), local_addr=("127.0.0.1", 0)
    )
    remote = aioice.Candidate(
        foundation="1",
        component=1,
        transport="udp",
        priority=1,
        host=sink[0],
        port=sink[1],
        type="host",
    )
    connection._nominated[1] = aioice.ice.CandidatePair(protocol, remote)
    return dtls


async def measure_send_path(path: str, viewers: int, frames: int, size: int) -> float:
    """CPU µs per frame per viewer of the relay's send side, with no publisher in the way.

    One relay, ``viewers`` senders on ``keyed_transport``s (SRTP, ICE, UDP to a sink on
    127.0.0.1); ``frames`` VP8-sized frames of ``size`` bytes go in through the relay's
    frame tap entry point, as fast as the senders take them. Independent of the publisher's
    bitrate, so the send paths (``stock``, ``frame``, ``direct``: see ``--send-path``) can
    be compared run against run.
    """
    loop = asyncio.get_running_loop()
    sink, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
    )
    vp8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=97)
    parameters = RTCRtpSendParameters(
        codecs=[vp8],
        headerExtensions=[
            RTCRtpHeaderExtensionParameters(id=1, uri="urn:ietf:params:rtp-hdrext:sdes:mid"),
            RTCRtpHeaderExtensionParameters(
                id=3, uri="http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
            ),
        ],
        muxId="0",
    )
    relay = ForwardingRelay("video", frame_sender=path != "stock", direct_send=path == "direct")
    pcs = [peer() for _ in range(viewers)]
    senders, transports = [], []
    for n, pc in enumerate(pcs):
        sender = relay.add_viewer(pc, f"viewer-{n}")
        transport = await keyed_transport(sink.get_extra_info("sockname"))
        sender.setTransport(transport)
        await sender.send(parameters)
        senders.append(sender)
        transports.append(transport)
    await asyncio.sleep(0)  # the senders' loops start
    keyframe = b"\x10\x02\x00\x9d\x01\x2a\x80\x02\xe0\x01" + os.urandom(size - 10)
    delta = b"\x11\x02\x00" + os.urandom(size - 3)
    try:
        start = time.process_time()
        for n in range(frames):
            # The tap's entry point, as the publisher's receiver would call it.
            relay._on_frame(
                vp8, JitterFrame(data=keyframe if n == 0 else delta, timestamp=3000 * n)
            )
            for _ in range(3):  # each sender's loop takes its frame and sends it
                await asyncio.sleep(0)
        elapsed = time.process_time() - start
        stats = list(relay.stats.viewers.values())
        assert min(s.frames_out for s in stats) == frames, stats
        direct = sum(s.frames_direct for s in stats)
        assert direct == (frames * viewers if path == "direct" else 0), (path, direct)
    finally:
        relay.stop()
        await asyncio.gather(*(s.stop() for s in senders))
        await asyncio.gather(*(pc.close() for pc in pcs))
        for transport in transports:
            for pair in transport.transport._connection._nominated.values():
                pair.protocol.transport.close()
        sink.close()
    return elapsed / frames / viewers * 1e6


SEND_PATHS = ("stock", "frame", "direct")


def send_path_ab(runs: int, viewers: int, frames: int, size: int) -> None:
    """Alternate the three send paths ``runs`` times each; emit the medians."""
    results: dict[str, list[float]] = {path: [] for path in SEND_PATHS}
    for _ in range(runs):
        for path in SEND_PATHS:
            cost = asyncio.run(measure_send_path(path, viewers, frames, size))
            results[path].append(cost)
            sys.stderr.write(f"send path {path}: {cost:.1f} µs per frame per viewer\n")
    median = {path: statistics.median(values) for path, values in results.items()}
    emit(
        "video_relay_send_cpu_per_viewer_frame",
        median["direct"],
        "µs of CPU",
        baseline=round(median["stock"], 2),
        baseline_is="the same relay with aiortc's own sender loop (frame_sender=False)",
        ratio=round(median["direct"] / median["stock"], 3),
        frame=round(median["frame"], 2),
        frame_ratio=round(median["frame"] / median["stock"], 3),
        direct_over_frame=round(median["direct"] / median["frame"], 3),
        runs={path: [round(v, 1) for v in values] for path, values in results.items()},
        viewers=viewers,
        frame_bytes=size,
        frames=frames,
    )


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def fit(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(per incoming stream, per extra viewer): CPU % with no viewer, and the least-squares
    slope of CPU % against the number of viewers."""
    by_count = {r["viewers"]: r["cpu_percent"] for r in rows}
    if len(by_count) < 2:
        return by_count.get(0, 0.0), 0.0
    slope, intercept = statistics.linear_regression(list(by_count), list(by_count.values()))
    return by_count.get(0, intercept), slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--seconds", type=float, help="measuring window per step")
    parser.add_argument(
        "--windows",
        type=int,
        default=3,
        help="consecutive windows per step; the step's CPU is their median (default 3)",
    )
    parser.add_argument("--viewers", help="viewer counts, e.g. 0,1,2,4,8")
    parser.add_argument("--size", default="640x480", help="publisher's frame size, WxH")
    parser.add_argument(
        "--send-path",
        choices=SEND_PATHS,
        default="direct",
        help="the relay's send path per viewer (direct: frames sent as they are complete, "
        "frame: by each viewer's sender task, stock: aiortc's own RTP loop)",
    )
    parser.add_argument(
        "--receive-path",
        choices=["drain", "direct", "stock"],
        default="drain",
        help="the publisher's packets: handled as read, the socket drained in one callback "
        "(drain), handled as read one per turn of the loop (direct), or via aiortc's queue "
        "and DTLS task (stock)",
    )
    parser.add_argument(
        "--forwarding-only", action="store_true", help="no MediaRelay baseline, no latency"
    )
    parser.add_argument(
        "--send-path-ab",
        type=int,
        metavar="RUNS",
        help="only the send path's CPU per frame, stock against frame, RUNS times each",
    )
    parser.add_argument(
        "--serve", choices=["forwarding", "mediarelay", "viewers"], help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve == "viewers":
        asyncio.run(serve_viewers())
        return
    if args.serve:
        asyncio.run(RelayServer(args.serve).serve())
        return
    if args.send_path_ab:
        send_path_ab(args.send_path_ab, viewers=4, frames=1500, size=6000)
        return
    global WIDTH, HEIGHT
    WIDTH, HEIGHT = (int(n) for n in args.size.lower().split("x"))
    os.environ[SEND_PATH_ENV] = args.send_path
    os.environ[RECEIVE_PATH_ENV] = args.receive_path
    seconds = args.seconds or (4.0 if args.quick else 10.0)
    default = "0,1,2,4" if args.quick else "0,1,2,4,8,16"
    counts = [int(n) for n in (args.viewers or default).split(",")]
    windows = 1 if args.quick else max(1, args.windows)
    forwarding = asyncio.run(measure_mode("forwarding", counts, seconds, windows))
    baseline_counts = [] if args.forwarding_only else [n for n in counts if n <= 4]
    baseline = (
        asyncio.run(measure_mode("mediarelay", baseline_counts, seconds, windows))
        if baseline_counts
        else []
    )
    stream, per_viewer = fit(forwarding)
    base_stream, base_per_viewer = fit(baseline)
    measured = {r["viewers"] for r in forwarding}
    at4 = {r["viewers"]: r for r in forwarding}.get(4)
    base_at4 = {r["viewers"]: r for r in baseline}.get(4)
    common = {
        "resolution": f"{WIDTH}x{HEIGHT}@30",
        "cores": os.cpu_count(),
        "window_s": seconds,
        "send_path": args.send_path,
        "receive_path": args.receive_path,
        "windows_per_step": windows,
    }
    if 0 in measured:  # the cost of a stream is read with no viewer
        emit(
            "video_relay_cpu_per_incoming_stream",
            stream,
            "% of a core",
            baseline=round(base_stream, 2),
            baseline_is="aiortc MediaRelay (decode + re-encode per viewer), same run",
            ratio=round(stream / base_stream, 3) if base_stream else None,
            goal="<= 6 %",
            met=stream <= 6,
            **common,
        )
    if len(measured) >= 2:  # a slope needs two viewer counts
        emit(
            "video_relay_cpu_per_extra_viewer",
            per_viewer,
            "% of a core",
            baseline=round(base_per_viewer, 2),
            baseline_is="aiortc MediaRelay, same run",
            ratio=round(per_viewer / base_per_viewer, 3) if base_per_viewer else None,
            **common,
        )
    if at4 and base_at4:
        ratio = at4["cpu_percent"] / base_at4["cpu_percent"]
        emit(
            "video_relay_cpu_at_4_viewers",
            at4["cpu_percent"],
            "% of a core",
            fps_min=at4.get("fps_min"),
            baseline=base_at4["cpu_percent"],
            baseline_fps_min=base_at4.get("fps_min"),
            baseline_is="aiortc MediaRelay, same run",
            ratio=round(ratio, 3),
            goal="<= 1/10 of MediaRelay",
            met=ratio <= 0.1,
            **common,
        )
    at16 = {r["viewers"]: r for r in forwarding}.get(16)
    if at16:
        ok = at16.get("fps_min", 0) >= 29.5 and at16["cpu_percent"] <= 25
        emit(
            "video_relay_16_viewers",
            at16["cpu_percent"],
            "% of a core",
            fps_min=at16.get("fps_min"),
            goal="every viewer >= 29.5 fps, relay <= 25 % of a core",
            met=ok,
            **common,
        )
    if args.forwarding_only:
        emit("video_relay_steps", len(forwarding), "runs", forwarding=forwarding, mediarelay=[])
        return
    frames = 150 if args.quick else 450
    direct = asyncio.run(measure_latency(through_relay=False, frames=frames))
    direct_p50, direct_p95 = statistics.median(direct), p95(direct)
    sys.stderr.write(
        f"latency made → decoded, 320x240: direct p50 {direct_p50:.1f} ms p95 {direct_p95:.1f}\n"
    )
    latency_rows = []
    for count in (1, 4) if args.quick else (1, 4, 8):
        relayed = asyncio.run(measure_latency(through_relay=True, frames=frames, viewers=count))
        relayed_p50, relayed_p95 = statistics.median(relayed), p95(relayed)
        sys.stderr.write(
            f"  through the relay, {count} viewer(s): p50 {relayed_p50:.1f} p95 {relayed_p95:.1f}\n"
        )
        latency_rows.append(
            {
                "viewers": count,
                "added_p95_ms": round(relayed_p95 - direct_p95, 1),
                "added_p50_ms": round(relayed_p50 - direct_p50, 1),
                "relayed_p95_ms": round(relayed_p95, 1),
                "frames": len(relayed),
            }
        )
    worst = max(latency_rows, key=lambda row: row["added_p95_ms"])
    emit(
        "video_relay_added_latency_p95",
        worst["added_p95_ms"],
        "ms",
        at_viewers=worst["viewers"],
        by_viewers=latency_rows,
        baseline=round(direct_p95, 1),
        baseline_is="direct peer-to-peer, same run (p95 made → decoded)",
        resolution="320x240@30; the measuring viewer decodes, the others count frames",
        goal=f"p95 added <= 15 ms up to {latency_rows[-1]['viewers']} viewers (the worst shown)",
        met=worst["added_p95_ms"] <= 15,
    )
    emit("video_relay_steps", len(forwarding), "runs", forwarding=forwarding, mediarelay=baseline)


if __name__ == "__main__":
    main()
