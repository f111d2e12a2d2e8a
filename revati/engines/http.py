"""The load generator's side of engines served over HTTP in-process (hf-serve, sglang-serve): the server's
socket on loopback, and waiting for uvicorn to start."""

from __future__ import annotations

import asyncio
import socket


def loopback_socket() -> socket.socket:
    """A listening address on 127.0.0.1, bound to a free port and held from now on (no race with others)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def started(server, serving: asyncio.Task, engine: str) -> None:
    """Wait until the uvicorn `server` run by the task `serving` accepts connections."""
    while not server.started:
        if serving.done():
            serving.result()  # raises what stopped it
            raise RuntimeError(f"{engine}: the server exited before it started")
        await asyncio.sleep(0.01)
