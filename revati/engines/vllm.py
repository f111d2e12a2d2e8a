"""'vllm': vLLM's own V1 engine (`AsyncLLM`: front end here, engine core with its scheduler, KV-cache manager,
model runner and sampler in a process of its own), as its OpenAI server drives it.

vLLM builds its model itself, in the engine core, from a model directory: the adapter writes the model's
config.json to a temporary directory and starts the engine on it with `load_format="dummy"` (random
weights) and `skip_tokenizer_init` (requests carry token ids, outputs come back as ids). The adapter is
given the model's config rather than a built model (it is in `revati.engines.OWN_MODEL`).

Serving: one asyncio task per request sleeps until t0 + arrival, then streams `AsyncLLM.generate` with
`max_tokens` = output_tokens and `ignore_eos` (revati.engines.streaming); a streamed output's arrival is the
time of the tokens it adds. Set-up before t0: engine start-up (memory profiling, KV-cache allocation,
CUDA-graph capture), then one warm-up request.

Options are vLLM's engine arguments of the same name; None leaves vLLM's default. No observer steps: the
model runs in the engine core, which the caller's observer cannot see.

'vllm-serve' (`serve`) is the same engine behind vLLM's OpenAI server, driven over HTTP.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import tempfile
import time
import uuid
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
    enforce_eager: bool | None = None,
    compilation_mode: int | None = None,
    cudagraph_mode: str | None = None,
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    gpu_memory_utilization: float | None = None,
    enable_prefix_caching: bool | None = None,
    enable_chunked_prefill: bool | None = None,
    block_size: int | None = None,
    attention_backend: str | None = None,
    seed: int = 0,
) -> list[RequestResult]:
    """Serve `requests` through vLLM's `AsyncLLM` built from `model` (a config, or a model whose config is
    used); results in the order of `requests`. `compilation_mode` and `cudagraph_mode` are the fields `mode`
    and `cudagraph_mode` of vLLM's compilation config (e.g. 0 and 'FULL_DECODE_ONLY': no torch.compile, full
    CUDA graphs for decode batches)."""
    options = dict(locals())
    engine_args, async_llm = _vllm()
    config = getattr(model, "config", model)
    with tempfile.TemporaryDirectory(prefix="revati-vllm-model-") as model_dir:
        config.save_pretrained(model_dir)
        args = engine_args(model=model_dir, **_FIXED, **_engine_arguments(options))
        engine = async_llm.from_engine_args(args)
        try:
            results = asyncio.run(_serve(engine, config, requests, observer, on_result))
        finally:
            engine.shutdown()
            del engine  # its __del__ shuts down again: now, not at interpreter exit with its modules gone
            gc.collect()
            logging.getLogger("vllm").handlers.clear()
    return [results[r.request_id] for r in requests]


def serve(
    model, requests: Sequence[Request], *, observer=None, on_result=None, **options
) -> list[RequestResult]:
    """'vllm-serve': vLLM's OpenAI server (its FastAPI app under uvicorn, `AsyncLLM` in this process, the
    engine core in its own) under an HTTP load generator on loopback; `run`'s options.

    The server is built as `vllm serve` builds it (its argument parser, engine client, app and app state), but
    its uvicorn server runs as a task on this process's event loop, beside the load generator. Each request
    is a streaming POST to `/v1/completions` with its token ids as the prompt and `return_token_ids`; each
    server-sent event's arrival is the time of the tokens it carries.
    """
    _vllm()
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    config = getattr(model, "config", model)
    with tempfile.TemporaryDirectory(prefix="revati-vllm-model-") as model_dir:
        config.save_pretrained(model_dir)
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", model_dir])
        fixed = {**_FIXED, "disable_uvicorn_access_log": True, "uvicorn_log_level": "warning"}
        for key, value in {**fixed, **_engine_arguments({**_DEFAULTS, **options})}.items():
            setattr(args, key, value)
        validate_parsed_serve_args(args)
        try:
            results = asyncio.run(_serve_http(args, config, requests, observer, on_result))
        finally:
            gc.collect()
            logging.getLogger("vllm").handlers.clear()
    return [results[r.request_id] for r in requests]


serve.__signature__ = inspect.signature(run)  # the same options (revati.engines.engine_options reads them)

_DEFAULTS = {k: p.default for k, p in inspect.signature(run).parameters.items() if p.kind is p.KEYWORD_ONLY}

# Engine arguments every run takes: random weights, token ids in and out, no periodic stats logging.
_FIXED = {"load_format": "dummy", "skip_tokenizer_init": True, "disable_log_stats": True}


def _engine_arguments(options: dict) -> dict:
    """vLLM engine arguments from run's options: those set, under the same names; the compilation fields
    gathered into `compilation_config`."""
    arguments = {k: options[k] for k in _ENGINE_ARGS if options.get(k) is not None}
    compilation = {"mode": options.get("compilation_mode"), "cudagraph_mode": options.get("cudagraph_mode")}
    compilation = {k: v for k, v in compilation.items() if v is not None}
    if compilation:
        arguments["compilation_config"] = compilation
    return arguments


# run's options passed to vLLM's engine arguments under the same names
_ENGINE_ARGS = (
    "dtype",
    "enforce_eager",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "gpu_memory_utilization",
    "enable_prefix_caching",
    "enable_chunked_prefill",
    "block_size",
    "attention_backend",
    "seed",
)


def _vllm():
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as e:
        raise ImportError(
            f"the vllm engine needs vLLM installed ({e.name} is missing): see `make vllm-venv`"
        ) from e
    return AsyncEngineArgs, AsyncLLM


async def _serve_http(args, config, requests, observer, on_result) -> dict[str, RequestResult]:
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app

    sock = loopback_socket()
    try:
        async with build_async_engine_client(args) as engine:
            tasks = await engine.get_supported_tasks()
            app = build_app(args, tasks, engine.model_config)
            await init_app_state(engine, app.state, args, tasks)
            async with served(app, sock, "vllm-serve") as client:
                generate = lambda r, ids, t0: _post(client, r, ids, t0)  # noqa: E731
                return await serve_streams(generate, config, requests, observer, on_result)
    finally:
        sock.close()


async def _post(client, request: Request, ids: list[int], t0: float) -> list[float]:
    """One streaming POST to /v1/completions; the time (from t0) at which each of its tokens came back."""
    body = {
        "prompt": ids,
        "max_tokens": request.output_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "return_token_ids": True,
    }
    times: list[float] = []
    async for now, event in events(
        client, "/v1/completions", body, f"vllm-serve: request {request.request_id}"
    ):
        times.extend([now - t0] * len(event["choices"][0].get("token_ids") or ()))
    return checked("vllm-serve", request, times)


async def _serve(engine, config, requests, observer, on_result) -> dict[str, RequestResult]:
    generate = lambda r, ids, t0: _generate(engine, r, ids, t0)  # noqa: E731
    return await serve_streams(generate, config, requests, observer, on_result)


async def _generate(engine, request: Request, ids: list[int], t0: float) -> list[float]:
    """Stream one request; the time (from t0) at which each of its tokens came back."""
    from vllm import SamplingParams

    params = SamplingParams(
        max_tokens=request.output_tokens, ignore_eos=True, temperature=0.0, detokenize=False
    )
    times: list[float] = []
    request_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
    async for out in engine.generate({"prompt_token_ids": ids}, params, request_id):
        now = time.perf_counter() - t0
        times.extend([now] * (len(out.outputs[0].token_ids) - len(times)))
    return checked("vllm", request, times)
