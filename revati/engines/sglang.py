"""'sglang': SGLang's own offline `Engine` (tokenizer manager, scheduler with radix cache, detokenizer).

SGLang builds its model itself, in its scheduler process, from a model directory: the adapter writes the
model's config.json to a temporary directory and starts `sglang.Engine` on it with `load_format="dummy"`
(random weights) and `skip_tokenizer_init=True` (requests carry token ids, outputs come back as ids). The
adapter is given the model's config rather than a built model (it is in `revati.engines.OWN_MODEL`).

Serving: one asyncio task per request on the engine's own event loop sleeps until t0 + arrival, then calls
`Engine.async_generate(input_ids=..., stream=True)` with `max_new_tokens` = output_tokens and
`ignore_eos`; each streamed chunk's arrival is the time of the tokens it adds (`completion_tokens` in its
meta_info is cumulative). Set-up before t0: engine start-up, then one warm-up request.

Options are SGLang's `ServerArgs` fields of the same name; None leaves SGLang's default. No observer
steps: the model runs in the scheduler process, which the caller's observer cannot see.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Callable, Sequence

from revati.engines.observer import Observer, serving_started
from revati.engines.prompts import prompt_ids
from revati.metrics import RequestResult
from revati.workloads import Request


def run(
    model,
    requests: Sequence[Request],
    *,
    observer: Observer | None = None,
    on_result: Callable[[RequestResult], None] | None = None,
    dtype: str = "bfloat16",
    attention_backend: str | None = None,
    sampling_backend: str | None = None,
    grammar_backend: str | None = None,
    disable_cuda_graph: bool | None = None,
    disable_custom_all_reduce: bool | None = None,
    disable_overlap_schedule: bool | None = None,
    disable_radix_cache: bool | None = None,
    sleep_on_idle: bool | None = None,
    mem_fraction_static: float | None = None,
    max_total_tokens: int | None = None,
    max_running_requests: int | None = None,
    chunked_prefill_size: int | None = None,
    schedule_policy: str | None = None,
    log_level: str = "error",
    seed: int = 0,
) -> list[RequestResult]:
    """Serve `requests` through `sglang.Engine` built from `model` (a config, or a model whose config is
    used); results in the order of `requests`."""
    try:
        import sglang
    except ImportError as e:
        raise ImportError(
            f"the sglang engine needs SGLang installed ({e.name} is missing): see `make sglang-venv`"
        ) from e
    config = getattr(model, "config", model)
    args = {
        "attention_backend": attention_backend,
        "sampling_backend": sampling_backend,
        "grammar_backend": grammar_backend,
        "disable_cuda_graph": disable_cuda_graph,
        "disable_custom_all_reduce": disable_custom_all_reduce,
        "disable_overlap_schedule": disable_overlap_schedule,
        "disable_radix_cache": disable_radix_cache,
        "sleep_on_idle": sleep_on_idle,
        "mem_fraction_static": mem_fraction_static,
        "max_total_tokens": max_total_tokens,
        "max_running_requests": max_running_requests,
        "chunked_prefill_size": chunked_prefill_size,
        "schedule_policy": schedule_policy,
    }
    args = {k: v for k, v in args.items() if v is not None}
    with tempfile.TemporaryDirectory(prefix="revati-sglang-model-") as model_dir:
        config.save_pretrained(model_dir)
        engine = sglang.Engine(
            model_path=model_dir,
            load_format="dummy",
            skip_tokenizer_init=True,
            dtype=dtype,
            random_seed=seed,
            skip_server_warmup=True,
            log_level=log_level,
            **args,
        )
        try:
            results = engine.loop.run_until_complete(_serve(engine, config, requests, observer, on_result))
        finally:
            engine.shutdown()
            _cancel_tasks(engine.loop)
            logging.getLogger("sglang").handlers.clear()
    return [results[r.request_id] for r in requests]


async def _serve(engine, config, requests, observer, on_result) -> dict[str, RequestResult]:
    warmup = Request("revati-warmup", 0.0, 8, 2)
    await _generate(engine, warmup, prompt_ids(warmup, config), time.perf_counter())
    t0 = time.perf_counter()
    serving_started(observer)
    done = await asyncio.gather(*(_send(engine, r, prompt_ids(r, config), t0, on_result) for r in requests))
    return {r.request_id: r for r in done}


async def _send(engine, request: Request, ids: list[int], t0: float, on_result) -> RequestResult:
    remaining = t0 + request.arrival - time.perf_counter()
    while remaining > 0:
        await asyncio.sleep(remaining)
        remaining = t0 + request.arrival - time.perf_counter()
    times = await _generate(engine, request, ids, t0)
    result = RequestResult(
        request.request_id, request.arrival, request.prompt_tokens, request.output_tokens, times
    )
    if on_result is not None:
        on_result(result)
    return result


async def _generate(engine, request: Request, ids: list[int], t0: float) -> list[float]:
    """Stream one request; the time (from t0) at which each of its tokens came back."""
    params = {"max_new_tokens": request.output_tokens, "ignore_eos": True, "temperature": 0.0}
    stream = await engine.async_generate(input_ids=ids, sampling_params=params, stream=True)
    times: list[float] = []
    async for chunk in stream:
        now = time.perf_counter() - t0
        total = chunk["meta_info"]["completion_tokens"]
        times.extend([now] * (total - len(times)))
    if len(times) != request.output_tokens:
        raise RuntimeError(
            f"sglang: request {request.request_id} produced {len(times)} tokens, "
            f"expected {request.output_tokens}"
        )
    return times


def _cancel_tasks(loop) -> None:
    """End the tasks the engine's front end left on the loop (its receive loop, watchdogs): left pending, they
    log 'Task was destroyed' at interpreter exit."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
