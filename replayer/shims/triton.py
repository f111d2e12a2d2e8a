"""Triton kernel launches on the virtual device.

`JITFunction.run` is where every `kernel[grid](...)` launch lands (through `@triton.autotune` and
`@triton.heuristics` too); while emulating, a launch with a virtual tensor among its arguments compiles
nothing and runs no GPU code. It is one kernel on the clock, keyed 'triton::<kernel name>', with features
from its grid and arguments: `programs` (the grid's size) and `bytes` (its tensor arguments' sizes). A
kernel that is a computation revati knows by another key says so (`@priced`): an engine's Triton attention
reads a few rows of a KV pool it is handed whole, and is priced as 'revati::attention' over the sequence
lengths in its metadata; captured into a CUDA graph, it is priced again at each replay over the lengths its
buffers then hold (`replayer.cuda.Graph.follow`).

What it computes:
- every tensor argument has a value (positions, slot mappings, block tables: integer metadata), or those
  without are buffers the kernel is known to only update (`_SCRATCH`) -> the kernel runs in Triton's
  interpreter on the values, exactly (`_interpret`), or, for a kernel launched every engine step, as the
  same computation in torch (`@exact`: the interpreter takes about a millisecond per program);
- otherwise the arguments it stores to (read from its source: pointers named in `tl.store`) lose their
  values, unless a rule for the kernel says what they hold (`@rule`: vLLM's sampler takes its token ids
  from the token oracle). An engine's kernels have a module of their own (replayer/shims/vllm_kernels.py).
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import textwrap
from collections.abc import Callable

import torch

from replayer import session
from replayer.tensor import VTensor

# Kernels that compute exact metadata while one of their buffers is too large to keep a value: that buffer
# lends scratch memory to the interpreter (`_interpret`). vLLM's post-sampling update also counts each
# request's tokens over the whole vocabulary (max requests x 128k for Llama 3: no value kept).
_SCRATCH = {"_post_update_kernel": {"output_bin_counts_ptr"}}

Rule = Callable[[dict, object], None]  # (bound arguments by name, emulator) -> None
_rules: dict[str, Rule] = {}
# (argument values by name, grid) -> None, writing values in place; or NotImplemented: interpret this launch
Exact = Callable[[dict, tuple], object]
_exact: dict[str, Exact] = {}
# (bound arguments by name) -> (key, features, lengths): `lengths` = (indptr, entries, K / V element size),
# the running sums of the sequence lengths the kernel reads in a tensor's first entries, or None
Priced = Callable[[dict], tuple[str, dict, "tuple[VTensor, int, int] | None"]]
_priced: dict[str, Priced] = {}  # by the kernel's module and name: names like `_fwd_kernel` recur


def flat(t: torch.Tensor) -> torch.Tensor:
    """The memory a Triton pointer to `t` addresses: flat, from `t`'s first element to its storage's end."""
    n = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
    return t.as_strided((n,), (1,), t.storage_offset())


def rule(*kernels: str) -> Callable[[Rule], Rule]:
    """Register what kernels write when their inputs have no values: `@rule("_my_kernel") def f(a, emu)`."""
    return _filed(_rules, kernels)


def exact(*kernels: str) -> Callable[[Exact], Exact]:
    """Register a torch equivalent of kernels whose arguments have values: `@exact("_k") def f(values, grid)`,
    where `values` maps each parameter (defaults included) to its value, None for a `_SCRATCH` buffer. It
    returns NotImplemented for a launch it does not cover: that one runs in the interpreter."""
    return _filed(_exact, kernels)


def priced(*kernels: str) -> Callable[[Priced], Priced]:
    """Register the op kernels compute, by '<module>.<kernel name>':
    `@priced("pkg.ops.attention._fwd_kernel") def f(a) -> (key, features, (kv_indptr, batch + 1, 2))`."""
    return _filed(_priced, kernels)


def _filed(table: dict, kernels: tuple[str, ...]) -> Callable:
    """A decorator that files its function in `table` under each of `kernels`."""

    def register(fn):
        for name in kernels:
            table[name] = fn
        return fn

    return register


def install(patch) -> None:
    """Intercept Triton launches on virtual tensors until `patch.restore()` (no-op without Triton)."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return
    from replayer.shims import sglang_kernels  # noqa: F401 - how SGLang's Triton attention is priced

    real_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if warmup or not any(type(a) is VTensor for a in (*args, *kwargs.values())):
            return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        return launch(self, args, kwargs, grid)

    patch.set(JITFunction, "run", run)


def launch(kernel, args: tuple, kwargs: dict, grid) -> None:
    """One launch of `kernel` (a JITFunction) over `grid` on the virtual device."""
    emu = session.current()
    names = _arg_names(kernel)
    bound = dict(zip(names, args, strict=False))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    if callable(grid):
        grid = grid({**kwargs, **bound})
    programs = math.prod(int(g) for g in grid)
    tensors = [t for t in bound.values() if isinstance(t, torch.Tensor)]
    name = kernel.fn.__name__
    dtype = tensors[0].dtype if tensors else None
    how = _priced.get(f"{kernel.fn.__module__}.{name}")
    if how is not None:
        key, features, lengths = how({**_defaults(kernel), **kwargs, **bound})
    else:
        key, lengths = f"triton::{name}", None
        features = {
            "programs": float(programs),
            "bytes": float(sum(t.numel() * t.element_size() for t in tensors)),
        }
    unknown = [k for k, v in bound.items() if type(v) is VTensor and v.value() is None]
    if name not in _rules and set(unknown) <= _SCRATCH.get(name, set()):
        values = {k: (v.value() if type(v) is VTensor else v) for k, v in bound.items()}
        torch_form = _exact.get(name)
        if (
            torch_form is None
            or torch_form({**_defaults(kernel), **values}, tuple(int(g) for g in grid)) is NotImplemented
        ):
            _interpret(kernel, values, bound, kwargs, grid, unknown)
        for k in unknown:  # a scratch buffer stays unknown
            bound[k]._vstorage.value = None
    else:
        for arg in _stored(kernel):
            t = bound.get(arg)
            if type(t) is VTensor:
                t._vstorage.value = None
        if name in _rules:
            _rules[name](bound, emu)
    sig = emu.dispatcher.launch_kernel(key, features, dtype)
    graph = emu.clock.capturing() if lengths is not None else None
    if graph is not None:
        indptr, entries, size = lengths
        graph.follow(key, features, dtype, sig.duration * emu.wake, indptr, size, indptr=entries)


def _interpret(kernel, values: dict, bound: dict, kwargs: dict, grid, unknown: list[str]) -> None:
    """Run the kernel on the arguments' `values`. An integer buffer too large to keep a value (vLLM's
    per-request token counts over the vocabulary) lends scratch memory of its size: what the kernel computes
    from the others stays exact (the caller leaves the buffer itself unknown)."""
    for k in unknown:
        t = bound[k]
        values[k] = (
            _scratch(t._vstorage.nbytes).view(t.dtype).as_strided(t.shape, t.stride(), t.storage_offset())
        )
    extra = {k: v for k, v in kwargs.items() if k not in bound}
    from triton.runtime.jit import JITFunction

    # The @triton.jit helpers the kernel calls are device functions: interpreted too (Triton's interpreter
    # mode makes every jit function interpretable; here only the kernel launched is).
    real_call = JITFunction.__call__
    JITFunction.__call__ = lambda helper, *a, **k: _interpreted(helper)(*a, **k)
    try:
        _interpreted(kernel)[tuple(grid)](**values, **extra)
    finally:
        JITFunction.__call__ = real_call


@functools.lru_cache(maxsize=4)
def _scratch(nbytes: int) -> torch.Tensor:
    # Uninitialised: the pages the kernel never touches are never committed.
    return torch.empty(max(nbytes, 1), dtype=torch.uint8)


def _interpreted(kernel):
    return _interpreted_fn(kernel.fn)  # keyed by the Python function: hashing a JITFunction parses its source


@functools.cache
def _interpreted_fn(fn):
    import dataclasses

    from triton.runtime import interpreter

    # As a kernel compiled for the GPU runs (overflow checks come with debug builds only), and faster.
    builder = interpreter.interpreter_builder
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)
    return interpreter.InterpretedFunction(fn)


@functools.cache
def _defaults(kernel) -> dict:
    parameters = inspect.signature(kernel.fn).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


@functools.cache
def _arg_names(kernel) -> list[str]:
    return list(inspect.signature(kernel.fn).parameters)


@functools.cache
def _stored(kernel) -> frozenset[str]:
    """The kernel's parameters named in the address of a `tl.store` (or atomic), directly or through the
    local variables computed from them: what it may write."""
    names = set(_arg_names(kernel))
    tree = ast.parse(textwrap.dedent(inspect.getsource(kernel.fn)))
    sources: dict[str, set[str]] = {}  # local variable -> the names its assignments read
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            read = _addressing(node.value)
            for target in node.targets:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        sources.setdefault(n.id, set()).update(read)
    written: set[str] = set()
    for node in ast.walk(tree):
        call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args
        if call and (node.func.attr == "store" or node.func.attr.startswith("atomic_")):
            written |= _addressing(node.args[0])
    seen: set[str] = set()
    while written - seen:  # follow locals back to the parameters they came from
        name = (written - seen).pop()
        seen.add(name)
        written |= sources.get(name, set())
    return frozenset(written & names)


def _addressing(node: ast.AST) -> set[str]:
    """The names an expression computes with, leaving out what it loads from memory: in
    `tl.store(out_ptr + tl.load(idx_ptr + i), x)` the kernel writes through `out_ptr`, not `idx_ptr`."""
    if _is_load(node):
        return set()
    if isinstance(node, ast.Name):
        return {node.id}
    return set().union(*(_addressing(child) for child in ast.iter_child_nodes(node)))


def _is_load(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
