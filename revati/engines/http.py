"""The load generator's side of engines served over HTTP in-process (hf-serve, sglang-serve, vllm-serve): the
server's socket on loopback, its uvicorn server run beside the load generator, and the server-sent events of a
streaming POST."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator


def loopback_socket() -> socket.socket:
    """A listening address on 127.0.0.1, bound to a free port and held from now on (no race with others).

    Made with its protocol named, as asyncio makes the sockets of a server it binds itself: asyncio turns
    Nagle's algorithm off (TCP_NODELAY) only on connections whose protocol is IPPROTO_TCP, and with it on, a
    small SSE write waited for the client's delayed ACK (~40 ms of real time): the load generator then read
    a token late or two tokens in one go, and a `deterministic` run's token times depended on it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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


@contextlib.asynccontextmanager
async def served(app, sock: socket.socket, engine: str):
    """Serve the ASGI `app` with uvicorn on `sock`, as a task on the running loop; yields an httpx client
    for it once it accepts connections, and stops the server on leaving."""
    import httpx
    import uvicorn

    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await started(server, serving, engine)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=None, limits=limits
        ) as client:
            yield client
    finally:
        server.should_exit = True
        await asyncio.gather(serving, return_exceptions=True)


async def events(client, path: str, body: dict, what: str) -> AsyncIterator[tuple[float, dict]]:
    """POST `body` to `path` with the httpx `client`, streaming: (time.perf_counter() at its arrival, event)
    for each server-sent `data:` event. `what` names the request in errors."""
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"{what} got HTTP {response.status_code}: {detail}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                raise RuntimeError(f"{what} failed in the server: {event['error']}")
            yield now, event
