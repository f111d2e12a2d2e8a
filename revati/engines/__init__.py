"""Engine adapters: run requests through real, unpatched serving code and time every output token.

An adapter knows nothing of recording or emulation. It uses public torch / transformers APIs on whatever
device the model is on, reads time with `time.perf_counter()` and waits for arrivals with `time.sleep` /
`asyncio.sleep`. Times in the returned `RequestResult`s are seconds from t0, taken when serving starts (after
engine set-up); no request is submitted before t0 + its arrival. Every request produces exactly its
`output_tokens` (EOS is ignored).

    results = run_engine("hf-cb", model, workload.requests, observer=recorder, on_result=progress.advance)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from transformers import PreTrainedModel

from revati.engines import hf_cb, hf_generate, hf_serve, sglang, vllm
from revati.engines.observer import Observer
from revati.metrics import RequestResult
from revati.workloads import Request

__all__ = ["ENGINES", "OWN_MODEL", "Observer", "engine_options", "run_engine"]

ENGINES: dict[str, Callable[..., list[RequestResult]]] = {
    "hf-generate": hf_generate.run,
    "hf-cb": hf_cb.run,
    "hf-serve": hf_serve.run,
    "sglang": sglang.run,
    "sglang-serve": sglang.serve,
    "vllm": vllm.run,
    "vllm-serve": vllm.serve,
}
# Engines that build the model themselves, in a process of their own: they take the model's config.
OWN_MODEL = {"sglang", "sglang-serve", "vllm", "vllm-serve"} | (
    {"hf-serve"} if hf_serve.model_in_own_process() else set()
)

_COMMON = {"model", "requests", "observer", "on_result"}


def engine_options(name: str) -> dict[str, object]:
    """An engine's options and their defaults: engine_options('hf-generate') → {'batch_size': 8, ...}."""
    parameters = inspect.signature(_engine(name)).parameters.values()
    return {p.name: p.default for p in parameters if p.name not in _COMMON}


def run_engine(
    name: str,
    model: PreTrainedModel,
    requests: Sequence[Request],
    *,
    observer: Observer | None = None,
    on_result: Callable[[RequestResult], None] | None = None,
    **options,
) -> list[RequestResult]:
    """Serve `requests` with engine `name` (ENGINES); results in request
    order. `model` is a built model, or for the engines in OWN_MODEL its config."""
    accepted = engine_options(name)
    unknown = sorted(options.keys() - accepted.keys())
    if unknown:
        raise ValueError(f"engine {name!r} has no option {unknown[0]!r}; its options: {', '.join(accepted)}")
    if not requests:
        raise ValueError("run_engine needs at least one request")
    for r in requests:
        if r.prompt_tokens < 1 or r.output_tokens < 1:
            raise ValueError(f"request {r.request_id}: prompt_tokens and output_tokens must be at least 1")
    if len({r.request_id for r in requests}) != len(requests):
        raise ValueError("request ids must be unique")
    return ENGINES[name](model, requests, observer=observer, on_result=on_result, **options)


def _engine(name: str) -> Callable[..., list[RequestResult]]:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; engines: {', '.join(ENGINES)}")
    return ENGINES[name]
