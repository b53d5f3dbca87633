"""Vendored browser libraries are exactly the files their README names (version, sha256)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from quart.testing import QuartClient

VENDOR = Path(__file__).resolve().parents[2] / "web" / "static" / "vendor"
# A README row: | `file` | `where it came from` | `sha256` |
_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*`[^`]+`\s*\|\s*`([0-9a-f]{64})`\s*\|$", re.MULTILINE)


def _listed(library: str) -> dict[str, str]:
    readme = (VENDOR / library / "README.md").read_text(encoding="utf-8")
    return dict(_ROW.findall(readme))


def test_uplot_readme_names_the_version_and_every_file() -> None:
    readme = (VENDOR / "uplot" / "README.md").read_text(encoding="utf-8")
    assert "1.6.32" in readme
    assert "uplot@1.6.32" in readme
    listed = _listed("uplot")
    assert set(listed) == {"uPlot.iife.min.js", "uPlot.min.css", "LICENSE"}
    on_disk = {p.name for p in (VENDOR / "uplot").iterdir()} - {"README.md"}
    assert on_disk == set(listed), "a vendored file is missing from the README, or vice versa"


@pytest.mark.parametrize("name", ["uPlot.iife.min.js", "uPlot.min.css", "LICENSE"])
def test_uplot_files_match_their_recorded_sha256(name: str) -> None:
    digest = hashlib.sha256((VENDOR / "uplot" / name).read_bytes()).hexdigest()
    assert digest == _listed("uplot")[name], f"{name} differs from the vendored release"


def test_uplot_is_mit_licensed() -> None:
    text = (VENDOR / "uplot" / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("The MIT License")


async def test_uplot_is_served_from_the_box(client: QuartClient) -> None:
    response = await client.get("/static/vendor/uplot/uPlot.iife.min.js")
    assert response.status_code == 200
    body = await response.get_data()
    assert hashlib.sha256(body).hexdigest() == _listed("uplot")["uPlot.iife.min.js"]
