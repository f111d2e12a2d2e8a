"""'hf-cb': transformers' continuous batching (`model.init_continuous_batching()`) as its users drive it.

Set-up before t0: `init_continuous_batching(...)`, `manager.warmup()` (which also builds the paged KV cache
and the IO buffers in the calling thread; with CUDA graphs on it captures them), `manager.start()`, which
starts the generation thread that calls the model from then on, and one warm-up request. An arrival thread
then adds each request at t0 + arrival with its own `max_new_tokens` and `record_timestamps=True`; the calling
thread collects finished requests from `manager.get_result()`. Token times are the engine's own per-token
timestamps (`time.perf_counter()` in the generation thread, right after the step's tokens reached the host),
shifted to t0.
"""

from __future__ import annotations

import inspect
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from transformers import ContinuousBatchingConfig, GenerationConfig, PreTrainedModel
from transformers.generation.continuous_batching import ContinuousBatchingManager
from transformers.generation.continuous_batching.utils import WorkloadHints

from revati.engines.observer import Observer, Step, observe, observe_calls, phase_of, serving_started
from revati.engines.prompts import WARMUP_REQUEST, prompt_ids
from revati.metrics import RequestResult
from revati.workloads import Request

# On CPU, transformers sizes the paged cache from 60 % of RAM and allocates an sdpa mask of max_batch_tokens x
# (cache tokens + max_batch_tokens): tens of GB. A CPU run sizes both from the workload instead.
CPU_MAX_BATCH_TOKENS = 512

_POLL_SECONDS = 1.0  # liveness checks only: never used for timing


def run(
    model: PreTrainedModel,
    requests: Sequence[Request],
    *,
    observer: Observer | None = None,
    on_result: Callable[[RequestResult], None] | None = None,
    attn_implementation: str | None = "sdpa",
    page_size: int = 256,
    num_blocks: int | None = None,
    max_batch_tokens: int | None = None,
    max_memory_percent: float | None = None,
    use_cuda_graph: bool | None = None,
    do_sample: bool = False,
    seed: int | None = 0,
    size_for_workload: bool | None = None,
) -> list[RequestResult]:
    """Serve `requests` with continuous batching; results in the order of `requests`.

    Options: attn_implementation ('sdpa'; 'eager' becomes 'paged|eager'; 'flash_attention_2' on CUDA; None
    keeps the model's), page_size (256 tokens), num_blocks and max_batch_tokens (None: transformers sizes them
    from free device memory; on CPU from the workload), max_memory_percent, use_cuda_graph (None: transformers
    decides, i.e. on only for flash attention), do_sample (False: greedy), seed (0; None lets transformers
    draw one), size_for_workload (size unset num_blocks / max_batch_tokens from the workload, as on a CPU;
    None: on a CPU device only — an emulated CPU passes True to serve as the real one did).
    """
    requests = list(requests)
    num_blocks, max_batch_tokens = cache_size(
        model, requests, page_size, num_blocks, max_batch_tokens, size_for_workload
    )
    cb_config = cb_config_of(
        page_size=page_size,
        num_blocks=num_blocks,
        max_batch_tokens=max_batch_tokens,
        max_memory_percent=max_memory_percent,
        use_cuda_graph=use_cuda_graph,
        auto_switch_to_flash=False,  # attn_implementation means what it says
        seed=seed,
    )
    # EOS never ends a request (the workload says how long each is): -1, what continuous batching turns an
    # unset EOS into, after a warning at every run
    generation_config = GenerationConfig(
        do_sample=do_sample, eos_token_id=-1, max_new_tokens=max(r.output_tokens for r in requests)
    )
    hints = WorkloadHints(
        max_prompt_length=max(r.prompt_tokens for r in requests),
        max_generated_length=max(r.output_tokens for r in requests),
        num_requests=len(requests),
    )
    with attention(model, attn_implementation):
        manager = model.init_continuous_batching(generation_config, cb_config, workload_hints=hints)
        try:
            manager.warmup()
            manager.start()
            _serve(manager, [WARMUP_REQUEST], [prompt_ids(WARMUP_REQUEST, model.config)], None)
            with observe_steps(manager, model, observer):
                results = _serve(
                    manager, requests, [prompt_ids(r, model.config) for r in requests], on_result, observer
                )
        finally:
            manager.stop(block=True)
            manager.destroy()
    return [results[r.request_id] for r in requests]


def cb_config_of(**fields) -> ContinuousBatchingConfig:
    """A ContinuousBatchingConfig on any transformers 5.x: before 5.2x `page_size` was `block_size`, and
    `seed` / `auto_switch_to_flash` did not exist (those versions neither seed nor switch)."""
    accepted = inspect.signature(ContinuousBatchingConfig.__init__).parameters
    if "page_size" not in accepted:
        fields["block_size"] = fields.pop("page_size")
    return ContinuousBatchingConfig(**{k: v for k, v in fields.items() if k in accepted})


def cache_size(
    model: PreTrainedModel,
    requests: Sequence[Request],
    page_size: int,
    num_blocks: int | None,
    max_batch_tokens: int | None,
    for_workload: bool | None = None,
) -> tuple[int | None, int | None]:
    """(num_blocks, max_batch_tokens) as given; unset ones sized for the whole workload when `for_workload`
    (None: on a CPU model)."""
    if for_workload is None:
        for_workload = model.device.type == "cpu"
    if not for_workload:
        return num_blocks, max_batch_tokens
    if num_blocks is None:
        num_blocks = sum(math.ceil((r.prompt_tokens + r.output_tokens) / page_size) + 1 for r in requests)
    return num_blocks, max_batch_tokens or CPU_MAX_BATCH_TOKENS


@contextmanager
def attention(model: PreTrainedModel, implementation: str | None) -> Iterator[None]:
    """Switch the model's attention implementation for the block, restoring the original after."""
    original = model.config._attn_implementation
    if implementation is not None and implementation != original:
        model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        if model.config._attn_implementation != original:
            model.set_attn_implementation(original)


def observe_steps(manager: ContinuousBatchingManager, model: PreTrainedModel, observer: Observer | None):
    """Observe each engine step: the model runner's `compute_batch` where transformers has one (a CUDA graph
    replay runs no forward, so forward hooks would miss it), else the model's forward."""
    runner = getattr(getattr(manager, "batch_processor", None), "model_runner", None)
    if callable(getattr(runner, "compute_batch", None)):
        return observe_calls(runner, "compute_batch", observer, lambda _a, _k: packed_step(manager))
    return observe(model, observer, lambda _kwargs: packed_step(manager))


def packed_step(manager: ContinuousBatchingManager) -> Step:
    """The step the generation thread is about to run, from the batch's host-side bookkeeping only.

    A sequence is decoding when its past already covers its prompt; kv_tokens counts each sequence's past plus
    the step's own tokens.
    """
    io = manager.batch_processor.inputs_and_outputs
    if hasattr(io, "io_pairs"):  # async batching: the host half of the pair being computed
        io = io.io_pairs[io.current_pair].host_io
    prefilling = decoding = tokens = kv_tokens = 0
    for future in io.requests_in_batch:
        state = future.state
        tokens += future.query_length
        kv_tokens += state.position_offset  # already advanced past this step's tokens
        if state.position_offset - future.query_length >= len(state.initial_tokens):
            decoding += 1
        else:
            prefilling += 1
    return Step(phase_of(prefilling, decoding), prefilling + decoding, tokens, kv_tokens)


def _serve(
    manager: ContinuousBatchingManager,
    requests: list[Request],
    prompts: list[list[int]],
    on_result: Callable[[RequestResult], None] | None,
    observer: Observer | None = None,
) -> dict[str, RequestResult]:
    t0 = time.perf_counter()
    serving_started(observer)
    arrivals = _Arrivals(manager, requests, prompts, t0)
    arrivals.start()
    by_id = {r.request_id: r for r in requests}
    results: dict[str, RequestResult] = {}
    try:
        while len(results) < len(requests):
            output = manager.get_result(timeout=_POLL_SECONDS)
            if output is None:
                _check_alive(manager, arrivals)
                continue
            if not output.is_finished():
                continue
            request = by_id[output.request_id]
            if output.error is not None:
                raise RuntimeError(
                    f"hf-cb: request {request.request_id} failed in the engine: {output.error}"
                )
            times = [t - t0 for t in (output.timestamps or [])[: request.output_tokens]]
            if len(output.generated_tokens) != request.output_tokens or len(times) != request.output_tokens:
                raise RuntimeError(
                    f"hf-cb: request {request.request_id} finished with {len(output.generated_tokens)} "
                    f"tokens and {len(times)} timestamps, expected {request.output_tokens}"
                )
            result = RequestResult(
                request.request_id, request.arrival, request.prompt_tokens, request.output_tokens, times
            )
            results[request.request_id] = result
            if on_result is not None:
                on_result(result)
    finally:
        arrivals.cancel()
        arrivals.join()
    return results


def _check_alive(manager: ContinuousBatchingManager, arrivals: _Arrivals) -> None:
    if arrivals.error is not None:
        raise RuntimeError(f"hf-cb: adding requests failed: {arrivals.error}") from arrivals.error
    error = manager.background_thread_status.fatal_error
    if error is not None or not manager.is_running():
        raise RuntimeError(
            f"hf-cb: the generation thread stopped before all requests finished: {error}"
        ) from error


class _Arrivals(threading.Thread):
    """Adds each request to the manager at t0 + its arrival, sleeping (`time.sleep`) in between."""

    def __init__(self, manager, requests: list[Request], prompts: list[list[int]], t0: float):
        super().__init__(name="revati-arrivals", daemon=True)
        self.manager, self.t0 = manager, t0
        self.schedule = sorted(zip(requests, prompts, strict=True), key=lambda pair: pair[0].arrival)
        self.error: BaseException | None = None
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    def run(self) -> None:
        try:
            for request, ids in self.schedule:
                while (
                    not self._cancelled and (remaining := self.t0 + request.arrival - time.perf_counter()) > 0
                ):
                    time.sleep(min(remaining, _POLL_SECONDS))
                if self._cancelled:
                    return
                added = self.manager.add_request(
                    ids,
                    request_id=request.request_id,
                    max_new_tokens=request.output_tokens,
                    record_timestamps=True,
                )
                if added is None:
                    raise RuntimeError(f"the engine refused request {request.request_id} (it is stopping)")
        except BaseException as e:  # reported by the collecting thread
            self.error = e
