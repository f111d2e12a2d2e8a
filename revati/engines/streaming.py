"""Serving a workload through an engine's asynchronous streaming API (SGLang's, vLLM's): one task per
request sleeps until t0 + its arrival, then streams it; each token's time is when it came back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from revati.engines.observer import Observer, serving_started
from revati.engines.prompts import prompt_ids
from revati.metrics import RequestResult
from revati.workloads import Request

# (request, its prompt token ids, t0) -> the time (from t0) at which each of its tokens came back
Generate = Callable[[Request, list[int], float], Awaitable[list[float]]]


async def serve_streams(
    generate: Generate,
    config,
    requests: Sequence[Request],
    observer: Observer | None,
    on_result: Callable[[RequestResult], None] | None,
) -> dict[str, RequestResult]:
    """A warm-up request, then t0, then each request sent at t0 + its arrival through `generate`."""
    warmup = Request("revati-warmup", 0.0, 8, 2)
    await generate(warmup, prompt_ids(warmup, config), time.perf_counter())
    t0 = time.perf_counter()
    serving_started(observer)
    done = await asyncio.gather(*(_send(generate, r, prompt_ids(r, config), t0, on_result) for r in requests))
    return {r.request_id: r for r in done}


async def _send(generate: Generate, request: Request, ids: list[int], t0: float, on_result) -> RequestResult:
    remaining = t0 + request.arrival - time.perf_counter()
    while remaining > 0:
        await asyncio.sleep(remaining)
        remaining = t0 + request.arrival - time.perf_counter()
    times = await generate(request, ids, t0)
    result = RequestResult(
        request.request_id, request.arrival, request.prompt_tokens, request.output_tokens, times
    )
    if on_result is not None:
        on_result(result)
    return result


def checked(engine: str, request: Request, times: list[float]) -> list[float]:
    """`times`, after checking that the engine produced the workload's output length."""
    if len(times) != request.output_tokens:
        raise RuntimeError(
            f"{engine}: request {request.request_id} produced {len(times)} tokens, "
            f"expected {request.output_tokens}"
        )
    return times
