"""The video panel's texts (web/video_messages.py): the same English table in ``video.js``,
a Spanish translation of every message in the kiosk's catalog, and no placeholder lost."""

from __future__ import annotations

import json
import re
from pathlib import Path

from babel.messages.pofile import read_po

from web.video_messages import ENGLISH

_WEB = Path(__file__).parents[2] / "web"
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _spanish_catalog() -> dict[str, str]:
    path = _WEB / "translations" / "es" / "LC_MESSAGES" / "kiosk.po"
    with path.open("rb") as source:
        catalog = read_po(source, locale="es", domain="kiosk")
    return {
        str(m.id): str(m.string)
        for m in catalog
        if m.id and m.string and not m.fuzzy and isinstance(m.string, str)
    }


def test_video_js_has_the_same_english_table() -> None:
    script = (_WEB / "static" / "video.js").read_text(encoding="utf-8")
    found = re.search(r"const ENGLISH = (\{.*?\n  \});", script, re.DOTALL)
    assert found is not None, "no ENGLISH table in video.js"
    assert json.loads(found.group(1)) == ENGLISH


def test_every_video_message_has_a_spanish_translation() -> None:
    spanish = _spanish_catalog()
    assert [text for text in ENGLISH.values() if text not in spanish] == []


def test_no_translation_lost_a_placeholder() -> None:
    spanish = _spanish_catalog()
    for text in ENGLISH.values():
        wanted = sorted(_PLACEHOLDER.findall(text))
        assert sorted(_PLACEHOLDER.findall(spanish.get(text, text))) == wanted, text
