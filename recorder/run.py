"""A recorded run: a real engine serving a workload on the real device (CUDA or CPU), written as a trace.

    results = record(RecordConfig(engine="hf-cb", model="tiny-llama", device="cpu"), workload, Path("runs/r"))

Capture is torch.profiler (Kineto; CUPTI on CUDA) with input shapes, for the length of each engine run.
The recorder marks the profile with `record_function` ranges: the start of serving (the origin of every
time in the trace), each engine step, and each CUDA graph capture and replay (`recorder.kineto`). After
the run, the profile is exported and parsed into `ops`, `kernels` and `iterations`; requests are written
as they complete, so a run killed midway leaves its run row (complete = false) and every request part
written so far.

Ground truth worth trusting:
- a warm-up pass of a few requests, unrecorded, runs before anything is recorded (first-call costs: CUDA
  context, cuBLAS handles, kernel loading, thread pools); inside each recorded run, what the engine does
  before serving (set-up, its own warm-up request, graph capture) is kept and marked `warmup`;
- `runs=N` records the same workload N times as separate run ids (`OUT/run-1`, ...), so run-to-run noise
  is visible;
- on the CPU, a synchronous device, an op's device time is its host time less the profiler's own cost,
  measured at start-up (`calibrate`) and stored in the run row.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import json
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from recorder import device as devices
from recorder import kineto
from revati.metrics import RequestResult, ServingMetrics, summarize
from revati.schema import TraceError, TraceWriter
from revati.scripts import Script
from revati.workloads import Request, Workload

REQUEST_FLUSH = 16  # requests buffered before a part is written (crash safety vs. work on the serving path)


@dataclass
class RecordConfig:
    """Everything a recorded run needs besides its workload."""

    engine: str = "hf-cb"
    model: str = "tiny-llama"
    device: str = "cpu"
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 on CPU
    runs: int = 1
    warmup_requests: int = 2
    seed: int = 0
    keep_profile: bool = False  # also keep the raw profile as TRACE_DIR/profile.json.gz (Perfetto opens it)
    capture: str = (
        "full"  # full: profiler (ops, kernels); timeline: requests and step times only, no profiler
    )
    options: dict = field(default_factory=dict)

    def torch_dtype(self) -> torch.dtype:
        name = self.dtype or ("bfloat16" if self.device == "cuda" else "float32")
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"--dtype {name!r}: use bfloat16, float16 or float32")
        return dtype


@dataclass
class RecordResult:
    """One recorded run and the recorder's own figures."""

    run_id: str
    trace_dir: Path
    results: list[RequestResult]
    metrics: ServingMetrics
    wall_seconds: float  # the engine run, set-up included, in real time
    serving_seconds: float  # from the first arrival's origin (t0) to the last token
    ops: int
    kernels: int
    iterations: int
    profiler_events: int
    event_overhead_us: float
    export_seconds: float  # exporting and parsing the profile, after the run
    iteration_events: dict[int, int] = field(default_factory=dict)  # profiler events inside each step


@dataclass
class Overhead:
    """The profiler's cost per recorded op event on this host, in µs (see `calibrate`)."""

    per_event_us: float  # wall time added to the run per event
    inside_us: float  # of that, the part inside the event's own measured interval


_NONE = Overhead(0.0, 0.0)


def output_dirs(out: Path, runs: int) -> list[Path]:
    """The trace directory of each run; refuses ones that already hold a trace, before anything is written."""
    dirs = [out] if runs == 1 else [out / f"run-{i + 1}" for i in range(runs)]
    for d in dirs:
        if d.is_dir() and any(d.glob("*/part-*.parquet")):
            raise TraceError(f"{d} already holds a trace; give an empty or new --out directory")
    probe = out.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise TraceError(f"--out {out}: {probe} is a file, not a directory")
    try:  # try it: permission bits do not tell root about read-only file systems
        os.rmdir(tempfile.mkdtemp(prefix=".revati-probe-", dir=probe))
    except OSError as e:
        raise TraceError(f"--out {out}: cannot write in {probe} ({e.strerror})") from None
    return dirs


def record(
    config: RecordConfig,
    workload: Workload,
    out: Path,
    model_config,
    *,
    on_result: Callable[[RequestResult], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    model=None,
) -> list[RecordResult]:
    """Record `config.runs` runs of `workload` served by `config.engine` on `config.device`, under `out`."""
    from revati.engines import run_engine
    from revati.models import build_model

    devices.check(config.device)
    if config.device == "cpu":
        devices.steady_memory()
    if config.capture not in ("full", "timeline"):
        raise ValueError(f"capture must be 'full' or 'timeline', not {config.capture!r}")
    dirs = output_dirs(out, config.runs)
    stage = on_stage or (lambda _s: None)
    torch.manual_seed(config.seed)
    if model is None:  # a model given is used as it is (its device and dtype are the caller's)
        stage("building the model")
        model = build_model(model_config, config.device, config.torch_dtype())
    if config.warmup_requests > 0:
        stage(f"warm-up pass ({config.warmup_requests} requests, not recorded)")
        run_engine(config.engine, model, _warmup(workload.requests, config.warmup_requests), **config.options)
    overhead = calibrate_model(model) if config.device == "cpu" else _NONE
    facts = devices.facts(config.device)
    results = []
    for i, trace_dir in enumerate(dirs):
        stage(f"run {i + 1} of {len(dirs)}")
        results.append(
            _record_one(config, workload, trace_dir, model, model_config, facts, overhead, on_result, stage)
        )
    return results


def _warmup(requests: list[Request], n: int) -> list[Request]:
    chosen = sorted(requests, key=lambda r: r.arrival)[:n]
    return [Request(f"warmup-{r.request_id}", 0.0, r.prompt_tokens, r.output_tokens) for r in chosen]


class Marks:
    """The observer a recorded engine run reports to: marks serving start and each step in the profile
    (`annotate`), and times them with perf_counter (what a run without the profiler keeps)."""

    def __init__(self, annotate: bool = True) -> None:
        self.annotate = annotate
        self.steps: list[dict] = []
        self.origin = 0.0
        self._times: list[list[float]] = []
        self._open: dict[int, tuple[int, record_function | None]] = {}  # by thread: the engine's step thread

    def serving_start(self) -> None:
        self.origin = time.perf_counter()
        if self.annotate:
            with record_function(kineto.MARK_SERVING):
                pass

    def iteration_start(self, phase: str, batch_size: int, tokens: int, kv_tokens: int) -> None:
        k = len(self.steps)
        self.steps.append(
            {"phase": phase, "batch_size": batch_size, "tokens": tokens, "kv_tokens": kv_tokens}
        )
        rf = None
        if self.annotate:
            rf = record_function(f"{kineto.MARK_ITERATION}{k}")
            rf.__enter__()
        self._times.append([time.perf_counter(), math.nan])
        self._open[threading.get_ident()] = (k, rf)

    def iteration_end(self) -> None:
        k, rf = self._open.pop(threading.get_ident(), (None, None))
        if k is None:
            return
        self._times[k][1] = time.perf_counter()
        if rf is not None:
            rf.__exit__(None, None, None)

    def spans(self) -> dict[int, dict]:
        """Host interval of each step from perf_counter, in seconds from serving start (no device times)."""
        return {
            k: {"host_start": t0 - self.origin, "host_end": t1 - self.origin, "device_start": None,
                "device_end": None, "events": 0}
            for k, (t0, t1) in enumerate(self._times)
            if not math.isnan(t1)
        }  # fmt: skip


class GraphMarks:
    """Marks each CUDA graph capture and replay in the profile, by wrapping torch.cuda.CUDAGraph's methods
    for the length of a recording (torch's own class; the serving code is untouched)."""

    def __init__(self) -> None:
        self._count = 0
        self._capturing: dict[int, record_function] = {}
        self._saved: dict[str, Callable] = {}

    def _gid(self, graph) -> int:
        """A graph's number, tagged on the object itself: an id() can be reused once a graph is freed."""
        gid = getattr(graph, "_revati_graph_id", None)
        if gid is None:
            gid = self._count
            self._count += 1
            graph._revati_graph_id = gid
        return gid

    def __enter__(self) -> GraphMarks:
        cls = torch.cuda.CUDAGraph
        begin, end, replay = cls.capture_begin, cls.capture_end, cls.replay
        self._saved = {"capture_begin": begin, "capture_end": end, "replay": replay}
        marks = self

        def capture_begin(graph, *args, **kwargs):
            rf = record_function(f"{kineto.MARK_CAPTURE}{marks._gid(graph)}")
            rf.__enter__()
            try:
                result = begin(graph, *args, **kwargs)
            except BaseException:  # no capture began: close its marker (callers may catch and go on)
                rf.__exit__(None, None, None)
                raise
            marks._capturing[id(graph)] = rf
            return result

        def capture_end(graph, *args, **kwargs):
            try:
                return end(graph, *args, **kwargs)
            finally:
                rf = marks._capturing.pop(id(graph), None)
                if rf is not None:
                    rf.__exit__(None, None, None)

        def replay_marked(graph, *args, **kwargs):
            with record_function(f"{kineto.MARK_REPLAY}{marks._gid(graph)}"):
                return replay(graph, *args, **kwargs)

        cls.capture_begin, cls.capture_end, cls.replay = capture_begin, capture_end, replay_marked
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(torch.cuda.CUDAGraph, name, fn)


def _graph_marks(device: str, profiled: bool):
    """CUDA graph captures and replays are marked when a CUDA run is profiled."""
    return GraphMarks() if device == "cuda" and profiled else contextlib.nullcontext()


def profiler(
    device: str, record_shapes: bool = True, trace_only: bool = True, overload_names: bool = False
) -> profile:
    """torch.profiler over every thread (engines step on their own thread) with input shapes; options a
    torch build lacks are left out (profiling then covers what it can).

    Overload names are off by default: on torch 2.13 they cost about 1.1 µs per event on top of 1.5 µs
    (tiny-llama on this project's CPU), and `kineto.composite` decides without them.
    """
    from torch._C._profiler import _ExperimentalConfig

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    wanted = {"profile_all_threads": True, "capture_overload_names": overload_names, "trace_only": trace_only}
    while True:
        try:
            config = _ExperimentalConfig(**wanted)
            break
        except TypeError:
            if not wanted:
                raise
            wanted.popitem()
    return profile(activities=activities, record_shapes=record_shapes, experimental_config=config)


def _record_one(
    config: RecordConfig,
    workload: Workload,
    trace_dir: Path,
    model,
    model_config,
    facts: dict,
    overhead: Overhead,
    on_result: Callable[[RequestResult], None] | None,
    stage: Callable[[str], None],
) -> RecordResult:
    from revati.engines import run_engine

    writer = TraceWriter(trace_dir, f"rec-{uuid.uuid4().hex[:12]}")
    run_row = _run_row(config, workload, model_config, facts, overhead)
    writer.write_run(run_row)
    pending = 0

    def completed(result: RequestResult) -> None:
        nonlocal pending
        writer.append_row("requests", result.trace_row())
        pending += 1
        if pending >= REQUEST_FLUSH:
            writer.flush()
            pending = 0
        if on_result is not None:
            on_result(result)

    full = config.capture == "full"
    marks = Marks(annotate=full)
    gc.collect()
    try:
        with (
            profiler(config.device) if full else contextlib.nullcontext() as prof,
            _graph_marks(config.device, full),
        ):
            wall0 = time.perf_counter()
            results = run_engine(
                config.engine, model, workload.requests, observer=marks, on_result=completed, **config.options
            )
            if config.device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - wall0
        export0 = time.perf_counter()
        if full:
            stage("exporting and parsing the profile")
            parsed = _parse(
                prof,
                trace_dir,
                synchronous=config.device == "cpu",
                overhead=overhead,
                keep=config.keep_profile,
            )
        else:
            parsed = kineto.Parsed(ops=[], kernels=[], iterations=marks.spans())
        export = time.perf_counter() - export0
    except BaseException:
        writer.close(complete=False)  # what was written stays readable; the run row says incomplete
        raise
    writer.append("ops", parsed.ops)
    writer.append("kernels", parsed.kernels)
    iterations = iteration_rows(marks.steps, parsed, synchronous=config.device == "cpu")
    writer.append("iterations", iterations)
    metrics = summarize(results)
    serving = max((r.token_times[-1] for r in results if r.token_times), default=0.0)
    events = sum(it["events"] for it in parsed.iterations.values())
    extra = {
        **facts["extra"],
        "wall_seconds": wall,
        "serving_seconds": serving,
        "export_seconds": export,
        "profiler_event_overhead_us": overhead.per_event_us,
        "profiler_inside_overhead_us": overhead.inside_us,
        "profiler_events_in_iterations": events,
        "graph_replays": parsed.replays,
        "unmapped_replay_kernels": parsed.unmapped_replay_kernels,
        "warmup_requests": config.warmup_requests,
        "capture": config.capture,
        "options": config.options,
        "dtype": str(config.torch_dtype()).removeprefix("torch."),
    }
    writer.write_run({**run_row, "extra": json.dumps(extra)})
    writer.close(complete=True)
    return RecordResult(
        run_id=writer.run_id,
        trace_dir=trace_dir,
        results=results,
        metrics=metrics,
        wall_seconds=wall,
        serving_seconds=serving,
        ops=len(parsed.ops),
        kernels=len(parsed.kernels),
        iterations=len(iterations),
        profiler_events=events,
        event_overhead_us=overhead.per_event_us,
        export_seconds=export,
        iteration_events={k: it["events"] for k, it in parsed.iterations.items()},
    )


def _parse(
    prof, trace_dir: Path, *, synchronous: bool, overhead: Overhead, keep: bool = False
) -> kineto.Parsed:
    """Export the profile beside the trace as a hidden temporary file, parse it, delete or gzip it."""
    fd, tmp = tempfile.mkstemp(prefix=".kineto-", suffix=".json", dir=trace_dir)
    os.close(fd)
    try:
        prof.export_chrome_trace(tmp)
        parsed = kineto.parse(
            kineto.load(tmp),
            synchronous=synchronous,
            event_overhead_us=overhead.per_event_us,
            inside_overhead_us=overhead.inside_us,
        )
        if keep:
            with open(tmp, "rb") as src, gzip.open(trace_dir / ".profile.json.gz.tmp", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(trace_dir / ".profile.json.gz.tmp", trace_dir / "profile.json.gz")
        return parsed
    finally:
        os.unlink(tmp)


def iteration_rows(steps: list[dict], parsed: kineto.Parsed, *, synchronous: bool) -> list[dict]:
    """`iterations` rows: what the engine said each step computes, with the profiled intervals."""
    rows = []
    for k, step in enumerate(steps):
        span = parsed.iterations.get(k)
        if span is None:  # a step whose marker the profile lost (cannot happen in one profiled run)
            continue
        device_start, device_end = span["device_start"], span["device_end"]
        if synchronous or device_start is None:  # the CPU, or no profile: device times are not known apart
            device_start, device_end = span["host_start"], span["host_end"]
        rows.append(
            {
                "rank": 0,
                "iteration_id": k,
                **step,
                "host_start": span["host_start"],
                "host_end": span["host_end"],
                "device_start": device_start,
                "device_end": device_end,
            }
        )
    return rows


def _run_row(config: RecordConfig, workload: Workload, model_config, facts: dict, overhead: Overhead) -> dict:
    return {
        "source": "recorded",
        "started_at": datetime.now(UTC),  # kept by the rewrites of the row at the end
        "complete": False,
        "device_kind": facts["device_kind"],
        "device_name": facts["device_name"],
        "sm_count": facts["sm_count"],
        "memory_bytes": facts["memory_bytes"],
        "torch_version": torch.__version__,
        "cuda_version": facts["cuda_version"],
        "driver_version": facts["driver_version"],
        "engine": config.engine,
        "model": config.model,
        "model_config": "{}" if model_config is None else model_config.to_json_string(use_diff=False),
        "tp": 1,
        "pp": 1,
        "workload": workload.spec,
        "host_time_mode": None,
        "profile": None,
        "extra": json.dumps({**facts["extra"], "config": asdict(config)}),
    }


def calibrate(device: str = "cpu", calls: int = 4000, repeats: int = 7) -> Overhead:
    """The profiler's cost per op event on this host, measured on a loop of small adds.

    per_event: (loop time profiled − unprofiled) / calls, each the best of `repeats` interleaved tries (noise
    only ever adds time). inside: the mean measured duration of the add with input shapes recorded less
    that without (recording inputs happens inside the op's interval).
    """
    x = torch.ones(16, device=device)

    def loop() -> float:
        t = time.perf_counter()
        for _ in range(calls):
            torch.add(x, x)
        return (time.perf_counter() - t) / calls

    def mean_add_us(p) -> float:
        adds = [e.duration_ns() for e in p.profiler.kineto_results.events() if e.name() == "aten::add"]
        return sum(adds) / max(1, len(adds)) / 1e3

    loop()
    plain, profiled, with_shapes, without = [], [], [], []
    for _ in range(repeats):
        plain.append(loop())
        with profiler("cpu", trace_only=False) as p:  # as recordings profile, less keeping no events
            profiled.append(loop())
        with_shapes.append(mean_add_us(p))
        with profiler("cpu", record_shapes=False, trace_only=False) as p:
            loop()
        without.append(mean_add_us(p))
    per_event = max(0.0, (min(profiled) - min(plain)) * 1e6)
    inside = max(0.0, min(per_event, min(with_shapes) - min(without)))
    return Overhead(per_event, inside)


def calibrate_model(model, repeats: int = 9, window: float = 0.05, tokens: int = 16) -> Overhead:
    """The profiler's cost per event on this host for this model's own ops: forwards of `tokens` tokens
    (as many as fill `window` seconds, at most 20), timed with and without the profiler (the median of
    `repeats` interleaved pairs), over the events recorded.

    A loop of one small op (`calibrate`) underestimates it: real ops record more inputs, nest, and run
    inside module calls; the inside part is still taken from `calibrate`.
    """
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    cpu = torch.autograd.DeviceType.CPU

    forwards = 1

    def forward() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for _ in range(forwards):
                model(ids)
        return time.perf_counter() - t

    forward()
    forwards = max(1, min(20, round(window / max(forward(), 1e-6))))
    with profiler(device.type, trace_only=False):  # the first profiled forward pays one-time set-up
        forward()
    plain, profiled, events = [], [], 0
    for _ in range(repeats):
        plain.append(forward())
        with profiler(device.type, trace_only=False) as p:
            profiled.append(forward())
        events = sum(1 for e in p.profiler.kineto_results.events() if e.device_type() == cpu)
    base = calibrate(device.type, calls=2000, repeats=3)
    extra = statistics.median(p - q for p, q in zip(profiled, plain, strict=True))  # paired: drift cancels
    # The small-op loop's figure is a floor: it underestimates, but a busy machine can make the paired
    # median come out at or below zero, and the profiler never costs nothing.
    per_event = max(base.per_event_us, extra / max(1, events) * 1e6)
    return Overhead(per_event, min(base.inside_us, per_event))


def record_script(argv: list[str], device: str, out: Path) -> tuple[int, Path]:
    """Run a script (`python script.py args`) under the profiler and write its ops / kernels as a trace."""
    script = Script.parse(argv, "record")
    devices.check(device)
    if device == "cpu":
        devices.steady_memory()
    output_dirs(out, 1)
    facts = devices.facts(device)
    writer = TraceWriter(out, f"rec-{uuid.uuid4().hex[:12]}")
    row = _run_row(
        RecordConfig(engine="script", model="-", device=device),
        _ScriptWorkload(script.argv),
        None,
        facts,
        _NONE,
    )
    writer.write_run(row)
    try:
        overhead = calibrate(device) if device == "cpu" else _NONE
        with profiler(device) as prof, _graph_marks(device, True):
            try:
                code = script.run()
            finally:
                if device == "cuda":
                    torch.cuda.synchronize()
        parsed = _parse(prof, out, synchronous=device == "cpu", overhead=overhead)
    except BaseException:
        writer.close(complete=False)
        raise
    writer.append("ops", parsed.ops)
    writer.append("kernels", parsed.kernels)
    extra = {**facts["extra"], "argv": script.argv, "exit_code": code}
    writer.write_run({**row, "extra": json.dumps(extra)})
    writer.close(complete=True)
    return code, out


@dataclass
class _ScriptWorkload:
    argv: list[str]

    @property
    def spec(self) -> str:
        return "script: " + " ".join(self.argv)
