"""'hf-serve': `transformers serve --continuous-batching` in-process, with a load generator speaking HTTP.

The server is transformers' OpenAI-compatible FastAPI app; the load generator talks to it over loopback: one
task per request that sleeps until t0 + arrival (`asyncio.sleep`), POSTs a streaming `/v1/completions` request
with httpx and takes each SSE event's arrival as one token's time. The tokenizer is built locally (no hub): a
`tokenizers` WordLevel vocabulary 't0' … 't<V-1>' split on whitespace, so the prompt text 't17 t5 …' is
exactly our prompt ids and every generated token decodes to one non-empty SSE event. EOS is ignored through
the server's own `generation_config` request field (`{"eos_token_id": -1}`: the batching manager's "no EOS");
`max_tokens` = output_tokens. Set-up before t0: server start-up, then one warm-up request, which makes the
server set up what its first request always sets up.

Two generations of the server, told apart by `model_in_own_process`:

- transformers < 5.25 serves the model in its own process. One asyncio loop in the calling thread drives the
  server (uvicorn's `Server.serve()` as a task, from a `Serve` subclass whose `start_server()` starts no
  thread) and the load generator. Our built model goes, with the tokenizer, into the server's cache of
  loaded models (`loaded_models[<id>@main] = TimedModel(...)`) under a made-up id; the server's
  continuous-batching worker thread calls it, and its steps are observed.
- transformers 5.25 and later runs the model in a process it spawns, talking to it through multiprocessing
  queues. hf-serve then starts the server as `transformers serve MODEL --continuous-batching` would, on our
  socket in a thread of this process (`Serve.run`), with a `ModelLoader` of ours that builds the model from
  its config with random weights in that process (revati.engines.hf_serve_loader); the load generator runs on
  the calling thread's loop. The model's steps are out of sight, as for the other engines of OWN_MODEL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Sequence

from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from revati.engines.hf_cb import attention, cache_size, observe_steps
from revati.engines.http import events, loopback_socket, started
from revati.engines.observer import Observer, serving_started
from revati.engines.prompts import prompt_ids
from revati.metrics import RequestResult
from revati.workloads import Request

MODEL_ID = "revati/model"


def run(
    model: PreTrainedModel | PretrainedConfig,
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
    dtype: str | None = None,
) -> list[RequestResult]:
    """Serve `requests` through an in-process `transformers serve`; results in the order of `requests`.

    Options map to the server's flags: attn_implementation (--attn-implementation; applied to our model as
    loading would; the server may still switch to flash attention where it is installed, as `transformers
    serve` does), page_size (--cb-block-size), num_blocks (--cb-num-blocks), max_batch_tokens
    (--cb-max-batch-tokens), max_memory_percent (--cb-max-memory-percent), use_cuda_graph
    (--cb-use-cuda-graph), seed (--default-seed); do_sample goes in each request's generation_config. On a CPU
    model (or with size_for_workload), unset num_blocks / max_batch_tokens are sized from the workload (see
    hf_cb.cache_size).

    Where the server runs its model in a process of its own (`model_in_own_process`), `model` is the model's
    config, built there with random weights in `dtype` (--dtype; None: the config's); no steps are observed.
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
    built = isinstance(model, PreTrainedModel)
    if built and model_in_own_process():
        raise ValueError(
            "hf-serve: this transformers' server builds its model in a process of its own; give hf-serve the "
            "model's config (as for the engines in revati.engines.OWN_MODEL), not a built model"
        )
    num_blocks, max_batch_tokens = cache_size(
        model,
        requests,
        page_size or 256,
        num_blocks,
        max_batch_tokens,
        size_for_workload if built else bool(size_for_workload),
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
        if built:
            with attention(model, attn_implementation):
                results = asyncio.run(_serve(model, requests, flags, do_sample, observer, on_result))
        else:
            load = (model, dtype, attn_implementation)
            results = _serve_from_config(load, requests, flags, do_sample, observer, on_result)
    finally:
        hf_logging.set_verbosity(verbosity)
    return [results[r.request_id] for r in requests]


def model_in_own_process() -> bool:
    """Whether this transformers' `transformers serve` runs its model in a process it spawns (5.25 and later):
    hf-serve is then one of the engines given the model's config (revati.engines.OWN_MODEL)."""
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version("transformers")) >= Version("5.25.0.dev0")


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
    from transformers.cli.serving.model_manager import TimedModel

    sock = loopback_socket()
    port = sock.getsockname()[1]
    serve = _server(flags, port)
    tokenizer = word_tokenizer(model.config.get_text_config().vocab_size)
    model_key = serve._model_manager.process_model_name(MODEL_ID)
    serve._model_manager.loaded_models[model_key] = TimedModel(model, timeout_seconds=-1, processor=tokenizer)
    serving = asyncio.create_task(serve.server.serve(sockets=[sock]))

    def steps():  # the warm-up made the server create its continuous-batching manager (in private state)
        return observe_steps(serve._generation_state.get_manager(model_key, use_cb=True)._cb, model, observer)

    try:
        await started(serve.server, serving, "hf-serve")
        return await _load(port, model.config, requests, do_sample, observer, on_result, steps)
    finally:
        serve.server.should_exit = True
        await asyncio.gather(serving, return_exceptions=True)
        serve.kill_server()  # stops the continuous-batching worker and unloads the model from the server
        sock.close()


def _serve_from_config(load, requests, flags, do_sample, observer, on_result) -> dict[str, RequestResult]:
    """`transformers serve MODEL --continuous-batching` as its users start it, the model built in the process
    the server spawns (`RandomWeights`, `load` = (config, dtype, attention)): the server runs in a thread of
    this process, the load generator on this thread's loop, and the server stops once the load is served."""
    from transformers.cli.serve import Serve

    from revati.engines.hf_serve_loader import RandomWeights

    class InProcessServe(Serve):
        def run(self, socket=None, engine_connection=None):
            if socket is not None:  # not from __init__, which would serve on a port of its own at once
                super().run(socket, engine_connection)

    config = load[0]
    sock = loopback_socket()
    port = sock.getsockname()[1]
    serve = InProcessServe(
        MODEL_ID, continuous_batching=True, host="127.0.0.1", port=port, log_level="error", **flags
    )
    serve.loader = RandomWeights(*load)
    failed: list[BaseException] = []

    def server() -> None:
        try:
            serve.run(sock)
        except BaseException as e:  # noqa: BLE001 - handed to the load generator, which raises it
            failed.append(e)

    async def served(servers) -> dict[str, RequestResult]:
        while not (servers and servers[0].started):
            if failed or not thread.is_alive():
                raise failed[0] if failed else RuntimeError("hf-serve: the server exited before it started")
            await asyncio.sleep(0.01)
        return await _load(port, config, requests, do_sample, observer, on_result, contextlib.nullcontext)

    with _uvicorn_servers() as servers:
        thread = threading.Thread(target=server, name="hf-serve")
        thread.start()
        try:
            return asyncio.run(served(servers))
        finally:
            for made in servers:
                made.should_exit = True
            thread.join()
            sock.close()


@contextlib.contextmanager
def _uvicorn_servers():
    """The uvicorn servers made inside the block: `Serve.run` makes its own and keeps it to itself, and the
    load generator stops it when the load is served, as Ctrl+C would. Like the in-process server, they log
    warnings only: no line per request on stdout, where `--json` prints its object."""
    import logging

    import uvicorn

    made = []
    real_init = uvicorn.Server.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        for name in ("uvicorn.error", "uvicorn.access"):  # set up by the config, made just before
            logging.getLogger(name).setLevel(logging.WARNING)
        made.append(self)

    uvicorn.Server.__init__ = init
    try:
        yield made
    finally:
        uvicorn.Server.__init__ = real_init


async def _load(port, config, requests, do_sample, observer, on_result, steps) -> dict[str, RequestResult]:
    """The load generator: one warm-up request (the server sets up as its first request always makes it), then
    each request at its arrival from t0; `steps()` observes the engine's steps while they are served."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=None, limits=limits) as client:
        warmup = Request("revati-warmup", 0.0, 8, 2)
        await _complete(client, warmup, prompt_ids(warmup, config), do_sample, time.perf_counter())
        with steps():
            t0 = time.perf_counter()
            serving_started(observer)
            results = await asyncio.gather(
                *(_send(client, r, prompt_ids(r, config), do_sample, t0, on_result) for r in requests)
            )
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
    """POST one streaming completion; each token's arrival time (from t0): that of the SSE event carrying it.

    A stream that fell behind its model sends the texts it had queued as one event (5.25's
    `read_queue_outputs`), and a real client sees them so: each word 't<i>' of an event's text is one token,
    and all arrive with it."""
    body = {
        "model": MODEL_ID,
        "prompt": " ".join(f"t{i}" for i in ids),
        "max_tokens": request.output_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},  # the usage chunk, last (5.25 sends it only if asked)
        "generation_config": json.dumps({"eos_token_id": -1, "do_sample": do_sample}),  # -1: no EOS
    }
    times: list[float] = []
    usage = None
    what = f"hf-serve: request {request.request_id}"
    async for now, event in events(client, "/v1/completions", body, what):
        choices = event.get("choices") or [{}]  # the usage chunk has none
        times += [now - t0] * len((choices[0].get("text") or "").split())
        usage = event.get("usage") or usage
    generated = usage["completion_tokens"] if usage else None
    if len(times) != request.output_tokens or generated != request.output_tokens:
        raise RuntimeError(
            f"hf-serve: request {request.request_id} streamed {len(times)} tokens and the server "
            f"counted {generated} tokens; expected {request.output_tokens}"
        )
    return times
