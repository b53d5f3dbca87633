"""Pages rendered by a synchronous Jinja environment.

Quart's environment is created with ``enable_async=True``: every chunk a template outputs
goes through an async generator and every call through ``auto_await``. On the nurse
dashboard (a 37 KiB page, about 1,700 chunks) that was ~17 ms of a ~25 ms request, most of
the one web process's time under load (``bench/web.py``, docs/benchmarks.md). Our templates
call nothing asynchronous — the context processors, which may be, are awaited before
rendering — so pages are rendered by a synchronous *overlay* of the app's environment: the
same loader, filters, globals, autoescaping and template context, and a compiled-template
cache of its own. Quart's ``before_render_template`` / ``template_rendered`` signals are not
sent (nothing here listens to them).

Use ``from web.templating import render_template`` in the blueprints, never Quart's.
"""

from __future__ import annotations

from typing import Any

import jinja2
from quart import Quart, current_app

_KEY = "telehealth.sync_jinja"


def sync_environment(app: Quart) -> jinja2.Environment:
    """The app's Jinja environment as a synchronous overlay (made once per app)."""
    environment = app.extensions.get(_KEY)
    if environment is None:
        environment = app.jinja_env.overlay(enable_async=False)
        app.extensions[_KEY] = environment
    assert isinstance(environment, jinja2.Environment)
    return environment


async def render_template(
    template_name_or_list: str | jinja2.Template | list[str | jinja2.Template], **context: Any
) -> str:
    """Quart's ``render_template``, rendered synchronously (see the module's docstring)."""
    app: Quart = current_app._get_current_object()  # type: ignore[attr-defined]
    await app.update_template_context(context)
    template = sync_environment(app).get_or_select_template(template_name_or_list)
    return template.render(context)
