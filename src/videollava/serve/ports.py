"""A server's address, claimed before its model loads: a busy port or a host that is not this
machine's is then one line at once, and nothing has yet claimed that the server is up."""

from __future__ import annotations

import argparse
import socket

from videollava.arguments import port_number
from videollava.errors import VideoLlavaError


def add_address_options(parser: argparse.ArgumentParser, default_port: int) -> None:
    """`--host` (this machine only by default) and `--port`."""
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=port_number, default=default_port)


def claim_port(host: str, port: int, busy: str, backlog: int | None = None) -> socket.socket:
    """A TCP socket bound to host:port, listening when a `backlog` is given.

    Bound as uvicorn binds (SO_REUSEADDR): a port left in TIME_WAIT by an earlier server is free, a
    listening one is not. `busy` is the error when the address is taken, a format string given the
    `address` and the system's `reason`, so each command keeps its own wording.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as error:
        raise VideoLlavaError(f"--host {host!r}: not an address of this machine ({error})") from None
    claimed = socket.socket(family, kind, proto)
    claimed.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        claimed.bind(address)
        if backlog is not None:
            claimed.listen(backlog)
    except OSError as error:
        claimed.close()
        reason = error.strerror or str(error)
        raise VideoLlavaError(busy.format(address=f"{host}:{port}", reason=reason)) from None
    return claimed
