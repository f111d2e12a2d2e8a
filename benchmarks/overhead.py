"""Emulator overhead, measured in one run (this machine is noisy: compare ratios, not absolute times).

1. µs per intercepted op on the cached path (an elementwise add on virtual tensors; served by the C++ hot
   path where it is built, by Python with REVATI_HOT_PATH=0) against an empty dispatch mode (a
   TorchDispatchMode that returns a ready tensor: the floor of any Python interception), against a bare
   wrapper subclass (its `__torch_dispatch__` makes one new wrapper of a fixed shape and does nothing else:
   the floor of any emulator that handles each op in Python, as Revati did before its hot path) and
   against the plain CPU op.
2. Wall time of a tiny model served by a real engine under emulation against the same engine on
   real CPU tensors (the serving code's own host time plus the tiny model's CPU kernels): hf-cb (the
   main job's engine, `make emulate`'s) and hf-generate (the leanest serving loop, where the emulator's
   cost per op weighs most), each the fastest of a few warm runs taken in turns, and the emulator's first
   run.
3. Against a real GPU: the shipped H100 recordings of hf-generate serving Llama-3.1-8B without the
   profiler (`traces/h100/gen-*-timeline`: the serving code's host time on the GPU's own machine, eager HF
   decode being host-bound), against `revati emulate` of the same workload with the shipped H100 profile
   on this machine (its wall time includes the engine's set-up and warm-up request; the recording's
   does not).

    python benchmarks/overhead.py [--ops 20000] [--engine hf-cb,hf-generate] [--requests 16] [--repeats 3]
                                  [--no-gpu-runs]
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

from replayer import hot_path
from replayer.session import Emulator
from revati.cost import Roofline
from revati.engines import engine_options, run_engine
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


def _per_op(fn, n: int, tries: int = 5) -> float:
    """µs per call of `fn`: the fastest of `tries` runs of n // tries calls (this machine's hiccups inflate
    single runs by up to half)."""
    for _ in range(200):
        fn()
    calls = max(n // tries, 1)
    best = float("inf")
    for _ in range(tries):
        t0 = real_perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, real_perf_counter() - t0)
    return best / calls * 1e6


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


def engine_overhead(engine: str, requests: int, layers: int | None = None, repeats: int = 3) -> dict:
    """Seconds to serve the workload on real CPU tensors and emulated: the fastest of `repeats` runs of each,
    taken in turns (this machine's speed drifts within a minute), after a warm one (the steady state of a
    long run); and the emulator's first run after a warm-up of two requests (its signature cache cold for
    this batch's shapes, as at the start of a run)."""
    config = load_config("tiny-llama")
    config.eos_token_id = None
    if layers is not None:  # more layers: per-layer host work weighs as in a real model, compute stays tiny
        config.num_hidden_layers = layers
    work = parse_workload(f"poisson:rate=inf,n={requests},prompt=fixed(128),output=fixed(32),seed=1")

    # hf-cb sizes its cache from free device memory (a virtual H100's: larger batches) unless told to size
    # it from the workload, as on a CPU: both runs then schedule the same steps (counted to be sure)
    options = {"size_for_workload": True} if "size_for_workload" in engine_options(engine) else {}
    steps = _Steps()

    def timed(model) -> float:
        steps.n = 0
        t0 = real_perf_counter()
        run_engine(engine, model, work.requests, observer=steps, **options)
        return real_perf_counter() - t0

    model = build_model(config, "cpu", torch.float32)
    timed(model)  # warm the real path's imports and allocator
    spec = gpu("h100")
    emu = Emulator(spec, Roofline(spec), ops="none")
    with emu:
        vmodel = build_model(config, "cuda", torch.float32)
        run_engine(engine, vmodel, work.requests[:2])
        misses0 = emu.dispatcher.misses
        cold = timed(vmodel)
        misses = emu.dispatcher.misses - misses0
        ops0 = emu.dispatcher.ops
    hits0 = hot_path.served()
    real, warm = [], []
    for _ in range(repeats):
        real.append(timed(model))
        real_steps = steps.n
        with emu:
            warm.append(timed(vmodel))
        if steps.n != real_steps:
            raise RuntimeError(f"{engine}: {steps.n} steps emulated, {real_steps} on CPU: not the same run")
    ops = (emu.dispatcher.ops - ops0) // repeats
    native = (hot_path.served() - hits0) // repeats
    return {
        "real_cpu_s": min(real), "emulated_s": min(warm), "emulated_cold_s": cold, "ops": ops,
        "misses": misses, "steps": real_steps, "in_cpp": native,
    }  # fmt: skip


class _Steps:
    """An observer that counts the engine's steps."""

    n = 0

    def iteration_start(self, phase, batch_size, tokens, kv_tokens):
        self.n += 1

    def iteration_end(self):
        pass


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
    parser.add_argument("--engine", default="hf-cb,hf-generate", help="engines, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed warm runs of each engine, each way")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--no-gpu-runs", action="store_true", help="skip part 3 (two 8B emulations)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    o = op_overhead(args.ops)
    print(f"per op, elementwise add (64x128), {args.ops} calls:")
    print(f"  plain CPU op              {o['plain_cpu_us']:7.2f} us")
    print(f"  empty dispatch mode       {o['empty_mode_us']:7.2f} us")
    print(f"  bare wrapper subclass     {o['bare_subclass_us']:7.2f} us   (dispatch and one new wrapper)")
    made = "in C++" if hot_path.makes_outputs() else "by _make_wrapper_subclass"
    print(f"  emulator, cached path     {o['cached_us']:7.2f} us   (signature misses: {o['misses']}; "
          f"outputs made {made})")  # fmt: skip
    print(f"  same, every op logged     {o['logged_us']:7.2f} us   (--ops all)")
    print(f"  ratio cached / empty mode {o['cached_us'] / o['empty_mode_us']:7.2f}x")
    print(f"  ratio cached / bare       {o['cached_us'] / o['bare_subclass_us']:7.2f}x")
    extra = (o["bare_subclass_us"] - o["plain_cpu_us"]) * 1e-6  # what a wrapper subclass adds to each op
    for engine in args.engine.split(","):
        for layers in (None, 16):
            e = engine_overhead(engine, args.requests, layers, args.repeats)
            name = "tiny-llama" if layers is None else f"tiny-llama with {layers} layers"
            print(f"{engine}, {name}, {args.requests} requests (prompt 128, output 32), all at t=0, "
                  f"fastest of {args.repeats} warm runs:")  # fmt: skip
            print(f"  real CPU tensors          {e['real_cpu_s']:7.3f} s   ({e['steps']} steps, as emulated)")
            print(f"  emulated (virtual H100)   {e['emulated_s']:7.3f} s   ({e['ops']:,} ops, "
                  f"{e['emulated_s'] / max(e['ops'], 1) * 1e6:.1f} us per op all in, "
                  f"{e['in_cpp'] / max(e['ops'], 1):.0%} served by the C++ hot path)")  # fmt: skip
            print(f"  ratio emulated / real     {e['emulated_s'] / e['real_cpu_s']:7.2f}x")
            # the serving code's own time plus, per op, a bare wrapper subclass's op in place of the CPU op
            floor = (e["real_cpu_s"] + e["ops"] * extra) / e["real_cpu_s"]
            print(f"  floor with ops in Python  {floor:.2f}x   (real + ops x (bare - plain))")
            print(f"  emulated, first run       {e['emulated_cold_s']:7.3f} s   ({e['misses']:,} signatures "
                  f"new to it): {e['emulated_cold_s'] / e['real_cpu_s']:.2f}x")  # fmt: skip
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
