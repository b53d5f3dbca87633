"""What transcoded viewers cost the relay: decode + re-encode against forwarding.

A publisher's stream (libav's ``testsrc2`` pattern, 640x480@30 unless ``--size``; encoded
beforehand, not timed, with aiortc's own encoder for the publisher's codec) is taken
frame by frame as the relay would: the baseline is forwarding (packetizing the frame once,
``services.video.forwarding.packetize``); the transcoded viewer is the shared decoder
(aiortc's decoder, ``services.video.transcode``'s path) plus one of aiortc's encoders for
the viewer's codec, as ``SharedEncoder`` runs it (encode, then the depayload and keyframe
test it adds). Two viewers transcoded to the same codec share that one encoder (the
per-viewer send path is not codec work: bench/video_relay.py); the figure they would cost
with one encoder each (the design before the shared encoder) is measured beside it, two
encoders each encoding every picture. CPU is this process's (``time.process_time``, all threads) over the
frames, as a percentage of one core for real-time video (frames / fps seconds). Codec
work only: no network, SRTP or event loop (bench/video_relay.py measures those).

    python bench/video_transcode.py [--seconds S] [--size 640x480] [--fps 30]

Prints JSON: per direction (VP8 → H.264, H.264 → VP8) the decode, encode and forwarding
figures, the ratio of transcoding to forwarding, and two viewers shared against one
encoder each.
"""

from __future__ import annotations

import argparse
import fractions
import json
import time
from collections.abc import Callable

import av
from aiortc.codecs import depayload, get_decoder, get_encoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from services.video.forwarding import is_keyframe, packetize

CODECS = {
    "video/VP8": RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=97),
    "video/H264": RTCRtpCodecParameters(
        mimeType="video/H264",
        clockRate=90000,
        payloadType=99,
        parameters={"packetization-mode": "1", "profile-level-id": "42e01f"},
    ),
}
TIME_BASE = fractions.Fraction(1, 90000)


def source(size: str, fps: int, frames: int) -> list[av.VideoFrame]:
    """``frames`` pictures of libav's moving test pattern."""
    container = av.open(f"testsrc2=size={size}:rate={fps}", format="lavfi")
    pictures = []
    for picture in container.decode(video=0):
        pictures.append(picture.reformat(format="yuv420p"))
        if len(pictures) == frames:
            break
    container.close()
    return pictures


def publish(mime: str, pictures: list[av.VideoFrame], fps: int) -> list[bytes]:
    """The publisher's frames, depayloaded as the relay's receiver holds them."""
    encoder, codec = get_encoder(CODECS[mime]), CODECS[mime]
    frames = []
    for index, picture in enumerate(pictures):
        picture.pts, picture.time_base = index * 90000 // fps, TIME_BASE
        payloads, _ = encoder.encode(picture)
        frames.append(b"".join(depayload(codec, payload) for payload in payloads))
    return frames


def cpu_percent(work: Callable[[], None], frames: int, fps: int) -> float:
    start = time.process_time()
    work()
    return round(100 * (time.process_time() - start) / (frames / fps), 2)


def direction(
    publisher: str, viewer: str, pictures: list[av.VideoFrame], fps: int
) -> dict[str, object]:
    frames = publish(publisher, pictures, fps)
    decoded: list[av.VideoFrame] = []

    def forward() -> None:
        for index, data in enumerate(frames):
            packetize(publisher, data, index)

    def decode() -> None:
        decoder = get_decoder(CODECS[publisher])
        for index, data in enumerate(frames):
            for picture in decoder.decode(JitterFrame(data=data, timestamp=index * 3000)):
                assert isinstance(picture, av.VideoFrame)
                picture.pts, picture.time_base = index * 90000 // fps, TIME_BASE
                decoded.append(picture)

    def encode() -> None:  # SharedEncoder._encode's work, once per picture
        codec = CODECS[viewer]
        encoder = get_encoder(codec)
        for picture in decoded:
            payloads, _ = encoder.encode(picture)
            is_keyframe(viewer, b"".join(depayload(codec, payload) for payload in payloads))

    def encode_each() -> None:  # before: one encoder per transcoded viewer, two viewers
        encoders = [get_encoder(CODECS[viewer]) for _ in range(2)]
        for picture in decoded:
            for encoder in encoders:
                encoder.encode(picture)

    forwarding = cpu_percent(forward, len(frames), fps)
    decoding = cpu_percent(decode, len(frames), fps)
    encoding = cpu_percent(encode, len(frames), fps)
    encoding_each = cpu_percent(encode_each, len(frames), fps)
    return {
        "publisher": publisher,
        "viewer": viewer,
        "frames": len(frames),
        "decoded": len(decoded),
        "forwarding_cpu_percent": forwarding,
        "decode_cpu_percent": decoding,
        "encode_cpu_percent": encoding,
        "transcoded_viewer_cpu_percent": round(decoding + encoding, 2),
        "ratio_to_forwarding": round((decoding + encoding) / max(forwarding, 0.01), 1),
        "two_viewers_shared_encoder_cpu_percent": round(decoding + encoding, 2),
        "two_viewers_encoder_each_cpu_percent": round(decoding + encoding_each, 2),
        "shared_to_encoder_each_ratio": round(
            (decoding + encoding) / max(decoding + encoding_each, 0.01), 2
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--fps", type=int, default=30)
    args = parser.parse_args()
    pictures = source(args.size, args.fps, int(args.seconds * args.fps))
    results = [
        direction("video/VP8", "video/H264", pictures, args.fps),
        direction("video/H264", "video/VP8", pictures, args.fps),
    ]
    print(json.dumps({"size": args.size, "fps": args.fps, "results": results}, indent=2))


if __name__ == "__main__":
    main()
