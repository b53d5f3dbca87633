"""The web process: the Quart app served by Hypercorn (HTTPS when the site has a certificate)."""

from __future__ import annotations

import logging
import sys

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

from appliance import runtime, sdnotify
from appliance.runtime import ProcessContext
from services.video.signalling import MAX_MESSAGE_BYTES
from web.app import create_app

logger = logging.getLogger(__name__)


async def main(ctx: ProcessContext) -> None:
    """Entry of the web process."""
    web = ctx.config.web
    app = create_app(ctx.config, ctx.store)
    hyper = HypercornConfig()
    hyper.bind = [f"{web.host}:{web.port}"]
    hyper.accesslog = None  # URLs can carry identifiers; no access log (audit is in the store)
    hyper.errorlog = logging.getLogger("hypercorn.error")
    # A signalling message is at most 64 KiB (services/video/signalling.py); Hypercorn would
    # otherwise buffer up to 16 MiB of one before the route could refuse it.
    hyper.websocket_max_message_size = MAX_MESSAGE_BYTES
    if web.tls_cert is not None and web.tls_key is not None:
        hyper.certfile = str(web.tls_cert)
        hyper.keyfile = str(web.tls_key)
    ctx.set_status(url=web.public_url)

    async def shutdown_trigger() -> None:
        await ctx.stopping.wait()

    sdnotify.ready()
    await serve(app, hyper, shutdown_trigger=shutdown_trigger)


if __name__ == "__main__":
    sys.exit(runtime.main_entry("web", main))
