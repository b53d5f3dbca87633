"""The ``[video]`` keys of the site configuration: the WAN leg's budget and ICE servers."""

from __future__ import annotations

from pathlib import Path

from appliance.config import IceServerConfig, VideoConfig, load, parse
from tests.appliance.test_config import DOCS, MINIMAL, doc, problems_of


def test_video_defaults_without_a_video_table() -> None:
    config = parse(MINIMAL, environ={})
    assert config.video == VideoConfig(
        uplink_kbps=2500, audio_only_kbps=150, transcode_encoders=1, ice_servers=()
    )


def test_the_example_sets_the_wan_budget() -> None:
    config = load(DOCS / "site.example.toml", environ={})
    assert (config.video.uplink_kbps, config.video.audio_only_kbps) == (2500, 150)
    assert [c.name for c in config.exam_cameras] == ["otoscope"]


def test_video_keys_and_ice_servers_are_read() -> None:
    data = doc(
        video={
            "uplink_kbps": 800,
            "audio_only_kbps": 120,
            "transcode_encoders": 0,
            "ice_server": [
                {"urls": ["stun:stun.example.test:3478"]},
                {
                    "urls": ["turn:turn.example.test:3478?transport=udp"],
                    "username": "clinic",
                    "credential_file": "turn-credential",
                },
            ],
        }
    )
    config = parse(data, base_dir=Path("/etc/appliance"), environ={})
    assert config.video == VideoConfig(
        uplink_kbps=800,
        audio_only_kbps=120,
        transcode_encoders=0,
        ice_servers=(
            IceServerConfig(urls=("stun:stun.example.test:3478",)),
            IceServerConfig(
                urls=("turn:turn.example.test:3478?transport=udp",),
                username="clinic",
                credential_file=Path("/etc/appliance/turn-credential"),
            ),
        ),
    )


def test_every_video_mistake_is_reported_at_once() -> None:
    data = doc(
        video={
            "uplink_kbps": 0,
            "audio_only_kbps": "lots",
            "typo": 1,
            "ice_server": [
                {"urls": ["http://stun.example.test"]},
                {"urls": ["turns:turn.example.test:5349"]},
            ],
        }
    )
    problems = problems_of(data)
    paths = {problem.split(": ", 1)[0] for problem in problems}
    assert paths == {
        "video.uplink_kbps",
        "video.audio_only_kbps",
        "video.typo",
        "video.ice_server[0].urls",
        "video.ice_server[1].username",
        "video.ice_server[1].credential_file",
    }
    assert problems_of(doc(video={"ice_server": {"urls": []}})) == [
        "video.ice_server: expected an array of tables ([[video.ice_server]])"
    ]


def test_a_turn_server_with_a_shared_secret_needs_no_static_account() -> None:
    data = doc(
        video={
            "ice_server": [
                {"urls": ["turns:turn.example.test:5349"], "secret_file": "turn-secret"},
                {
                    "urls": ["turn:turn.example.test:3478"],
                    "secret_file": "turn-secret",
                    "credential_ttl_s": 3600,
                },
            ]
        }
    )
    config = parse(data, base_dir=Path("/etc/appliance"), environ={})
    assert [(s.secret_file, s.credential_ttl_s, s.username) for s in config.video.ice_servers] == [
        (Path("/etc/appliance/turn-secret"), 14_400, None),
        (Path("/etc/appliance/turn-secret"), 3600, None),
    ]


def test_a_shared_secret_and_a_static_account_together_are_refused() -> None:
    data = doc(
        video={
            "ice_server": [
                {
                    "urls": ["turn:turn.example.test:3478"],
                    "secret_file": "turn-secret",
                    "username": "clinic",
                    "credential_file": "turn-credential",
                },
                {
                    "urls": ["turn:turn.example.test:3478"],
                    "secret_file": "s",
                    "credential_ttl_s": 5,
                },
            ]
        }
    )
    problems = problems_of(data)
    assert {p.split(": ", 1)[0] for p in problems} == {
        "video.ice_server[0].secret_file",
        "video.ice_server[1].credential_ttl_s",
    }
    assert any("not both" in p for p in problems)
