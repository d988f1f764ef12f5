"""``specdec-local serve``: an OpenAI-compatible HTTP server (needs ``pip install 'specdec[serve]'``)."""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from typing import Any

import click

from ..errors import SpecdecError
from ..models import DEFAULT_MODEL
from .common import load_generator, model_options, prefix_cache_option, quiet_libraries, report_errors, target_options

_LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only listens on this machine."""
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@click.command()
@target_options
@model_options
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; anything but loopback needs --api-key.",
)
@click.option("--port", type=click.IntRange(min=1, max=65535), default=8000, show_default=True)
@click.option(
    "--api-key",
    envvar="SPECDEC_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' on /v1 (also read from $SPECDEC_API_KEY).",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="Requests that may wait while one generates; one more gets 429.",
)
@prefix_cache_option
@click.option(
    "--fit-context",
    is_flag=True,
    help="When a chat outgrows the context, drop its oldest exchanges (a quarter of the context at once, the "
    "cut kept from request to request so the KV cache is reused) instead of answering 400.",
)
@click.option(
    "--allow-origin",
    "allow_origins",
    multiple=True,
    metavar="ORIGIN",
    help="Let web pages from ORIGIN (e.g. http://localhost:3000; repeatable) call the API from a browser "
    "(CORS). '*' lets every site you visit use the model.",
)
@click.option(
    "--model-name", default=None, help="The model id clients send and /v1/models lists [default: --target as given]."
)
@report_errors
def serve(
    host: str,
    port: int,
    api_key: str | None,
    max_queue: int,
    fit_context: bool,
    model_name: str | None,
    allow_origins: tuple[str, ...],
    **kwargs: Any,
) -> None:
    """Serve one model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models).

    Generations run one at a time, in arrival order; the output is the target's own (lossless).
    Ctrl-C or SIGTERM stops taking requests, ends the running generation and exits.
    """
    from ..server import require_extra

    require_extra()
    host = host.strip("[]")  # an IPv6 address as URLs write it: [::1]
    api_key = api_key or None  # an empty key (SPECDEC_API_KEY= in a shell) is no key, on every host
    if not is_loopback(host) and not api_key:
        raise SpecdecError(
            f"--host {host} would expose the model to the network without a key",
            "add --api-key KEY (or set SPECDEC_API_KEY), or keep the default --host 127.0.0.1",
        )
    sockets = listen(host, port)  # before the model loads (seconds to minutes), so no one takes the port meanwhile
    _log_to_stderr()
    quiet_libraries()
    target = kwargs["target"]
    gen = load_generator(kwargs)
    chosen = getattr(gen, "selection", None)
    model_id = model_name or target or (chosen.target_ref if chosen is not None else DEFAULT_MODEL)

    from ..server import serve as run
    from ..server.app import ServerConfig

    display = f"[{host}]" if ":" in host else host
    config = ServerConfig(
        model_id=model_id,
        api_key=api_key,
        max_queue=max_queue,
        fit_context=fit_context,
        url=f"http://{display}:{port}",
        allow_origins=allow_origins,
    )
    try:
        run(gen, config, sockets)
    except KeyboardInterrupt:  # uvicorn hands Ctrl-C back once it has shut down cleanly
        pass


def listen(host: str, port: int) -> list[socket.socket]:
    """Sockets listening on every address of ``host`` at ``port`` (connections wait in the backlog until the
    server runs); a :class:`SpecdecError` when that cannot be done (unknown name, port in use)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SpecdecError(
            f"--host {host}: not an address of this machine ({e.strerror})", "use e.g. 127.0.0.1 or 0.0.0.0"
        ) from None
    addresses = list(dict.fromkeys(found))  # getaddrinfo may name one address twice
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in addresses:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            if family == socket.AF_INET6 and len(addresses) > 1:  # "localhost": ::1 beside 127.0.0.1
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise SpecdecError(
            f"cannot listen on {host}:{port}: {e.strerror}",
            "choose another --port, or stop the program that listens there",
        ) from None
    return sockets


BACKLOG = 2048
"""Connections that may wait to be accepted (uvicorn's default)."""


def _log_to_stderr() -> None:
    """One line per request on stderr, with a timestamp."""
    logger = logging.getLogger("specdec.server")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


commands = [serve]
