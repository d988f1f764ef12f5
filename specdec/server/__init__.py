"""``specdec-local serve``: an OpenAI-compatible HTTP server over one loaded model.

Built on Starlette (routing, requests, streaming responses) and uvicorn (the
HTTP server), both from the ``serve`` extra: ``pip install 'specdec[serve]'``.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from ..errors import MissingExtraError

if TYPE_CHECKING:
    import socket

    from ..engine import SpeculativeGenerator
    from .app import ServerConfig

EXTRA_PACKAGES = ("starlette", "uvicorn")


def require_extra() -> None:
    """Raise :class:`MissingExtraError` naming the ``serve`` extra when its packages are missing."""
    for package in EXTRA_PACKAGES:
        if importlib.util.find_spec(package) is None:
            raise MissingExtraError("serve", package, "specdec-local serve")


def serve(generator: SpeculativeGenerator, config: ServerConfig, sockets: list[socket.socket]) -> None:
    """Serve on ``sockets`` (bound and listening) until Ctrl-C or SIGTERM: then no new request is taken, the
    running generation ends after its step, waiting requests get 503, and the worker thread is joined before
    this returns."""
    import uvicorn

    from .app import begin_shutdown, create_app

    app = create_app(generator, config)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:  # noqa: ANN001 - uvicorn's signature
            begin_shutdown(app)  # before uvicorn waits for open streams to finish
            await super().shutdown(sockets=sockets)

    server = Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=10,
        )
    )
    server.run(sockets=sockets)
