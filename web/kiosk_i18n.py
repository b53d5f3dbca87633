"""The kiosk's languages: gettext catalogs (Babel ``.po`` files under ``web/translations/``).

English is the source language (the message ids). Each other language is a
``web/translations/<lang>/LC_MESSAGES/kiosk.po`` catalog, compiled to a ``.mo`` in memory
when the app starts, so the repository holds no build product that could go stale. Update a
catalog after changing texts with::

    pybabel extract -F web/translations/babel.cfg -o /tmp/kiosk.pot web/kiosk.py \\
        web/video_messages.py web/templates services/intake.py
    pybabel update -i /tmp/kiosk.pot -d web/translations -D kiosk
"""

from __future__ import annotations

import gettext
import io
from pathlib import Path

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import Translations

DOMAIN = "kiosk"
DEFAULT_LANGUAGE = "en"
# (code, the language's name in itself): what the switch on every kiosk page offers.
LANGUAGES: tuple[tuple[str, str], ...] = (("en", "English"), ("es", "Español"))
_FOLDER = Path(__file__).parent / "translations"


def load_catalogs(folder: Path = _FOLDER) -> dict[str, gettext.NullTranslations]:
    """Every kiosk language's translations; English is the identity."""
    catalogs: dict[str, gettext.NullTranslations] = {DEFAULT_LANGUAGE: gettext.NullTranslations()}
    for code, _name in LANGUAGES:
        if code == DEFAULT_LANGUAGE:
            continue
        path = folder / code / "LC_MESSAGES" / f"{DOMAIN}.po"
        with path.open("rb") as source:
            catalog = read_po(source, locale=code, domain=DOMAIN)
        compiled = io.BytesIO()
        write_mo(compiled, catalog)
        compiled.seek(0)
        catalogs[code] = Translations(compiled, domain=DOMAIN)
    return catalogs


def language_or_default(code: str | None) -> str:
    """``code`` when the kiosk offers it, else English."""
    return code if code in dict(LANGUAGES) else DEFAULT_LANGUAGE
