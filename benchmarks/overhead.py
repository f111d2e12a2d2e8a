"""Emulator overhead, measured in one run (this machine is noisy: compare ratios, not absolute times).

1. µs per intercepted op on the cached path (an elementwise add on virtual tensors) against an
   empty dispatch mode (a TorchDispatchMode that returns a ready tensor: the floor of any Python
   interception), against a bare wrapper subclass (its `__torch_dispatch__` makes one new wrapper of a
   fixed shape and does nothing else: the floor of any emulator whose tensors are Python wrapper
   subclasses, as Revati's are) and against the plain CPU op.
2. Wall time of a tiny model served by a real engine under emulation against the same engine on
   real CPU tensors (the serving code's own host time plus the tiny model's CPU kernels).
3. Against a real GPU: the shipped H100 recordings of hf-generate serving Llama-3.1-8B without the
   profiler (`traces/h100/gen-*-timeline`: the serving code's host time on the GPU's own machine, eager HF
   decode being host-bound), against `revati emulate` of the same workload with the shipped H100 profile
   on this machine (its wall time includes the engine's set-up and warm-up request; the recording's
   does not).

    python benchmarks/overhead.py [--ops 20000] [--engine hf-generate] [--requests 16] [--no-gpu-runs]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from replayer.session import Emulator
from revati.cost import Roofline
from revati.engines import run_engine
from revati.hardware import gpu
from revati.models import build_model, load_config
from revati.workloads import parse_workload

real_perf_counter = time.perf_counter  # bound before any emulator patches `time`


class _Bare(torch.Tensor):
    """A wrapper subclass whose every op returns a new wrapper like the first argument, computing nothing."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __torch_dispatch__(func, types, args=(), kwargs=None):
        return _bare_like(args[0])


def _bare_like(t: torch.Tensor) -> torch.Tensor:
    return torch.Tensor._make_wrapper_subclass(
        _Bare, t.shape, t.stride(), 0, None, t.dtype, torch.strided, t.device
    )


class _EmptyMode(TorchDispatchMode):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.out


def _per_op(fn, n: int) -> float:
    for _ in range(200):
        fn()
    t0 = real_perf_counter()
    for _ in range(n):
        fn()
    return (real_perf_counter() - t0) / n * 1e6


def op_overhead(n: int) -> dict[str, float]:
    a = torch.randn(64, 128)
    plain = _per_op(lambda: a + a, n)
    with _EmptyMode(a):
        empty = _per_op(lambda: a + a, n)
    b = _bare_like(a)
    bare = _per_op(lambda: b + b, n)
    spec = gpu("h100")
    # "sample" (the CLI default) logs the ops of one engine step in twenty, so most ops are not logged.
    with Emulator(spec, Roofline(spec), ops="sample") as emu:
        v = torch.randn(64, 128, device="cuda")
        cached = _per_op(lambda: v + v, n)
        misses = emu.dispatcher.misses
    with Emulator(spec, Roofline(spec), ops="all"):
        v = torch.randn(64, 128, device="cuda")
        logged = _per_op(lambda: v + v, n)
    return {
        "plain_cpu_us": plain,
        "empty_mode_us": empty,
        "bare_subclass_us": bare,
        "cached_us": cached,
        "logged_us": logged,
        "misses": misses,
    }


def engine_overhead(engine: str, requests: int, layers: int | None = None) -> dict[str, float]:
    config = load_config("tiny-llama")
    config.eos_token_id = None
    if layers is not None:  # more layers: per-layer host work weighs as in a real model, compute stays tiny
        config.num_hidden_layers = layers
    work = parse_workload(f"poisson:rate=inf,n={requests},prompt=fixed(128),output=fixed(32),seed=1")
    model = build_model(config, "cpu", torch.float32)
    run_engine(engine, model, work.requests[:2])  # warm both paths' imports and caches
    t0 = real_perf_counter()
    run_engine(engine, model, work.requests)
    real = real_perf_counter() - t0
    del model
    spec = gpu("h100")
    with Emulator(spec, Roofline(spec), ops="none") as emu:
        vmodel = build_model(config, "cuda", torch.float32)
        run_engine(engine, vmodel, work.requests[:2])
        ops0 = emu.dispatcher.ops
        t0 = real_perf_counter()
        run_engine(engine, vmodel, work.requests)
        emulated = real_perf_counter() - t0
        ops = emu.dispatcher.ops - ops0
    return {"real_cpu_s": real, "emulated_s": emulated, "ops": ops}


ROOT = Path(__file__).resolve().parents[1]
GPU_RUNS = ("gen-b1-p128-timeline", "gen-b32-p1024-timeline")


def against_gpu(name: str) -> dict:
    """A shipped H100 timeline recording's serving time, and `revati emulate` of its workload here."""
    import pyarrow.parquet as pq

    run = pq.read_table(ROOT / "traces" / "h100" / name / "run").to_pylist()[0]
    recorded = json.loads(run["extra"])["serving_seconds"]
    argv = ["emulate", "--engine", run["engine"], "--model", run["model"], "--gpu", "h100"]
    argv += ["--workload", run["workload"], "--ops", "none", "--json"]
    with tempfile.TemporaryDirectory(prefix="revati-overhead-") as tmp:
        out = subprocess.run(
            [sys.executable, "-m", "revati", *argv, "--out", str(Path(tmp) / "trace")],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
    figures = json.loads(out.stdout)
    return {"workload": run["workload"], "recorded_s": recorded, "emulated_s": figures["wall_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", type=int, default=20000)
    parser.add_argument("--engine", default="hf-generate")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--no-gpu-runs", action="store_true", help="skip part 3 (two 8B emulations)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    o = op_overhead(args.ops)
    print(f"per op, elementwise add (64x128), {args.ops} calls:")
    print(f"  plain CPU op              {o['plain_cpu_us']:7.2f} us")
    print(f"  empty dispatch mode       {o['empty_mode_us']:7.2f} us")
    print(f"  bare wrapper subclass     {o['bare_subclass_us']:7.2f} us   (dispatch and one new wrapper)")
    print(f"  emulator, cached path     {o['cached_us']:7.2f} us   (signature misses: {o['misses']})")
    print(f"  same, every op logged     {o['logged_us']:7.2f} us   (--ops all)")
    print(f"  ratio cached / empty mode {o['cached_us'] / o['empty_mode_us']:7.2f}x")
    print(f"  ratio cached / bare       {o['cached_us'] / o['bare_subclass_us']:7.2f}x")
    extra = (o["bare_subclass_us"] - o["plain_cpu_us"]) * 1e-6  # what a wrapper subclass adds to each op
    for layers in (None, 16):
        e = engine_overhead(args.engine, args.requests, layers)
        name = "tiny-llama" if layers is None else f"tiny-llama with {layers} layers"
        print(f"{args.engine}, {name}, {args.requests} requests (prompt 128, output 32), all at t=0:")
        print(f"  real CPU tensors          {e['real_cpu_s']:7.3f} s")
        print(f"  emulated (virtual H100)   {e['emulated_s']:7.3f} s   ({e['ops']:,} ops, "
              f"{e['emulated_s'] / max(e['ops'], 1) * 1e6:.1f} us per op all in)")  # fmt: skip
        print(f"  ratio emulated / real     {e['emulated_s'] / e['real_cpu_s']:7.2f}x")
        # the serving code's own time plus, per op, a bare wrapper subclass's op in place of the CPU op
        floor = (e["real_cpu_s"] + e["ops"] * extra) / e["real_cpu_s"]
        print(f"  floor of any wrapper-subclass emulator  {floor:.2f}x   (real + ops x (bare - plain))")
    if args.no_gpu_runs:
        return
    for name in GPU_RUNS:
        g = against_gpu(name)
        print(f"hf-generate, Llama-3.1-8B, {g['workload']}:")
        print(f"  recorded on an H100       {g['recorded_s']:7.3f} s   (traces/h100/{name})")
        print(f"  emulated on this machine  {g['emulated_s']:7.3f} s")
        print(f"  ratio emulated / real     {g['emulated_s'] / g['recorded_s']:7.2f}x")


if __name__ == "__main__":
    main()
