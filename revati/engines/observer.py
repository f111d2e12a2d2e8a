"""Engine steps as an observer sees them: an `iteration_start` / `iteration_end` pair around each forward.

The adapters register a forward pre-hook and a forward hook on the model for the length of a run; the pre-hook
asks an engine-specific `describe` function what the forward is about to compute. `describe` must only read
shapes and host-side bookkeeping, never tensor values: reading a value would be a host sync the serving code
does not do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from typing import Any, Protocol

from torch import nn


class Observer(Protocol):
    """Receives each engine step (model forward) of a run, from whichever thread calls the model.

    phase: 'prefill' | 'decode' | 'mixed'; batch_size: sequences in the step; tokens: query tokens computed;
    kv_tokens: key/value positions attended, summed over sequences (past tokens plus the step's own).
    """

    def iteration_start(self, phase: str, batch_size: int, tokens: int, kv_tokens: int) -> None: ...

    def iteration_end(self) -> None: ...

    # Optional: `serving_start()`, called once at t0, the origin of the request times (see `serving_started`).


@dataclass(frozen=True)
class Step:
    """What one model forward computes."""

    phase: str
    batch_size: int
    tokens: int
    kv_tokens: int


def phase_of(prefilling: int, decoding: int) -> str:
    """'prefill', 'decode' or 'mixed' from the number of sequences in each state."""
    if prefilling and decoding:
        return "mixed"
    return "decode" if decoding else "prefill"


def serving_started(observer: Observer | None) -> None:
    """Tell the observer that serving starts now: request times are seconds from this call. Optional hook."""
    hook = getattr(observer, "serving_start", None)
    if hook is not None:
        hook()


@contextmanager
def observe_calls(
    owner: Any, name: str, observer: Observer | None, describe: Callable[[tuple, dict], Step]
) -> Iterator[None]:
    """Call `observer` around every call of the method `owner.name` inside the block (an engine step that
    may not call the model's forward, e.g. a CUDA graph replay); the instance attribute is removed on exit."""
    if observer is None:
        yield
        return
    method = getattr(owner, name)

    @wraps(method)
    def step(*args, **kwargs):
        s = describe(args, kwargs)
        observer.iteration_start(s.phase, s.batch_size, s.tokens, s.kv_tokens)
        try:
            return method(*args, **kwargs)
        finally:
            observer.iteration_end()

    setattr(owner, name, step)
    try:
        yield
    finally:
        delattr(owner, name)


@contextmanager
def observe(
    model: nn.Module, observer: Observer | None, describe: Callable[[dict[str, Any]], Step]
) -> Iterator[None]:
    """Call `observer` around every forward of `model` inside the block; hooks are removed on exit."""
    if observer is None:
        yield
        return

    def before(_module, _args, kwargs):
        step = describe(kwargs)
        observer.iteration_start(step.phase, step.batch_size, step.tokens, step.kv_tokens)

    def after(_module, _args, _kwargs, _output):
        observer.iteration_end()

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        # always_call: a forward that raises still closes its iteration
        model.register_forward_hook(after, with_kwargs=True, always_call=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
