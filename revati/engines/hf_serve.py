"""'hf-serve': `transformers serve --continuous-batching` in-process, with a load generator speaking HTTP.

The server is transformers' OpenAI-compatible FastAPI app; the load generator talks to it over loopback.

One asyncio loop in the calling thread (`asyncio.run`) drives both: uvicorn's `Server.serve()` runs as a task
on it (a `Serve` subclass whose `start_server()` starts no thread of its own), and the load generator is one
task per request that sleeps until t0 + arrival (`asyncio.sleep`), POSTs a streaming `/v1/completions` request
with httpx and takes each SSE event's arrival as one token's time. The server's continuous-batching worker
thread calls the model.

Handing it our in-memory model: `Serve` loads models by hub id through its `ModelManager`; we put the model,
with a tokenizer, into that manager's cache of loaded models (`loaded_models[<id>@main] = TimedModel(...)`)
under a made-up id, so requests naming that id find it loaded. The tokenizer is built locally (no hub): a
`tokenizers` WordLevel vocabulary 't0' … 't<V-1>' split on whitespace, so the prompt text 't17 t5 …' is
exactly our prompt ids and every generated token decodes to one non-empty SSE event. EOS is ignored through
the server's own `generation_config` request field (`{"eos_token_id": null}`: the engine then disables EOS);
`max_tokens` = output_tokens.

Set-up before t0: server start-up, then one warm-up request, which makes the server create its
continuous-batching manager (paged cache, IO buffers, worker thread) the way its first request always does.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from revati.engines.hf_cb import attention, cache_size, observe_steps
from revati.engines.http import events, loopback_socket, started
from revati.engines.observer import Observer, serving_started
from revati.engines.prompts import prompt_ids
from revati.metrics import RequestResult
from revati.workloads import Request

MODEL_ID = "revati/model"


def run(
    model: PreTrainedModel,
    requests: Sequence[Request],
    *,
    observer: Observer | None = None,
    on_result: Callable[[RequestResult], None] | None = None,
    attn_implementation: str | None = "sdpa",
    page_size: int | None = None,
    num_blocks: int | None = None,
    max_batch_tokens: int | None = None,
    max_memory_percent: float | None = None,
    use_cuda_graph: bool | None = None,
    do_sample: bool = False,
    seed: int | None = 0,
    size_for_workload: bool | None = None,
) -> list[RequestResult]:
    """Serve `requests` through an in-process `transformers serve`; results in the order of `requests`.

    Options map to the server's flags: attn_implementation (--attn-implementation; applied to our model as
    loading would; the server may still switch to flash attention where it is installed, as `transformers
    serve` does), page_size (--cb-block-size), num_blocks (--cb-num-blocks), max_batch_tokens
    (--cb-max-batch-tokens), max_memory_percent (--cb-max-memory-percent), use_cuda_graph
    (--cb-use-cuda-graph), seed (--default-seed); do_sample goes in each request's generation_config. On a CPU
    model (or with size_for_workload), unset num_blocks / max_batch_tokens are sized from the workload (see
    hf_cb.cache_size).
    """
    try:
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
        from transformers.cli.serve import Serve  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"hf-serve needs the serving extras ({e.name} is missing): pip install 'revati[serve]'"
        ) from e
    requests = list(requests)
    num_blocks, max_batch_tokens = cache_size(
        model, requests, page_size or 256, num_blocks, max_batch_tokens, size_for_workload
    )
    flags = {
        "cb_block_size": page_size,
        "cb_num_blocks": num_blocks,
        "cb_max_batch_tokens": max_batch_tokens,
        "cb_max_memory_percent": max_memory_percent,
        "cb_use_cuda_graph": use_cuda_graph,
        "default_seed": seed,
    }
    verbosity = hf_logging.get_verbosity()  # Serve sets the transformers log level globally
    try:
        with attention(model, attn_implementation):
            results = asyncio.run(_serve(model, requests, flags, do_sample, observer, on_result))
    finally:
        hf_logging.set_verbosity(verbosity)
    return [results[r.request_id] for r in requests]


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer whose token i is the word 't<i>': 't3 t9' encodes to [3, 9], no special tokens added."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def _server(flags: dict, port: int):
    """`transformers serve --continuous-batching` whose uvicorn server the caller runs on its own loop."""
    import uvicorn
    from transformers.cli.serve import Serve

    class InProcessServe(Serve):
        def start_server(self):
            self._thread = None  # kill_server() reads it; no thread: the caller awaits self.server.serve()
            config = self.server.config  # Serve logs every request at info level
            self.server = uvicorn.Server(
                uvicorn.Config(
                    config.app, host=config.host, port=config.port, log_level="warning", access_log=False
                )
            )

    return InProcessServe(
        continuous_batching=True, host="127.0.0.1", port=port, log_level="error", non_blocking=True, **flags
    )


async def _serve(model, requests, flags, do_sample, observer, on_result) -> dict[str, RequestResult]:
    import httpx
    from transformers.cli.serving.model_manager import TimedModel

    sock = loopback_socket()
    port = sock.getsockname()[1]
    serve = _server(flags, port)
    tokenizer = word_tokenizer(model.config.get_text_config().vocab_size)
    model_key = serve._model_manager.process_model_name(MODEL_ID)
    serve._model_manager.loaded_models[model_key] = TimedModel(model, timeout_seconds=-1, processor=tokenizer)
    serving = asyncio.create_task(serve.server.serve(sockets=[sock]))
    try:
        await started(serve.server, serving, "hf-serve")
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=None, limits=limits
        ) as client:
            warmup = Request("revati-warmup", 0.0, 8, 2)
            await _complete(client, warmup, prompt_ids(warmup, model.config), do_sample, time.perf_counter())
            # The warm-up made the server create its continuous-batching manager (kept in private state).
            manager = serve._generation_state.get_manager(model_key, use_cb=True)._cb
            with observe_steps(manager, model, observer):
                t0 = time.perf_counter()
                serving_started(observer)
                results = await asyncio.gather(
                    *(
                        _send(client, r, prompt_ids(r, model.config), do_sample, t0, on_result)
                        for r in requests
                    )
                )
    finally:
        serve.server.should_exit = True
        await asyncio.gather(serving, return_exceptions=True)
        serve.kill_server()  # stops the continuous-batching worker and unloads the model from the server
        sock.close()
    return {r.request_id: r for r in results}


async def _send(
    client, request: Request, ids: list[int], do_sample: bool, t0: float, on_result
) -> RequestResult:
    remaining = t0 + request.arrival - time.perf_counter()
    while remaining > 0:
        await asyncio.sleep(remaining)
        remaining = t0 + request.arrival - time.perf_counter()
    times = await _complete(client, request, ids, do_sample, t0)
    result = RequestResult(
        request.request_id, request.arrival, request.prompt_tokens, request.output_tokens, times
    )
    if on_result is not None:
        on_result(result)
    return result


async def _complete(client, request: Request, ids: list[int], do_sample: bool, t0: float) -> list[float]:
    """POST one streaming completion; the arrival time (from t0) of each SSE event that carries a token."""
    body = {
        "model": MODEL_ID,
        "prompt": " ".join(f"t{i}" for i in ids),
        "max_tokens": request.output_tokens,
        "stream": True,
        "generation_config": json.dumps({"eos_token_id": None, "do_sample": do_sample}),
    }
    times: list[float] = []
    usage = None
    what = f"hf-serve: request {request.request_id}"
    async for now, event in events(client, "/v1/completions", body, what):
        if event["choices"][0].get("text"):
            times.append(now - t0)
        usage = event.get("usage") or usage
    generated = usage["completion_tokens"] if usage else None
    if len(times) != request.output_tokens or generated != request.output_tokens:
        raise RuntimeError(
            f"hf-serve: request {request.request_id} streamed {len(times)} token events and the server "
            f"counted {generated} tokens; expected {request.output_tokens}"
        )
    return times
