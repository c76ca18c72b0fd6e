"""``imgpipe serve``: uvicorn on IMGPIPE_API_ADDRESS:IMGPIPE_API_PORT."""

from __future__ import annotations

import logging

from imgpipe.settings import Settings

__all__ = ["serve"]

GRACEFUL_SHUTDOWN_S = 5
"""On SIGTERM, open requests get this long; event streams are then closed (a client
reconnects and gets the current state at once)."""


def serve(settings: Settings, *, log_level: str = "info") -> None:
    import uvicorn

    from imgpipe.face.web.app import create_app

    logging.basicConfig(
        level=log_level.upper(), format="[%(asctime)s: %(levelname)s/api] %(message)s"
    )
    config = uvicorn.Config(
        create_app(settings),
        host=settings.api_address,
        port=settings.api_port,
        log_level=log_level,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    uvicorn.Server(config).run()
