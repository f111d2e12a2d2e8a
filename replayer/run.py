"""An emulated run: a real engine serving a workload on a virtual GPU, written as a trace.

result = emulate(EmulationConfig(engine="hf-cb", model="llama-3.1-8b", gpu="h100"), workload)
print(result.metrics.ttft.p50, result.virtual_seconds, result.wall_seconds)
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from replayer import distributed, hf_serve, sglang, vllm, workers
from replayer.session import Emulator
from revati.cost import CostModel
from revati.hardware import GpuSpec
from revati.metrics import RequestResult, ServingMetrics, summarize
from revati.schema import TraceWriter
from revati.scripts import Script
from revati.workloads import Workload

_real_perf_counter = time.perf_counter


# What each engine that runs in processes of its own needs, applied around its run.
_OWN_PROCESSES = {
    "sglang": sglang,
    "sglang-serve": sglang,
    "vllm": vllm,
    "vllm-serve": vllm,
    "hf-serve": hf_serve,
}


@dataclass
class EmulationConfig:
    """Everything an emulated run needs besides its workload."""

    engine: str = "hf-cb"
    model: str = "llama-3.1-8b"
    gpu: str = "h100"
    host_time: str = "deterministic"
    dtype: str = "bfloat16"
    profile: str | None = None
    ops: str = "sample"  # which op rows the trace keeps: all, sample, none
    seed: int = 0
    tp: int = 1  # tensor parallelism: symmetric ranks, one emulated in this process (replayer.distributed)
    options: dict = field(default_factory=dict)


@dataclass
class EmulationResult:
    """What an emulated run produced, with the emulator's own figures."""

    results: list[RequestResult]
    metrics: ServingMetrics
    virtual_seconds: float  # the engine run on the virtual clock, its set-up and warm-up included
    wall_seconds: float  # the same span in real time on this machine
    peak_memory: int  # virtual GPU bytes, peak allocated
    weights_memory: int  # virtual GPU bytes allocated by the model's weights
    synthesized: dict[str, int]
    ops: int
    op_signatures: int
    trace_dir: Path | None
    cost_model: str
    clock_stalls: int = 0  # times the clock moved on a real-time guess (a thread blocked where it cannot see)
    processes: int = 1  # emulated processes (an engine's own: replayer.workers), figures summed over them
    unfitted: list[str] = field(default_factory=list)  # op keys priced without a model of their own
    graphs_captured: int = 0  # CUDA graphs captured, over all processes
    graph_replays: int = 0  # and replayed (each one O(1) advance of the clock)
    hot_path_ops: int = 0  # ops served by the C++ hot path (replayer.hot_path), over all processes
    # Serving alone, from the engine's t0 (after its set-up and warm-up) to the last request's last token:
    # on the virtual clock, and in real time (None: the engine reported no t0)
    serving_virtual_seconds: float | None = None
    serving_wall_seconds: float | None = None

    @property
    def warp(self) -> float:
        """Virtual seconds served per wall second (> 1: faster than the real GPU would run)."""
        return _ratio(self.virtual_seconds, self.wall_seconds)

    @property
    def serving_warp(self) -> float | None:
        """The same over serving alone: the engine's set-up (a model built, vLLM's graphs captured) out."""
        if self.serving_virtual_seconds is None or self.serving_wall_seconds is None:
            return None
        return _ratio(self.serving_virtual_seconds, self.serving_wall_seconds)


def _ratio(virtual: float, wall: float) -> float:
    return virtual / wall if wall > 0 else float("inf")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use bfloat16, float16 or float32")
    return dtype


def special_tokens(config) -> set[int]:
    """Token ids the oracle must never produce: EOS, BOS, PAD of a model config."""
    ids: set[int] = set()
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def emulate(
    config: EmulationConfig,
    workload: Workload,
    spec: GpuSpec,
    cost: CostModel,
    model_config,
    *,
    out: Path | None = None,
    on_result: Callable[[RequestResult], None] | None = None,
    on_model: Callable[[int], None] | None = None,
) -> EmulationResult:
    """Serve `workload` with `config.engine` on a virtual `spec` GPU priced by `cost`; trace to `out`."""
    from revati.engines import OWN_MODEL, engine_options, run_engine
    from revati.models import param_bytes

    options = dict(config.options)
    if spec.key == "cpu" and "size_for_workload" in engine_options(config.engine):
        options.setdefault("size_for_workload", True)  # serve as the recorded CPU did, not from "free memory"
    own_model = config.engine in OWN_MODEL  # built by the engine, in a process of its own
    processes = contextlib.nullcontext()
    if own_model:
        if config.tp > 1:
            raise ValueError(
                f"engine {config.engine!r} is emulated at tensor parallelism 1 only, not {config.tp}"
            )
        needs = _OWN_PROCESSES[config.engine]  # what the engine needs to run GPU-free
        options = {**needs.EMULATED, "dtype": config.dtype, **options}
        processes = needs.environment(spec.key, config.profile, config.host_time)

    emu = Emulator(
        spec,
        cost,
        host_time=config.host_time,
        ops=config.ops if out is not None else "none",
        special_tokens=special_tokens(model_config),
        seed=config.seed,
    )
    started = time.time()
    writer = None
    with processes as results_dir, emu, _tp_world(config.tp, spec, init=True):
        if own_model:  # the weights live in the engine's scheduler process: their size as computed
            workers.join(emu)
            model = model_config
            weights = param_bytes(model_config, _dtype(config.dtype))
        else:
            model = _build(emu, model_config, _dtype(config.dtype), config.tp)
            weights = emu.allocator.allocated
        if on_model is not None:
            on_model(weights)
        if out is not None:  # opened once the weights fit: a model that cannot load leaves no trace behind
            writer = TraceWriter(out, f"emu-{uuid.uuid4().hex[:12]}")
            run_row = _run_row(emu, config, workload, model_config, started)
            writer.write_run(run_row)
            emu.ops_sink = lambda: writer.append("ops", emu.take_op_rows())
        last_result = [None]  # real time of the last request's completion

        def finished(result: RequestResult) -> None:
            last_result[0] = _real_perf_counter()
            if on_result is not None:
                on_result(result)

        try:
            wall0 = _real_perf_counter()
            clock0 = emu.clock.read()
            results = run_engine(
                config.engine, model, workload.requests, observer=emu, on_result=finished, **options
            )
            torch.cuda.synchronize()
            wall = _real_perf_counter() - wall0
            virtual = emu.clock.read() - clock0
        except BaseException:
            if writer is not None:  # what was written stays readable; the run row says it is incomplete
                writer.append("iterations", emu.iteration_rows())
                writer.close(complete=False)
            raise
        del model
        children = workers.children(results_dir) if own_model else []
        shared_stalls = emu.clock.tree.total_stalls() if emu.clock.tree is not None else 0
    metrics = summarize(results)
    synthesized = Counter(emu.synthesized())
    for child in children:
        synthesized.update(child["synthesized"])
    result = EmulationResult(
        results=results,
        metrics=metrics,
        virtual_seconds=virtual,
        wall_seconds=wall,
        peak_memory=max([emu.allocator.peak] + [c["peak_memory"] for c in children]),
        weights_memory=weights,
        synthesized=dict(synthesized),
        ops=emu.dispatcher.ops + sum(c["ops"] for c in children),
        op_signatures=len(emu.dispatcher.signatures) + sum(c["op_signatures"] for c in children),
        trace_dir=out,
        cost_model=cost.describe(),
        clock_stalls=emu.clock.stalls + sum(c["clock_stalls"] for c in children) + shared_stalls,
        processes=1 + len(children),
        unfitted=sorted(set(emu.dispatcher.unfitted).union(*(c.get("unfitted", []) for c in children))),
        graphs_captured=emu.graphs_captured + sum(c.get("graphs_captured", 0) for c in children),
        graph_replays=emu.graph_replays + sum(c.get("graph_replays", 0) for c in children),
        hot_path_ops=emu.hot_path_ops() + sum(c.get("hot_path_ops", 0) for c in children),
        **_serving_span(results, emu.origin_wall, last_result[0]),
    )
    if writer is not None:
        writer.append("ops", emu.take_op_rows())
        writer.append("iterations", emu.iteration_rows())
        writer.append("requests", [r.trace_row() for r in result.results])
        extra = {
            "cost_model": result.cost_model,
            "virtual_seconds": result.virtual_seconds,
            "wall_seconds": result.wall_seconds,
            "peak_memory": result.peak_memory,
            "synthesized": result.synthesized,
            "clock_stalls": result.clock_stalls,
            "processes": result.processes,
            "unfitted": result.unfitted,
            "graphs_captured": result.graphs_captured,
            "graph_replays": result.graph_replays,
            "serving_virtual_seconds": result.serving_virtual_seconds,
            "serving_wall_seconds": result.serving_wall_seconds,
            "serving_origin": emu.origin,
            "options": options,  # as served: with what the emulated device added (size_for_workload)
            "wall_leak_us": emu.clock.leak * 1e6,
        }
        writer.write_run({**run_row, "extra": json.dumps(extra)})
        writer.close(complete=True)
    return result


def _serving_span(results: list[RequestResult], origin_wall: float | None, last_wall: float | None) -> dict:
    """Serving alone: from t0 to the last token, virtual (request times count from t0) and real."""
    if origin_wall is None or last_wall is None or not results:
        return {}
    last = max(r.token_times[-1] for r in results if r.token_times)
    return {"serving_virtual_seconds": last, "serving_wall_seconds": last_wall - origin_wall}


@contextlib.contextmanager
def _tp_world(tp: int, spec: GpuSpec, init: bool):
    """`tp` symmetric ranks, this process being rank 0 (torchrun's variables set for the code that reads
    them); `init`: start the torch.distributed world here (an engine run) rather than leave it to a script."""
    if tp <= 1:
        yield
        return
    import torch.distributed as dist

    # kept: the overhead benchmark's switches (price, coordinate); counters start over
    before = distributed.topology()
    distributed.set_topology(
        replace(
            before, world_size=tp, symmetric=True, gpus_per_node=spec.gpus_per_node,
            collectives=0, waited=0.0,
        )
    )  # fmt: skip
    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(tp))
    try:
        if init:
            dist.init_process_group("nccl")  # the revati backend under emulation, on a local store
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        distributed.set_topology(before)


def _build(emu: Emulator, model_config, dtype: torch.dtype, tp: int):
    """The model on the virtual GPU; sharded by transformers' tensor parallelism when tp > 1. Sharding
    starts from the whole model, which need not fit one GPU: memory is checked once it is sharded."""
    from revati.models import build_model

    if tp <= 1:
        return build_model(model_config, "cuda", dtype)
    with emu.allocator.unbounded():
        model = build_model(model_config, "cuda", dtype, tp=tp)
    emu.allocator.check(f"one rank's shard of the weights at tensor parallelism {tp}")
    return model


def _run_row(
    emu: Emulator, config: EmulationConfig, workload: Workload, model_config, started: float
) -> dict:
    spec = emu.gpu
    return {
        "source": "emulated",
        "started_at": _utc(started),
        "complete": False,
        "device_kind": spec.key,
        "device_name": spec.name,
        "sm_count": spec.sm_count,
        "memory_bytes": spec.memory_bytes,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "driver_version": None,
        "engine": config.engine,
        "model": config.model,
        "model_config": model_config.to_json_string(use_diff=False),
        "tp": config.tp,
        "pp": 1,
        "workload": workload.spec,
        "host_time_mode": config.host_time,
        "profile": config.profile,
        "extra": json.dumps(
            {
                "cost_model": emu.cost.describe(),
                "options": config.options,
            }
        ),
    }


def _utc(ts: float):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, tz=UTC)


def emulate_script(
    argv: list[str], spec: GpuSpec, cost: CostModel, host_time: str, tp: int = 1
) -> tuple[int, Emulator]:
    """Run a script (`python script.py args` or `script.py args`) under emulation, like `coverage run`; with
    tp > 1 it runs as rank 0 of `tp` symmetric ranks (`init_process_group` needs no other process)."""
    script = Script.parse(argv, "emulate")
    emu = Emulator(spec, cost, host_time=host_time, ops="none")
    with _tp_world(tp, spec, init=False), emu:
        code = script.run()
    return code, emu
