"""'hf-generate': static batches through `model.generate()`, timed the way users time streaming.

Batching policy: whenever the engine is free it takes every request that has arrived, oldest first, up to
`batch_size`; if none has arrived it sleeps until the next arrival. A batch runs to its longest request: rows
stop at their own `output_tokens` (a per-row stopping criterion) but stay in the batch, as in `generate()`.

Each step's tokens reach the host through a streamer whose `put()` copies them to the CPU (the host sync) and
then reads `time.perf_counter()`; row i's token times are the times of its first `output_tokens` steps.
Everything runs in the calling thread. A warm-up request runs before t0.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from revati.engines.observer import Observer, Step, observe, serving_started
from revati.engines.prompts import WARMUP_REQUEST, prompt_ids, special_token_ids
from revati.metrics import RequestResult
from revati.workloads import Request


def run(
    model: PreTrainedModel,
    requests: Sequence[Request],
    *,
    observer: Observer | None = None,
    on_result: Callable[[RequestResult], None] | None = None,
    batch_size: int = 8,
    do_sample: bool = False,
) -> list[RequestResult]:
    """Serve `requests` in static batches of at most `batch_size`; results in the order of `requests`.

    Options: batch_size (default 8), do_sample (default False: greedy).
    """
    if batch_size < 1:
        raise ValueError(f"hf-generate: batch_size must be at least 1, got {batch_size}")
    waiting = deque(sorted(requests, key=lambda r: r.arrival))
    results: dict[str, RequestResult] = {}
    _generate(model, [WARMUP_REQUEST], time.perf_counter(), do_sample)
    t0 = time.perf_counter()
    serving_started(observer)
    with observe(model, observer, padded_step):
        while waiting:
            _sleep_until(t0 + waiting[0].arrival)
            now = time.perf_counter()  # compare with t0 + arrival: a virtual sleep ends exactly on it
            batch = []
            while waiting and len(batch) < batch_size and t0 + waiting[0].arrival <= now:
                batch.append(waiting.popleft())
            for request, times in zip(batch, _generate(model, batch, t0, do_sample), strict=True):
                result = RequestResult(
                    request.request_id, request.arrival, request.prompt_tokens, request.output_tokens, times
                )
                results[request.request_id] = result
                if on_result is not None:
                    on_result(result)
    return [results[r.request_id] for r in requests]


def padded_step(kwargs: dict) -> Step:
    """A forward of `generate()`: a left-padded (batch, query) block over a cache of equal-length rows."""
    batch, query = kwargs["input_ids"].shape
    cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5.24 renamed it `cache`
    past = cache.get_seq_length() if cache is not None else 0
    mask = kwargs.get("attention_mask")
    kv_length = mask.shape[-1] if mask is not None and mask.dim() == 2 else past + query
    return Step("prefill" if past == 0 else "decode", batch, batch * query, batch * kv_length)


def _sleep_until(deadline: float) -> None:
    while (remaining := deadline - time.perf_counter()) > 0:
        time.sleep(remaining)


def _generate(model: PreTrainedModel, batch: list[Request], t0: float, do_sample: bool) -> list[list[float]]:
    """Run one static batch; each row's token times in seconds from t0."""
    prompts = [prompt_ids(r, model.config) for r in batch]
    width = max(len(p) for p in prompts)
    pad = _pad_id(model)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    steps = max(r.output_tokens for r in batch)
    streamer = _StepTimes(t0)
    model.generate(
        input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        max_new_tokens=steps,
        do_sample=do_sample,
        eos_token_id=None,  # an explicit None overrides the model's generation config: EOS never stops a row
        pad_token_id=pad,
        stopping_criteria=StoppingCriteriaList(
            [_RowLengths(width, [r.output_tokens for r in batch], model.device)]
        ),
        streamer=streamer,
    )
    if len(streamer.times) != steps:
        raise RuntimeError(
            f"hf-generate: generate() ran {len(streamer.times)} steps for a batch that needs {steps}"
        )
    return [streamer.times[: r.output_tokens] for r in batch]


def _pad_id(model: PreTrainedModel) -> int:
    """The model's pad id, else an id no prompt uses as a token of its own (masked out anyway)."""
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.config.get_text_config().pad_token_id
    if pad is None:
        pad = min(special_token_ids(model.config.get_text_config()), default=0)
    return int(pad[0] if isinstance(pad, list) else pad)


class _RowLengths(StoppingCriteria):
    """Row i is done once it has `lengths[i]` new tokens; evaluated on the device, no host sync."""

    def __init__(self, prompt_width: int, lengths: list[int], device: torch.device):
        self.prompt_width = prompt_width
        self.lengths = torch.tensor(lengths, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return self.lengths <= input_ids.shape[1] - self.prompt_width


class _StepTimes(BaseStreamer):
    """Times each generation step: the moment its tokens are on the host, in seconds from t0."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        value.cpu()  # the host sync: a streaming user has the tokens only once this returns
        now = time.perf_counter()
        if not self._prompt_seen:  # generate() first puts the prompt itself
            self._prompt_seen = True
            return
        self.times.append(now - self.t0)

    def end(self) -> None:
        pass
