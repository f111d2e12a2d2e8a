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
import inspect
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence

from revati.engines.http import events, loopback_socket, served
from revati.engines.observer import Observer
from revati.engines.streaming import checked, serve_streams
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
    disable_prefill_cuda_graph: bool | None = None,
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
    sglang = _sglang()
    config, server_args = _server_args(model, locals())
    with tempfile.TemporaryDirectory(prefix="revati-sglang-model-") as model_dir:
        config.save_pretrained(model_dir)
        engine = sglang.Engine(model_path=model_dir, **server_args)
        try:
            results = engine.loop.run_until_complete(_serve(engine, config, requests, observer, on_result))
        finally:
            engine.shutdown()
            _cancel_tasks(engine.loop)
            logging.getLogger("sglang").handlers.clear()
    return [results[r.request_id] for r in requests]


def serve(
    model, requests: Sequence[Request], *, observer=None, on_result=None, **options
) -> list[RequestResult]:
    """'sglang-serve': SGLang's HTTP server (its FastAPI app under uvicorn, the tokenizer manager in this
    process, scheduler and detokenizer in theirs) under an HTTP load generator on loopback; `run`'s options.

    The server is set up as `sglang.launch_server` sets it up (subprocesses, the app's global state), but its
    uvicorn server runs as a task on this process's event loop, beside the load generator, as hf-serve does.
    Each request is a streaming POST to `/generate` with its token ids; each server-sent event's arrival is
    the time of the tokens it adds.
    """
    _sglang()
    from sglang.srt.entrypoints import http_server
    from sglang.srt.entrypoints.engine import Engine
    from sglang.srt.server_args import ServerArgs
    from sglang.srt.utils import kill_process_tree

    config, server_args = _server_args(model, {**_DEFAULTS, **options})
    sock = loopback_socket()
    with tempfile.TemporaryDirectory(prefix="revati-sglang-model-") as model_dir:
        config.save_pretrained(model_dir)
        args = ServerArgs(model_path=model_dir, host="127.0.0.1", port=sock.getsockname()[1], **server_args)
        tokenizer_manager, template_manager, _, started_workers, watchdog, _ = Engine._launch_subprocesses(
            server_args=args,
            init_tokenizer_manager_func=http_server.init_tokenizer_manager,
            run_scheduler_process_func=http_server.run_scheduler_process,
            run_detokenizer_process_func=http_server.run_detokenizer_process,
        )
        try:
            http_server.set_global_state(
                http_server._GlobalState(
                    tokenizer_manager=tokenizer_manager,
                    template_manager=template_manager,
                    scheduler_info=started_workers.scheduler_infos[0],
                )
            )
            app = http_server.app
            app.is_single_tokenizer_mode, app.server_args = True, args
            app.warmup_thread_kwargs = dict(
                server_args=args, launch_callback=None, execute_warmup_func=http_server._execute_server_warmup
            )
            results = asyncio.run(_serve_http(app, sock, config, requests, observer, on_result))
        finally:
            if watchdog is not None:
                watchdog.stop()  # it takes its workers' end for a crash and kills this process (SIGQUIT)
            kill_process_tree(os.getpid(), include_parent=False)
            sock.close()
            logging.getLogger("sglang").handlers.clear()
    return [results[r.request_id] for r in requests]


serve.__signature__ = inspect.signature(run)  # the same options (revati.engines.engine_options reads them)

_DEFAULTS = {k: p.default for k, p in inspect.signature(run).parameters.items() if p.kind is p.KEYWORD_ONLY}


def _sglang():
    try:
        import sglang
    except ImportError as e:
        raise ImportError(
            f"the sglang engines need SGLang installed ({e.name} is missing): see `make sglang-venv`"
        ) from e
    return sglang


def _server_args(model, options: dict) -> tuple:
    """The model's config, and the ServerArgs fields: the options given (None: SGLang's default)."""
    fixed = {
        "load_format": "dummy",
        "skip_tokenizer_init": True,
        "skip_server_warmup": True,
        "dtype": options["dtype"],
        "random_seed": options["seed"],
        "log_level": options["log_level"],
    }
    chosen = {k: options[k] for k in _SERVER_ARGS if options.get(k) is not None}
    return getattr(model, "config", model), {**fixed, **chosen}


# run's options that are ServerArgs fields of the same name, passed only when set
_SERVER_ARGS = tuple(k for k in _DEFAULTS if k not in ("observer", "on_result", "dtype", "log_level", "seed"))


async def _serve_http(app, sock, config, requests, observer, on_result) -> dict[str, RequestResult]:
    async with served(app, sock, "sglang-serve") as client:
        generate = lambda r, ids, t0: _post(client, r, ids, t0)  # noqa: E731
        return await serve_streams(generate, config, requests, observer, on_result)


async def _post(client, request: Request, ids: list[int], t0: float) -> list[float]:
    """One streaming POST to /generate; the time (from t0) at which each of its tokens came back."""
    body = {"input_ids": ids, "sampling_params": _sampling(request), "stream": True}
    times: list[float] = []
    async for now, event in events(client, "/generate", body, f"sglang-serve: request {request.request_id}"):
        times.extend([now - t0] * (event["meta_info"]["completion_tokens"] - len(times)))
    return checked("sglang", request, times)


async def _serve(engine, config, requests, observer, on_result) -> dict[str, RequestResult]:
    generate = lambda r, ids, t0: _generate(engine, r, ids, t0)  # noqa: E731
    return await serve_streams(generate, config, requests, observer, on_result)


async def _generate(engine, request: Request, ids: list[int], t0: float) -> list[float]:
    """Stream one request; the time (from t0) at which each of its tokens came back."""
    stream = await engine.async_generate(input_ids=ids, sampling_params=_sampling(request), stream=True)
    times: list[float] = []
    async for chunk in stream:
        now = time.perf_counter() - t0
        times.extend([now] * (chunk["meta_info"]["completion_tokens"] - len(times)))
    return checked("sglang", request, times)


def _sampling(request: Request) -> dict:
    return {"max_new_tokens": request.output_tokens, "ignore_eos": True, "temperature": 0.0}


def _cancel_tasks(loop) -> None:
    """End the tasks the engine's front end left on the loop (its receive loop, watchdogs): left pending, they
    log 'Task was destroyed' at interpreter exit."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
