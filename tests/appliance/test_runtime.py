"""How a process's exit tells systemd (and the supervisor) whether a restart can help.

Each case runs ``runtime.main_entry`` in a child process, as systemd starts it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance import runtime
from appliance.keys import generate_kek_file
from appliance.supervisor import EX_CONFIG

_CHILD = """
import sys
from appliance import runtime
from appliance.errors import ConfigError, StoreError, TamperedDataError

ERRORS = {
    "store": StoreError("database: the disk is full or failing"),
    "tampered": TamperedDataError("resources row 7: ciphertext failed authentication"),
    "config": ConfigError(["sync.upstream: base_url is required"]),
}

async def main(ctx):
    print("running", ctx.name, flush=True)
    raise ERRORS[sys.argv[2]]

sys.exit(runtime.main_entry("sync", main, ["--demo", sys.argv[1]]))
"""


def _run(data_dir: Path, error: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CHILD, str(data_dir), error],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )


@pytest.mark.parametrize(
    ("error", "code", "words"),
    [
        # A full disk heals once space is freed: restarted (before: 78, stopped for good).
        ("store", runtime.EX_TEMPFAIL, "the disk is full"),
        ("tampered", runtime.EX_TEMPFAIL, "failed authentication"),
        # The configuration is wrong: a restart cannot help.
        ("config", EX_CONFIG, "base_url is required"),
    ],
)
def test_exit_code_says_whether_a_restart_can_help(
    tmp_path: Path, error: str, code: int, words: str
) -> None:
    data = tmp_path / "data"
    (data / "keys").mkdir(parents=True)
    generate_kek_file(data / "keys" / "kek")
    done = _run(data, error)
    assert done.stdout.splitlines() == ["running sync"]  # raised while running
    assert done.returncode == code, done.stderr
    assert words in done.stderr
    assert runtime.EX_CONFIG == EX_CONFIG


def test_a_data_directory_that_cannot_be_opened_at_start_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    done = _run(tmp_path / "no-such-dir", "store")
    assert done.stdout == ""  # the process never ran
    assert done.returncode == EX_CONFIG
    assert "cannot open the database" in done.stderr
