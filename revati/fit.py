"""Fit: per-op duration models from recorded traces, written as a profile (`revati.profile`).

The unit of fitting is the op *signature* (key, input shapes, dtypes, scalars): op rows of one signature
are one point, their mean duration the target and their count its weight. Signatures are few (thousands
where rows are millions), so fitting is quick, and a noisy single timing (a CPU op preempted) weighs in
only through its signature's mean.

Per (op key, dtype), candidate forms (`revati.profile`) are fitted with statsmodels for relative error
(WLS with weights count / y², or OLS on logs) and the one with the smallest cross-validated error wins;
folds hold out whole signatures, so the error is that of shapes the form has not seen. A key with fewer
than `MIN_SIGNATURES` signatures gets its family's pooled model, scaled to its own measurements.

Held-out check: a fraction of the engine steps (iterations) is set aside before fitting. The headline is
the time-weighted error of predicted against measured device time per held-out step:
sum |predicted - measured| / sum measured. Single op timings are noisy; steps are what the clock adds.

Host time: per key, the mean host time from one op's start to the next op's start (the op's own issue
cost plus the serving code that follows it), less the profiler's calibrated cost on a CPU recording, less
the op's own device time on a synchronous device, less waits for the device; gaps far above their key's
median are stalls (idle between requests, profiler flushes) and count as the median. Where a timeline twin
(the same run without the profiler) is given, the profiler's remaining slow-down of the host is divided out.
On a synchronous device, host time may also grow with the requests in the step (`_host_per_request`).

Wake-up (synchronous devices): the first step after the engine sat idle runs cold. Its ops are fitted at
their warm times (`_cold`: divided by how much slower the same signatures ran cold than warm), and the
profile's wake factor (`_wake_factor`) says how much slower such a step runs; the held-out check and the
emulator apply it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import statsmodels.api as sm

from revati.cost import GRAPH_INSTANTIATE, IDLE_GAP
from revati.op_features import Features, launches_kernel, op_family, row_features
from revati.profile import PROFILE_VERSION, OpModel, Profile
from revati.schema import read_table

MIN_SIGNATURES = 3  # fewer and a key borrows its family's pooled model
FOLDS = 5
_MIN_HOST_ROWS = 20  # rows of a key an engine needs for host costs of its own
_STALL = 20  # a host gap this many times its op's median is a stall (`_drop_stalls`)
# Ops whose host time includes waiting for the device (a read back to the host): the clock models the wait
_SYNC_KEYS = {
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::_to_copy",
    "aten::copy_",
    "aten::equal",
    "aten::is_nonzero",
    "aten::nonzero",
    "aten::masked_select",
    "aten::unique",
    "aten::_unique2",
}
_PRIMARY = ("flops", "bytes", "numel")  # the features linear regressions may use
_SHAPES = {
    "matmul": ("m", "n", "k"),
    "attention": ("batch", "heads", "q_len", "kv_len", "head_dim"),
    "collective": ("bytes", "group_size"),
}
# The axis a 'table' model interpolates along, and the features that must match (module doc of profile)
_AXIS = {
    "matmul": ("m", ("n", "k", "batch")),
    "attention": ("flops", ("heads", "kv_heads", "head_dim", "causal")),
    "collective": ("bytes", ("group_size", "nodes")),
}
_DEFAULT_AXIS = ("bytes", ())

Progress = Callable[[str, int, int], None]


class FitError(ValueError):
    """Traces that cannot be fitted: none, empty, or of different devices."""


@dataclass
class KeyReport:
    """How the model of one (key, dtype) did: what `revati fit` prints per row."""

    key: str
    dtype: str
    form: str
    features: tuple[str, ...]
    samples: int
    signatures: int
    cv_error: float | None
    holdout_median: float | None
    holdout_p90: float | None
    time_share: float


@dataclass
class FitResult:
    """A fitted profile and the held-out evaluation that goes with it."""

    profile: Profile
    keys: list[KeyReport]
    holdout_iterations: int
    device_error: float | None  # time-weighted held-out error per step (the headline)
    host_error: float | None  # the same for host time per step
    rows: int
    signatures: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """Everything as plain JSON-able values (for `revati fit --json`)."""
        return {
            "profile": self.profile.path,
            "device": self.profile.device.get("name"),
            "rows": self.rows,
            "signatures": self.signatures,
            "holdout_iterations": self.holdout_iterations,
            "device_error": self.device_error,
            "host_error": self.host_error,
            "seconds": self.seconds,
            "notes": self.notes,
            "keys": [vars(k) | {"features": list(k.features)} for k in self.keys],
        }


# --- reading -----------------------------------------------------------------------------------------


@dataclass
class _Data:
    """Op rows as arrays, signatures as lists: what the fitting works on."""

    runs: list[dict]
    sig: np.ndarray  # per row: signature index
    device: np.ndarray  # per row: measured device seconds
    host: np.ndarray  # per row: host seconds to the next op (nan where unknown)
    step: np.ndarray  # per row: step index (-1 outside steps)
    graph: np.ndarray  # per row: a CUDA-graph replay (no host cost of its own)
    captured: np.ndarray  # per row: launched while a graph was captured (host cost, nothing on the device)
    keys: list[str]  # per signature
    dtypes: list[str]
    features: list[Features]
    exact: list[bool]
    steps: int
    step_host: np.ndarray  # per step: measured host span, profiler cost removed
    host_scales: dict[str, float]  # per run: the profiler's host slow-down removed (timeline twins)
    engine: np.ndarray  # per row: the serving engine of its run, as an index into engine_names
    engine_names: list[str]
    own: np.ndarray  # per row: host seconds of the op's own call (waits and stalls out; 0 on a CPU)
    key_names: list[str]  # distinct op keys, sorted
    key_of_sig: np.ndarray  # per signature: its key's index in key_names (integers sort fast)
    step_idle: np.ndarray  # per step: it began after the engine sat idle (IDLE_GAP without a step)
    wake_twin: float  # the timeline twins' wake-up slow-down beyond the profiled runs' (`_wake_twin`)
    cold: float  # how much slower an op ran in a wake-up step than the same op in a busy one (`_cold`)
    batch: np.ndarray  # per row: the requests in its engine step (0 outside steps)
    run: np.ndarray  # per row: its run, as an index
    instantiate: float | None  # host seconds per kernel node to end a graph capture (`_instantiate`)


# Named steps of the reading query: op rows that ran while serving, their signatures, the engine steps.
_SQL = {
    "ops": """
        create temp table ops as
        select *, coalesce(scalars, '') as scalars_key from ops_table
        where not warmup
    """,
    "signatures": """
        create temp table signatures as
        select name, input_shapes, dtypes, scalars_key, any_value(scalars) as scalars,
               (row_number() over (order by name, input_shapes, dtypes, scalars_key)) - 1 as sig
        from ops group by name, input_shapes, dtypes, scalars_key  -- numbered in order: fits are repeatable
    """,
    "steps": """
        create temp table steps as
        select run_id, iteration_id, host_start, host_end,
               (row_number() over (order by run_id, iteration_id)) - 1 as step
        from iterations_table
    """,
    "rows": """
        select s.sig, dense_rank() over (order by o.run_id) - 1 as run_index,
               o.device_duration, o.in_graph and o.parent_id is not null as replay,
               o.in_graph and o.parent_id is null as captured, coalesce(st.step, -1) as step,
               o.host_duration, o.host_start,
               -- host time from this op's start to the next op's start (the run's last op: its step's end)
               coalesce(lead(o.host_start) over w, st.host_end) - o.host_start as gap
        from ops o
        join signatures s using (name, input_shapes, dtypes, scalars_key)
        left join steps st on st.run_id = o.run_id and st.iteration_id = o.iteration_id
        -- a CUDA-graph replay's rows sit at the graph's launch: the op before it ends there
        window w as (partition by o.run_id order by o.host_start, o.op_id)
        order by o.run_id, o.rank, o.op_id
    """,
    "signature_list": "select name, input_shapes, dtypes, scalars from signatures order by sig",
    "run_list": "select distinct run_id from ops order by run_id",  # the names of `run_index`
    "step_spans": """
        select st.run_id, st.host_end - st.host_start as span, i.phase, i.tokens, i.kv_tokens, i.batch_size,
               coalesce(st.host_start - lag(st.host_end) over (partition by st.run_id order by st.step), 0)
                   as idle_before
        from steps st join iterations_table i using (run_id, iteration_id) order by st.step
    """,
}


def _read(paths: Iterable[str | Path], progress: Progress) -> _Data:
    paths = [str(p) for p in paths]
    if not paths:
        raise FitError("no traces given: pass the directories `revati record` wrote")
    runs, ops_parts, step_parts, sources, timelines, requests = [], [], [], [], [], []
    for i, path in enumerate(paths):
        progress("reading traces", i, len(paths))
        run = read_table(path, "run")
        if run.num_rows == 0:
            raise FitError(f"{path}: the trace has no run row; was the recording cut short?")
        if "emulated" in run.column("source").to_pylist():
            raise FitError(
                f"{path}: an emulated trace (its times are predictions); fit on recorded traces only"
            )
        ops = read_table(path, "ops")
        if ops.num_rows == 0:
            steps = read_table(path, "iterations")
            if steps.num_rows == 0:
                raise FitError(f"{path}: the trace has no op rows and no engine steps; nothing to fit")
            timelines.append((path, run.to_pylist(), steps))  # a timeline twin: step times without profiler
            continue
        for row in run.to_pylist():
            runs.append(row)
            sources.append(path)
        ops_parts.append(ops)
        step_parts.append(read_table(path, "iterations"))
        requests.append(read_table(path, "requests"))
    if not runs:
        raise FitError(
            f"{', '.join(paths)}: only timeline traces (`--capture timeline`, no op rows); nothing to fit. "
            "Pass full recordings, with their timeline twins if you have them"
        )
    _check_one_device(
        runs + [r for _, rows, _ in timelines for r in rows],
        sources + [p for p, rows, _ in timelines for _ in rows],
    )
    progress("reading traces", len(paths), len(paths))
    ops_table = pa.concat_tables(ops_parts)  # noqa: F841 - read by DuckDB by name
    iterations_table = pa.concat_tables(step_parts)  # noqa: F841
    con = duckdb.connect()
    for name in ("ops", "signatures", "steps"):
        con.execute(_SQL[name])
    result = con.execute(_SQL["rows"]).fetchnumpy()
    sigs = con.execute(_SQL["signature_list"]).fetchall()
    run_names = [r for (r,) in con.execute(_SQL["run_list"]).fetchall()]
    step_table = con.execute(_SQL["step_spans"]).fetchnumpy()
    spans = np.asarray(step_table["span"], dtype=np.float64)
    if len(result["sig"]) == 0:
        raise FitError(f"{', '.join(paths)}: every op row is a warm-up row; nothing recorded while serving")
    fallback_dtype = _run_dtype(runs)
    keys, dtypes, features, exact = [], [], [], []
    for i, (name, shapes, types, scalars) in enumerate(sigs):
        if i % 256 == 0:
            progress("op features", i, len(sigs))
        types = tuple(fallback_dtype if t == "unknown" else t for t in types)
        f, ok = row_features(name, tuple(tuple(s) for s in shapes), types, scalars)
        keys.append(name)
        dtypes.append(types[0] if types else "")
        features.append(f)
        exact.append(ok)
    progress("op features", len(sigs), len(sigs))
    sig = result["sig"].astype(np.int64)
    device = np.asarray(result["device_duration"], dtype=np.float64)
    step = result["step"].astype(np.int64)
    gap = np.asarray(result["gap"], dtype=np.float64)
    host_duration = np.asarray(result["host_duration"], dtype=np.float64)
    graph = np.asarray(result["replay"], dtype=bool)
    captured = np.asarray(result["captured"], dtype=bool)
    run_index = np.asarray(result["run_index"], dtype=np.int64)  # ints: comparing a million strings is slow
    run_ids = _Runs(run_names, run_index)
    profiler_cost = _profiler_cost(runs, run_ids, host_duration, device)
    synchronous = _synchronous(runs)
    host = gap - profiler_cost - (device if synchronous else 0.0)
    host[graph] = np.nan
    n_steps = len(spans)
    inside = step >= 0
    step_host = spans - np.bincount(step[inside], weights=profiler_cost[inside], minlength=n_steps)
    starts = np.asarray(result["host_start"], dtype=np.float64)
    host -= _idle_overlap(run_ids, starts + host_duration, starts + gap, requests)
    key_names, key_of_sig = np.unique(np.array(keys, dtype=object), return_inverse=True)
    # the op's own call (what `wall` mode adds per op; the serving code between ops it measures itself)
    own = np.zeros(len(host)) if synchronous else host_duration.copy()
    launching = np.array([launches_kernel(k) for k in keys], dtype=bool)[sig]
    instantiate = _instantiate(captured, gap, host_duration, launching)
    if not synchronous:
        before = host.copy()
        key_ids = key_of_sig[sig]
        _drop_waits(host, host_duration, key_ids, key_names)
        stalls = _drop_stalls(host, host_duration, key_ids)
        step_host -= np.bincount(step[inside], weights=stalls[inside], minlength=n_steps)
        own = np.maximum(own - np.nan_to_num(before - host), 0.0)
    own[graph] = np.nan
    step_idle = np.asarray(step_table["idle_before"], dtype=np.float64) > IDLE_GAP
    cold = _cold(sig, device, step, step_idle, len(keys)) if synchronous else 1.0
    # the models keep warm times; the profile's wake factor puts the cold back (`_wake_factor`)
    if cold != 1.0:
        device[inside & step_idle[np.maximum(step, 0)]] /= cold
    replaying = {run_names[i] for i in np.unique(run_index[graph])} if graph.any() else set()
    scales = _host_scales([r for r in runs if r["run_id"] not in replaying], step_table, step_host, timelines)
    if scales:
        host *= run_ids.each(scales, 1.0)
        own *= run_ids.each(scales, 1.0)
        step_host *= np.array([scales.get(r, 1.0) for r in step_table["run_id"]])
        if synchronous:  # the profiler slows the device too when the device is the host's CPU
            device = device * run_ids.each(scales, 1.0)
    engine_names = sorted({r["engine"] for r in runs})
    engine_of = {r["run_id"]: engine_names.index(r["engine"]) for r in runs}
    return _Data(
        runs,
        sig,
        device,
        host,
        step,
        graph,
        captured,
        keys,
        dtypes,
        features,
        exact,
        n_steps,
        step_host,
        scales,
        run_ids.each(engine_of, 0).astype(np.int64),
        engine_names,
        own,
        [str(k) for k in key_names],
        key_of_sig,
        step_idle,
        _wake_twin(runs, step_table, step_host, timelines) if synchronous else 1.0,
        cold,
        np.where(inside, np.asarray(step_table["batch_size"], dtype=np.float64)[np.maximum(step, 0)], 0.0),
        run_index,
        instantiate,
    )


@dataclass
class _Runs:
    """Which run each op row belongs to, as an index into the runs' names."""

    names: list[str]
    index: np.ndarray

    def each(self, per_run: dict, default) -> np.ndarray:
        """A value per row from a value per run id."""
        return np.array([per_run.get(r, default) for r in self.names])[self.index]

    def rows_of(self, run_id: str) -> np.ndarray:
        if run_id not in self.names:
            return np.zeros(len(self.index), dtype=bool)
        return self.index == self.names.index(run_id)


def _instantiate(
    captured: np.ndarray, gap: np.ndarray, host_duration: np.ndarray, launching: np.ndarray
) -> float | None:
    """Host seconds per kernel node to end a CUDA graph capture (cudaStreamEndCapture and
    cudaGraphInstantiate run inside `capture_end`, where no op is recorded): after each run of captured op
    rows, the time to the next op beyond the usual time between ops, over the kernels captured. None when
    nothing was captured while serving (measured on the H200: 11 ms after each capture of 1,497 kernels)."""
    if not captured.any():
        return None
    after = gap - host_duration
    usual = float(np.median(after[~captured])) if (~captured).any() else 0.0
    ends = captured & ~np.r_[captured[1:], False]  # the last captured row of each capture
    starts = captured & ~np.r_[False, captured[:-1]]
    block = np.cumsum(starts) - 1  # each captured row's capture, in order
    nodes = np.bincount(block[captured], weights=launching[captured].astype(np.float64))
    extra = np.nan_to_num(after[ends] - usual)
    if nodes.sum() <= 0:
        return None
    return max(float(np.sum(extra) / nodes.sum()), 0.0)


def _twin_key(run: dict) -> tuple:
    """What a run and its timeline twin share: engine, model, workload and engine options."""
    options = json.dumps(_extra(run).get("options") or {}, sort_keys=True)
    return run["engine"], run["model"], run["workload"], options


def _host_scales(runs: list[dict], steps: dict, step_host: np.ndarray, timelines: list) -> dict[str, float]:
    """Per run, how much the profiler slowed the host: median decode step of a timeline twin (same
    engine, model and workload, recorded without the profiler) over the run's own; runs without a twin
    take the mean over their engine's twins (same options). On a synchronous device (a CPU), where runs
    without a twin are left alone, the
    profiler's slow-down beyond its calibrated cost covers every step alike (measured: 1.2-1.5x from
    decode to 512-token prefill), so the ratio is taken over all steps, like with like (`_step_ratio`).
    Runs that replay CUDA graphs are left alone (a replayed step's span is not host work)."""
    if not timelines:
        return {}
    if _synchronous(runs):
        return _synchronous_scales(runs, steps, step_host, timelines)

    def median_step(spans: np.ndarray, phases: np.ndarray) -> float | None:
        decode = spans[phases == "decode"]
        chosen = decode if decode.size else spans
        return float(np.median(chosen)) if chosen.size else None

    unprofiled: dict[tuple, float] = {}
    for _, rows, table in timelines:
        spans = np.asarray(table["host_end"]) - np.asarray(table["host_start"])
        value = median_step(spans, np.asarray(table["phase"]))
        for row in rows:
            if value:
                unprofiled[_twin_key(row)] = value
    scales: dict[str, float] = {}
    for run in runs:
        twin = unprofiled.get(_twin_key(run))
        mine = np.asarray(steps["run_id"]) == run["run_id"]
        profiled = median_step(step_host[mine], np.asarray(steps["phase"])[mine])
        if twin and profiled:
            scales[run["run_id"]] = min(1.0, twin / profiled)
    by_engine: dict[tuple, list[float]] = {}
    for run in runs:
        if run["run_id"] in scales:
            by_engine.setdefault(_twin_key(run)[::3], []).append(scales[run["run_id"]])
    everything = [v for values in by_engine.values() for v in values]
    for run in runs:
        if run["run_id"] not in scales and everything:
            scales[run["run_id"]] = float(np.mean(by_engine.get(_twin_key(run)[::3], everything)))
    return scales


def _twin_steps(table: pa.Table) -> list[dict[str, np.ndarray]]:
    """A timeline trace's steps, one dict of columns per run, in step order, with `idle` (the step began
    after IDLE_GAP without one) and `span`."""
    runs = []
    for run_id in sorted(set(table["run_id"].to_pylist())):
        mine = table.filter(pa.compute.equal(table["run_id"], run_id)).sort_by("iteration_id")
        steps = {c: mine[c].to_numpy(zero_copy_only=False) for c in mine.column_names}
        start, end = steps["host_start"], steps["host_end"]
        steps["idle"] = np.r_[False, start[1:] - end[:-1] > IDLE_GAP]
        steps["span"] = end - start
        runs.append(steps)
    return runs


def _wake_twin(runs: list[dict], steps: dict, spans: np.ndarray, timelines: list) -> float:
    """How much more a wake-up step (the first after idle) is slowed without the profiler than with it.

    The same step (phase, batch, tokens, KV tokens) is found in a run and in its timeline twin; the twin
    over the run, for steps that woke up on both sides, over the same for steps that did not. The
    profiler's own activity may keep the CPU warmer while the engine waits, so a profiled run could show
    only part of the wake-up cost. `spans` are the run's step times with the profiler's cost and slow-down
    taken out: raw spans would count the profiler's smaller share of a (wake-up) prefill than of a (busy)
    decode step as a wake-up cost (they said 1.11 on small-llama hf-cb where like-for-like says 1.01).
    1.0 with fewer than 3 wake-up steps matched."""
    woke, busy = [], []
    keys = ("phase", "batch_size", "tokens", "kv_tokens")
    columns = [np.asarray(steps[c]) for c in keys]
    run_ids = np.asarray(steps["run_id"])
    all_idle = np.asarray(steps["idle_before"]) > IDLE_GAP
    for _, rows, table in timelines:
        twins = [r for r in runs if any(_twin_key(r) == _twin_key(row) for row in rows)]
        for twin in _twin_steps(table) if twins else []:
            first = {}
            for i, step in enumerate(zip(*(twin[c] for c in keys), strict=True)):
                first.setdefault(step, i)
            for run in twins:
                seen = set()
                for row in np.flatnonzero(run_ids == run["run_id"]):
                    step = tuple(c[row] for c in columns)
                    i = first.get(step)
                    if i is None or step in seen or spans[row] <= 0 or twin["span"][i] <= 0:
                        continue
                    seen.add(step)
                    if all_idle[row] == twin["idle"][i]:
                        (woke if all_idle[row] else busy).append(twin["span"][i] / spans[row])
    if len(woke) < 3 or not busy:
        return 1.0
    return float(np.median(woke) / np.median(busy))


def _cold(sig: np.ndarray, device: np.ndarray, step: np.ndarray, idle: np.ndarray, n_sigs: int) -> float:
    """How much slower an op runs in a wake-up step (the first after idle) than the same op (same
    signature) in a busy step: their mean times, weighted by the wake-up rows' count; 1.0 with fewer than 3
    signatures seen both ways.

    On a CPU the first step after idle runs cold (caches, clocks), and shapes seen only in such steps (a
    prefill's token count) would otherwise be fitted cold, and priced cold again by the wake factor: a
    profile whose recording idled between prefills then predicts a prefill from a mix of cold and warm
    neighbours (measured: ops 1.35x slower in wake-up steps of small-llama hf-cb)."""
    rows = (step >= 0) & (device > 0)
    woke = rows & idle[np.maximum(step, 0)]
    busy = rows & ~woke
    counts_woke = np.bincount(sig[woke], minlength=n_sigs)
    counts_busy = np.bincount(sig[busy], minlength=n_sigs)
    both = (counts_woke > 0) & (counts_busy > 0)
    if both.sum() < 3:
        return 1.0
    mean_woke = np.bincount(sig[woke], weights=device[woke], minlength=n_sigs)[both] / counts_woke[both]
    mean_busy = np.bincount(sig[busy], weights=device[busy], minlength=n_sigs)[both] / counts_busy[both]
    ratio = np.sum(counts_woke[both] * mean_woke) / np.sum(counts_woke[both] * mean_busy)
    return float(np.clip(ratio, 1.0, 3.0))


def _step_kinds(phases, tokens, kv_tokens) -> np.ndarray:
    """A step's kind for matching a run with its twin: phase, and tokens and KV tokens in powers of two."""
    bins = np.floor(np.log2(np.maximum(np.asarray(tokens, dtype=np.float64), 1.0))).astype(np.int64)
    kv = np.floor(np.log2(np.maximum(np.asarray(kv_tokens, dtype=np.float64), 1.0))).astype(np.int64)
    return np.array([f"{p}/{t}/{k}" for p, t, k in zip(phases, bins, kv, strict=True)])


def _step_ratio(
    spans: np.ndarray, kinds: np.ndarray, twin_spans: np.ndarray, twin_kinds: np.ndarray
) -> float | None:
    """Twin over run, step time weighted: for each kind of step both ran, the run's count of it times
    each side's median span; None when they share no kind of step."""
    numerator = denominator = 0.0
    for kind in np.intersect1d(kinds, twin_kinds):
        mine = spans[kinds == kind]
        numerator += mine.size * float(np.median(twin_spans[twin_kinds == kind]))
        denominator += mine.size * float(np.median(mine))
    return numerator / denominator if denominator > 0 else None


def _synchronous_scales(runs: list[dict], steps: dict, step_host: np.ndarray, timelines: list) -> dict:
    """Per run on a synchronous device: its twins' step time over its own, like steps with like
    (`_step_ratio`), the twins of one key pooled; at most 1. Runs without a twin keep their times."""
    twins: dict[tuple, list] = {}  # twins of one key pool their steps: repeated recordings average drift
    for _, rows, table in timelines:
        for key in {_twin_key(row) for row in rows}:
            for twin in _twin_steps(table):
                kinds = _step_kinds(twin["phase"], twin["tokens"], twin["kv_tokens"])
                twins.setdefault(key, []).append((twin["span"], kinds))
    kinds = _step_kinds(steps["phase"], steps["tokens"], steps["kv_tokens"])
    scales = {}
    for run in runs:
        twin = twins.get(_twin_key(run))
        mine = np.asarray(steps["run_id"]) == run["run_id"]
        pooled = [np.concatenate(parts) for parts in zip(*twin, strict=True)] if twin else None
        ratio = _step_ratio(step_host[mine], kinds[mine], *pooled) if pooled else None
        if ratio:
            scales[run["run_id"]] = min(1.0, ratio)
    return scales


def _drop_waits(host: np.ndarray, host_duration: np.ndarray, key_ids: np.ndarray, names: np.ndarray) -> None:
    """An op that can wait for the device (a read back to the host) keeps, of its own duration, only what
    it takes when it does not wait (its 10th percentile): the emulator's clock adds the waits itself."""
    for code in (i for i, name in enumerate(names) if name in _SYNC_KEYS):
        mine = key_ids == code
        own = float(np.quantile(host_duration[mine], 0.1)) if mine.any() else 0.0
        host[mine] = host[mine] - host_duration[mine] + np.minimum(host_duration[mine], own)


def _drop_stalls(host: np.ndarray, own: np.ndarray, key: np.ndarray) -> np.ndarray:
    """An op whose own duration is over `_STALL` times its key's median (and over 1 ms) stalled inside:
    the profiler flushing its buffers (97 ms in the first attention of every hf-cb step on the H100), or a
    wait for the device inside the op. The excess is taken out of its host time and returned per row (for
    the step's span). Time after an op (the serving code's own work) is never a stall."""
    removed = np.zeros(len(host))
    ok = np.isfinite(host)
    if not ok.any():
        return removed
    medians = np.full(int(key.max()) + 1, np.nan)
    order = np.argsort(key[ok], kind="stable")
    keys, values = key[ok][order], own[ok][order]
    bounds = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1], True])
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        medians[keys[a]] = np.median(values[a:b])
    stalled = ok & (own > np.maximum(_STALL * medians[key], 1e-3))
    removed[stalled] = own[stalled] - medians[key[stalled]]
    host[stalled] -= removed[stalled]
    return removed


def _idle_overlap(run_ids: _Runs, starts: np.ndarray, ends: np.ndarray, requests: list) -> np.ndarray:
    """Seconds of each [start, end] during which no request was in flight: the engine idling for the next
    arrival is not host cost (the emulator jumps over idle time)."""
    overlap = np.zeros(len(starts))
    if not requests:
        return overlap
    table = pa.concat_tables(requests)
    for run_id in run_ids.names:
        mine = run_ids.rows_of(run_id)
        rows = [
            r for r in table.filter(pa.compute.equal(table["run_id"], run_id)).to_pylist() if r["token_times"]
        ]
        if not rows:
            continue
        spans = sorted((r["arrival"], r["token_times"][-1]) for r in rows)
        # idle time since serving started, piecewise linear in time: slope 1 while idle, flat while busy
        first = max(spans[0][0], 0.0)
        points, idle, busy_until = [(0.0, 0.0), (first, first)], first, first
        for arrival, done in spans:
            if arrival > busy_until:
                points.append((busy_until, idle))
                idle += arrival - busy_until
                points.append((arrival, idle))
            busy_until = max(busy_until, done)
        points.append((busy_until, idle))
        t, f = np.array(points).T
        start, end = np.nan_to_num(starts[mine]), np.nan_to_num(ends[mine])
        overlap[mine] = np.maximum(_idle_before(end, t, f) - _idle_before(start, t, f), 0.0)
    return overlap


def _idle_before(x: np.ndarray, t: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Idle seconds before each x, from breakpoints (t, f); after the last completion all is idle."""
    return np.interp(x, t, f) + np.maximum(x - t[-1], 0.0)


def _check_one_device(runs: list[dict], sources: list[str]) -> None:
    first = runs[0]
    for row, source in zip(runs, sources, strict=True):
        if (row["device_kind"], row["device_name"]) != (first["device_kind"], first["device_name"]):
            raise FitError(
                "traces of different devices in one fit: "
                f"{sources[0]} was recorded on {first['device_name']} "
                f"({first['device_kind']}), {source} on {row['device_name']} ({row['device_kind']}); "
                "fit one profile per device"
            )


def _extra(run: dict) -> dict:
    try:
        return json.loads(run.get("extra") or "{}")
    except json.JSONDecodeError:
        return {}


def _run_dtype(runs: list[dict]) -> str:
    return _extra(runs[0]).get("dtype") or ("float32" if runs[0]["device_kind"] == "cpu" else "bfloat16")


def _synchronous(runs: list[dict]) -> bool:
    return runs[0]["device_kind"] == "cpu"


def _profiler_cost(runs: list[dict], run_ids: _Runs, host_duration: np.ndarray, device: np.ndarray):
    """Seconds of profiler cost in each op's host gap, where the recording calibrated it (a CPU): the
    cost inside the op's span (host - device duration) plus its own event's cost outside the span."""
    cost = np.zeros(len(run_ids.index))
    for run in runs:
        extra = _extra(run)
        per_event, inside = extra.get("profiler_event_overhead_us"), extra.get("profiler_inside_overhead_us")
        if not per_event or run["device_kind"] != "cpu":
            continue
        mine = run_ids.rows_of(run["run_id"])
        cost[mine] = (host_duration[mine] - device[mine]) + max(0.0, per_event - (inside or 0.0)) / 1e6
    return cost


# --- fitting -----------------------------------------------------------------------------------------


def _candidates(key: str, features: list[Features]) -> list[tuple[str, tuple[str, ...]]]:
    """(form, features) to try: a constant, straight lines in each primary feature, flops and
    bytes together, a power law in the first primary feature, and one in the family's shape features."""
    present = [f for f in _PRIMARY if all(f in x for x in features) and any(x[f] > 0 for x in features)]
    varying = [
        f for f in _SHAPES.get(op_family(key), ())
        if all(f in x for x in features) and len({x[f] for x in features}) > 1
    ]  # fmt: skip
    shapes = [("1", f) for f in present]
    if "flops" in present and "bytes" in present:
        shapes.append(("1", "flops", "bytes"))
    forms = [("linear", ("1",))]
    forms += [("linear", names) for names in shapes]
    if present:
        forms.append(("power", ("1", present[0])))
    if len(varying) > 1:
        forms.append(("power", ("1", *varying)))
    return forms


def _design(features: list[Features], names: tuple[str, ...], form: str) -> np.ndarray:
    X = np.array([[1.0 if n == "1" else f.get(n, 0.0) for n in names] for f in features])
    if form == "power":
        X[:, 1:] = np.log(np.maximum(X[:, 1:], 1.0))
    return X


def _solve(form: str, X: np.ndarray, y: np.ndarray, n: np.ndarray, quick: bool = False):
    """Coefficients for relative error, then scaled so that the points' total time is kept.

    'linear' is WLS with weights count / y²; 'power' is OLS on logs weighted by count (weights count / y
    were tried and chose no better forms). Relative-error fits lean low (an over-prediction costs more
    than an under-prediction of the same size), and a sum of steps does not forgive a lean: the final
    scale makes the fitted points' predicted total equal their measured total.
    statsmodels fits the models kept; `quick` (cross-validation folds) solves the same weighted least
    squares with numpy, ten times faster.
    """
    if form == "power":
        target, weights, scale = np.log(y), n, np.ones(X.shape[1])
    else:
        target, weights = y, n / y**2
        scale = X.max(axis=0)  # columns span 1 to 1e12: scale them for a well-conditioned solve
        scale[scale == 0] = 1.0
    Xs = X / scale
    if quick:
        root = np.sqrt(weights)
        coef = np.linalg.lstsq(Xs * root[:, None], target * root, rcond=None)[0] / scale
    else:
        coef = np.asarray(sm.WLS(target, Xs, weights=weights).fit().params) / scale
    predicted = np.maximum(_predict(form, coef, X), y.min())
    ratio = float(np.sum(n * y) / max(np.sum(n * predicted), 1e-30))
    if form == "power":
        coef[0] += math.log(ratio)
    else:
        coef = coef * ratio
    return coef


def _predict(form: str, coef: np.ndarray, X: np.ndarray) -> np.ndarray:
    return np.exp(np.minimum(X @ coef, 50.0)) if form == "power" else X @ coef


def _weighted_error(predicted: np.ndarray, y: np.ndarray, n: np.ndarray) -> float:
    return float(np.sum(n * np.abs(predicted - y)) / max(np.sum(n * y), 1e-30))


def _fit_group(
    key: str, dtype: str, feats: list[Features], y: np.ndarray, n: np.ndarray, rng
) -> OpModel | None:
    """The best candidate form for these signature points, by cross-validated error (None if < 3)."""
    k = len(y)
    if k < MIN_SIGNATURES:
        return None
    folds = rng.permutation(k) % min(FOLDS, k)
    best = None
    for form, names in _candidates(key, feats):
        if k - math.ceil(k / min(FOLDS, k)) < len(names) + 1:
            continue  # too few signatures left in a fold to fit this form and check it
        X = _design(feats, names, form)
        predicted = np.empty(k)
        for fold in range(min(FOLDS, k)):
            test = folds == fold
            coef = _solve(form, X[~test], y[~test], n[~test], quick=True)
            predicted[test] = np.maximum(_predict(form, coef, X[test]), y[~test].min())
        if not np.all(np.isfinite(predicted)):
            continue
        score = _weighted_error(predicted, y, n)
        # a form with more parameters must beat a simpler one by 1 % of error to be chosen
        if best is None or score < best[0] - 0.01 * (len(names) > len(best[2])):
            best = (score, form, names, X)
    if best is None:
        return None
    score, form, names, X = best
    coef = _solve(form, X, y, n)
    names, coef = _per_head(key, form, names, coef, feats)
    raw = _design(feats, names, "linear")  # the features as seen, for the ranges
    return OpModel(
        target="device",
        key=key,
        dtype=dtype,
        form=form,
        features=names,
        coefficients=tuple(float(c) for c in coef),
        floor=float(y.min()),
        samples=int(n.sum()),
        signatures=k,
        cv_error=score,
        range_min=tuple(float(v) for v in raw.min(axis=0)),
        range_max=tuple(float(v) for v in raw.max(axis=0)),
    )


def _per_head(key: str, form: str, names: tuple, coef: np.ndarray, feats: list[Features]):
    """An attention power law fitted where the head count never varied (one model recorded) cannot see it;
    attention's work is proportional to it, so the law takes heads to the power one, anchored where
    recorded: the same predictions on what was measured, and tensor-parallel shards (fewer heads per GPU)
    priced for the heads they hold."""
    if op_family(key) != "attention" or form != "power" or "heads" in names:
        return names, coef
    heads = {f.get("heads") for f in feats}
    if len(heads) != 1 or not (h := heads.pop()) or h <= 1:
        return names, coef
    coef = np.append(coef, 1.0)
    coef[0] -= math.log(h)
    return (*names, "heads"), coef


def _tables(key: str, dtype: str, feats: list[Features], y: np.ndarray, n: np.ndarray) -> list[OpModel]:
    """'table' models of a key: the mean time at each measured value of its axis, per shape that the
    other features fix (profile module doc)."""
    axis, fixed = _AXIS.get(op_family(key), _DEFAULT_AXIS)
    if not all(axis in f and all(name in f for name in fixed) for f in feats):
        return []
    shapes: dict[tuple[float, ...], dict[float, list[float]]] = {}
    for f, yi, ni in zip(feats, y, n, strict=True):
        knot = shapes.setdefault(tuple(f[name] for name in fixed), {}).setdefault(f[axis], [0.0, 0.0])
        knot[0] += yi * ni
        knot[1] += ni
    models = []
    for where, knots in shapes.items():
        xs = sorted(knots)
        models.append(
            OpModel(
                target="device",
                key=key,
                dtype=dtype,
                form="table",
                features=(axis, *fixed),
                coefficients=(),
                samples=int(sum(knots[x][1] for x in xs)),
                signatures=len(xs),
                where=where,
                knots_x=tuple(xs),
                knots_y=tuple(knots[x][0] / knots[x][1] for x in xs),
            )  # fmt: skip
        )
    return models


def _scaled(
    key: str, dtype: str, family: OpModel, feats: list[Features], y: np.ndarray, n: np.ndarray
) -> OpModel:
    """A key with few signatures: its family's model times the ratio of its measured to predicted time."""
    predicted = np.array([family.predict(f) for f in feats])
    ratio = float(np.sum(n * y) / max(np.sum(n * predicted), 1e-30))
    raw = _design(feats, family.features, "linear")
    return OpModel(
        target="device",
        key=key,
        dtype=dtype,
        form="scaled",
        features=(f"family:{op_family(key)}",),
        coefficients=(ratio,),
        floor=float(y.min()),
        samples=int(n.sum()),
        signatures=len(y),
        range_min=tuple(float(v) for v in raw.min(axis=0)),
        range_max=tuple(float(v) for v in raw.max(axis=0)),
    )


def _const(key: str, dtype: str, y: np.ndarray, n: np.ndarray) -> OpModel:
    mean = float(np.sum(n * y) / max(np.sum(n), 1))
    return OpModel(
        target="device", key=key, dtype=dtype, form="const", features=("1",), coefficients=(mean,),
        floor=0.0, samples=int(n.sum()), signatures=len(y), range_min=(1.0,), range_max=(1.0,),
    )  # fmt: skip


def _device_models(data: _Data, rows: np.ndarray, progress: Progress, seed: int) -> list[OpModel]:
    """Device models fitted on the op rows selected by `rows`: per key, per family, and one for all."""
    n_sigs = len(data.keys)
    rows = rows & ~data.captured  # captured ops ran nothing on the device
    counts = np.bincount(data.sig[rows], minlength=n_sigs).astype(float)
    sums = np.bincount(data.sig[rows], weights=data.device[rows], minlength=n_sigs)
    means = np.divide(sums, counts, out=np.zeros(n_sigs), where=counts > 0)
    usable = (counts > 0) & (means > 0)
    groups: dict[tuple[str, str], list[int]] = {}
    for s in np.flatnonzero(usable):
        groups.setdefault((data.keys[s], data.dtypes[s]), []).append(int(s))
    rng = np.random.default_rng(seed)

    def points(sigs: list[int]):
        idx = np.array(sigs)
        return [data.features[i] for i in idx], means[idx], counts[idx]

    models: list[OpModel] = []
    pooled: dict[tuple[str, str], list[int]] = {}
    for (key, dtype), sigs in groups.items():
        pooled.setdefault((f"family:{op_family(key)}", dtype), []).extend(sigs)
        pooled.setdefault(("family:*", dtype), []).extend(sigs)
        pooled.setdefault(("family:*", "*"), []).extend(sigs)
    families: dict[tuple[str, str], OpModel] = {}
    for (name, dtype), sigs in pooled.items():
        feats, y, n = points(sigs)
        model = _fit_group(name, dtype, feats, y, n, rng) or _const(name, dtype, y, n)
        families[(name, dtype)] = model
        models.append(model)
    total = float(np.sum(sums))
    for i, ((key, dtype), sigs) in enumerate(sorted(groups.items())):
        if i % 16 == 0:
            progress("fitting", i, len(groups))
        feats, y, n = points(sigs)
        model = _fit_group(key, dtype, feats, y, n, rng)
        if model is None:
            family = families.get((f"family:{op_family(key)}", dtype))
            model = (
                _scaled(key, dtype, family, feats, y, n) if family is not None else _const(key, dtype, y, n)
            )
        models.append(_with(model, time_share=float(np.sum(n * y)) / max(total, 1e-30)))
        models.extend(_tables(key, dtype, feats, y, n))
    progress("fitting", len(groups), len(groups))
    return models


def _with(model: OpModel, **changes) -> OpModel:
    return OpModel(**(vars(model) | changes))


def _host_models(data: _Data, rows: np.ndarray) -> list[OpModel]:
    """Per key, the mean host time per op over all engines and per engine with `_MIN_HOST_ROWS` rows
    (waits and stalls taken out in `_read`); '*', the median over all ops, for keys never seen. Target
    'host' is the time to the next op (`deterministic` mode), 'host_own' the op's own call (`wall` mode)."""
    models = []
    names = data.key_names
    synchronous = _synchronous(data.runs)
    for target, values in (("host", data.host), ("host_own", data.own)):
        ok = rows & np.isfinite(values)
        host = values[ok]
        keys = data.key_of_sig[data.sig[ok]]
        engine_names, engines = data.engine_names, data.engine[ok]
        total = float(np.sum(np.maximum(host, 0)))
        several = len(engine_names) > 1  # with one engine, its models are the pooled ones
        for e in [-1, *(range(len(engine_names)) if several else [])]:
            mine = engines == e if e >= 0 else np.ones(len(host), dtype=bool)
            counts = np.bincount(keys[mine], minlength=len(names))
            sums = np.bincount(keys[mine], weights=host[mine], minlength=len(names))
            positive = np.bincount(keys[mine], weights=np.maximum(host[mine], 0), minlength=len(names))
            engine = str(engine_names[e]) if e >= 0 else ""
            slopes = (
                _host_slopes(data, np.flatnonzero(ok)[mine], host[mine])
                if target == "host" and synchronous
                else {}
            )
            per_request = (
                _host_per_request(data, np.flatnonzero(ok)[mine], host[mine], keys[mine], slopes)
                if target == "host" and synchronous
                else {}
            )
            for k in np.flatnonzero(counts >= (_MIN_HOST_ROWS if engine else 1)):
                share = float(positive[k]) / max(total, 1e-30)
                model = _host_model(
                    target, names[k], float(sums[k] / counts[k]), int(counts[k]), share, engine
                )
                if k in per_request:
                    model = _with(
                        model, form="linear", features=("1", "device", "batch"), coefficients=per_request[k]
                    )
                elif k in slopes:
                    model = _with(
                        model, form="linear(device)", features=("1", "device"), coefficients=slopes[k]
                    )
                models.append(model)
        if host.size:
            models.append(_host_model(target, "*", float(np.median(host)), host.size, 1.0, ""))
    return models


def _host_slopes(data: _Data, rows: np.ndarray, host: np.ndarray) -> dict[int, tuple[float, float]]:
    """On a synchronous device, per key index: (seconds, seconds per device second) of host time after an
    op. Bigger ops leave more behind (freeing and first-touching bigger buffers): on this project's CPU the
    gap after an `aten::mul` grows from 9 µs to 40 µs as the op grows from 3 µs to 2 ms. The slope is a
    Theil-Sen line through the op's shapes (mean gap against mean device time, robust to stray gaps), the
    intercept keeps the key's total host time. Keys with fewer than 5 shapes, or shapes within 4x of each
    other in device time, keep a constant."""
    from scipy.stats import theilslopes

    sig = data.sig[rows]
    n = np.bincount(sig, minlength=len(data.keys))
    seen = np.flatnonzero(n)
    h = np.bincount(sig, weights=host, minlength=len(data.keys))[seen] / n[seen]
    d = np.bincount(sig, weights=data.device[rows], minlength=len(data.keys))[seen] / n[seen]
    counts, key_of = n[seen], data.key_of_sig[seen]
    slopes = {}
    for k in np.unique(key_of):
        mine = np.flatnonzero((key_of == k) & (d > 0))
        if mine.size < 5 or d[mine].max() < 4 * d[mine].min():
            continue
        sample = mine[:: max(1, mine.size // 500)]  # Theil-Sen takes every pair: a few hundred shapes do
        slope = float(np.clip(theilslopes(h[sample], d[sample])[0], 0.0, 0.5))
        every = key_of == k
        w = counts[every]
        intercept = float(np.sum(w * (h[every] - slope * d[every])) / np.sum(w))
        slopes[int(k)] = (max(intercept, 0.0), slope)
    return slopes


def _host_per_request(
    data: _Data, rows: np.ndarray, host: np.ndarray, keys: np.ndarray, slopes: dict
) -> dict[int, tuple[float, float, float]]:
    """Per key index: (seconds, seconds per device second, seconds per request in the step) of host time
    after an op, for keys whose host time grows with the step's requests: serving code between ops loops
    over them (measured on small-llama hf-cb: a decode step's host time 0.79 ms at one request, 1.34 ms at
    six, a constant per op said 0.94-1.05). A least-squares line in the step's requests through the key's
    host times, less what its device-time slope (`_host_slopes`) accounts for, from the variation within
    each run (runs of one static batch size differ in much else: prompt lengths, syncs) and inside engine
    steps only (outside them the term is 0: the same op there is other code, a `copy_` into an input buffer
    at 5 µs where one in a step took 58); keys whose batch never varied within a run's steps, or whose time
    does not grow with it, are left out. Synchronous devices only: on a GPU the time after an op also waits
    for the device, whose work grows with the batch too (fitted there, `_to_copy` took 35 µs per request and
    the host error per step went from 15 % to 180 %)."""
    x = data.batch[rows]
    n = int(keys.max()) + 1 if keys.size else 0
    slope_of = np.zeros(n)
    for k, (_, slope) in slopes.items():
        slope_of[k] = slope
    y = host - slope_of[keys] * data.device[rows]
    inside = x > 0
    group = np.where(inside, data.run[rows] * n + keys, -1) + 1  # (run, key) in steps: deviations from means
    size = np.bincount(group)
    dx = np.where(inside, x - (np.bincount(group, x) / np.maximum(size, 1))[group], 0.0)
    dy = np.where(inside, y - (np.bincount(group, y) / np.maximum(size, 1))[group], 0.0)
    count = np.bincount(keys, minlength=n)
    sx, sy = np.bincount(keys, x, n), np.bincount(keys, y, n)
    sxx, sxy = np.bincount(keys, dx * dx, n), np.bincount(keys, dx * dy, n)
    fitted = {}
    for k in np.flatnonzero((count >= _MIN_HOST_ROWS) & (sxx > 1e-9 * np.maximum(count, 1))):
        per = sxy[k] / sxx[k]
        if per > 0:
            intercept = float((sy[k] - per * sx[k]) / count[k])
            fitted[int(k)] = (max(intercept, 0.0), float(slope_of[k]), float(per))
    return fitted


def _host_model(target: str, key: str, seconds: float, samples: int, share: float, engine: str) -> OpModel:
    return OpModel(
        target=target, key=key, dtype="", form="const", features=("1",), coefficients=(max(seconds, 0.0),),
        samples=int(samples), signatures=0, time_share=share, range_min=(1.0,), range_max=(1.0,),
        engine=engine,
    )  # fmt: skip


# --- evaluation --------------------------------------------------------------------------------------


def _predictions(profile: Profile, data: _Data) -> np.ndarray:
    """Predicted device seconds per signature, through the profile exactly as the emulator asks it."""
    import torch

    out = np.empty(len(data.keys))
    for i, (key, dtype, f) in enumerate(zip(data.keys, data.dtypes, data.features, strict=True)):
        out[i] = profile.device_time(key, f, getattr(torch, dtype, None) if dtype else None)
    return out


def _host_costs(profile: Profile, data: _Data, predicted: np.ndarray) -> np.ndarray:
    """Per row: the host time the profile gives its op (its engine's model; on a synchronous device plus
    the op's predicted device time, `predicted` per row, and what the host spends after it)."""
    host_cost = np.zeros(len(data.sig))
    slope = np.zeros(len(data.sig))
    for code, engine in enumerate(data.engine_names):
        mine = data.engine == code
        per_request = np.array([profile.host_per_request(k, engine) for k in data.keys])[data.sig[mine]]
        host_cost[mine] = np.array([profile.host_time(k, engine) for k in data.keys])[data.sig[mine]]
        host_cost[mine] += per_request * data.batch[mine]
        slope[mine] = np.array([profile.host_slope(k, engine) for k in data.keys])[data.sig[mine]]
    return host_cost + predicted * (1.0 + slope) if profile.synchronous else host_cost


def _wake_factor(profile: Profile, data: _Data, steps: np.ndarray | None = None) -> tuple[float, int]:
    """(factor, wake-up steps): how much slower than predicted the first step after idle runs, relative
    to the other steps, times the twins' share the profiler hid (`_wake_twin`), over `steps` (a mask; all
    by default). Synchronous devices only (on a CPU, caches and clocks cool while the engine waits); 1.0
    with fewer than 3 wake-up steps."""
    if not profile.synchronous:
        return 1.0, 0
    predicted = _predictions(profile, data)[data.sig]
    rows = (data.step >= 0) & ~data.graph
    totals = np.bincount(
        data.step[rows], weights=_host_costs(profile, data, predicted)[rows], minlength=data.steps
    )
    ok = (totals > 0) & (data.step_host > 0) & (steps if steps is not None else True)
    ratio, woke = data.step_host[ok] / totals[ok], data.step_idle[ok]
    if woke.sum() < 3 or (~woke).sum() < 3:
        return 1.0, int(woke.sum())
    factor = np.median(ratio[woke]) / np.median(ratio[~woke]) * data.wake_twin
    return float(np.clip(factor, 1.0, 3.0)), int(woke.sum())


def _evaluate(profile: Profile, data: _Data, held: np.ndarray, held_steps: np.ndarray):
    """Held-out errors: per step (device and host, time-weighted) and per key (per row, relative). Steps
    are predicted as the emulator prices them: a wake-up step slowed by the profile's wake factor, and
    measured as recorded (cold)."""
    per_sig = _predictions(profile, data)
    predicted = per_sig[data.sig]
    in_step = held & (data.step >= 0) & ~data.captured
    n = data.steps
    wake = np.where(data.step_idle, profile.wake_factor, 1.0)
    cold = np.where(data.step_idle, data.cold, 1.0)  # the models were fitted on warm times (`_cold`)
    steps_of = data.step[in_step]
    measured_steps = np.bincount(steps_of, weights=data.device[in_step], minlength=n) * cold
    predicted_steps = np.bincount(steps_of, weights=predicted[in_step], minlength=n) * wake
    chosen = held_steps & (measured_steps > 0)
    device_error = (
        float(
            np.sum(np.abs(predicted_steps[chosen] - measured_steps[chosen])) / np.sum(measured_steps[chosen])
        )
        if chosen.any()
        else None
    )
    host_error = None
    host_cost = _host_costs(profile, data, predicted)
    not_graph = held & (data.step >= 0) & ~data.graph
    predicted_host = np.bincount(data.step[not_graph], weights=host_cost[not_graph], minlength=n) * wake
    if held_steps.any() and np.sum(data.step_host[held_steps]) > 0:
        host_error = float(
            np.sum(np.abs(predicted_host[held_steps] - data.step_host[held_steps]))
            / np.sum(data.step_host[held_steps])
        )
    per_key: dict[tuple[str, str], list[np.ndarray]] = {}
    rows = np.flatnonzero(held & (data.device > 0))
    order = rows[np.argsort(data.sig[rows], kind="stable")]
    errors = np.abs(predicted[order] - data.device[order]) / data.device[order]
    sigs = data.sig[order]
    bounds = np.flatnonzero(np.r_[True, sigs[1:] != sigs[:-1], True]) if sigs.size else np.array([0])
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        per_key.setdefault((data.keys[sigs[a]], data.dtypes[sigs[a]]), []).append(errors[a:b])
    return device_error, host_error, {k: np.concatenate(v) for k, v in per_key.items()}


# --- the whole fit -----------------------------------------------------------------------------------


def fit(
    traces: Iterable[str | Path],
    holdout: float = 0.2,
    seed: int = 0,
    progress: Progress | None = None,
) -> FitResult:
    """Fit a profile on traces; report its error on a held-out fraction of steps, then refit on all.

    >>> result = fit(["traces/cpu/tiny-hf-cb"], holdout=0.2)
    >>> result.device_error  # time-weighted held-out error of device time per step
    """
    if not 0.0 <= holdout < 1.0:
        raise FitError(f"--holdout must be in [0, 1), not {holdout}")
    progress = progress or (lambda stage, done, total: None)
    started = time.perf_counter()
    traces = [str(t) for t in traces]
    data = _read(traces, progress)
    rng = np.random.default_rng(seed)
    held_steps = np.zeros(data.steps, dtype=bool)
    if holdout > 0 and data.steps >= 2:
        chosen = rng.permutation(data.steps)[: max(1, round(holdout * data.steps))]
        held_steps[chosen] = True
    held = (data.step >= 0) & held_steps[np.maximum(data.step, 0)]
    train = ~held

    notes: list[str] = []
    device_error = host_error = None
    per_key_errors: dict = {}
    if held.any():
        trial = _profile(data, train, progress, seed, traces)
        trial = replace(trial, wake_factor=_wake_factor(trial, data, ~held_steps)[0])
        device_error, host_error, per_key_errors = _evaluate(trial, data, held, held_steps)
    else:
        notes.append("no steps held out: errors not measured")
    everything = np.ones(len(data.sig), dtype=bool)
    profile = _profile(data, everything, progress, seed, traces)
    wake, woke = _wake_factor(profile, data)
    if wake != 1.0:
        profile = replace(profile, wake_factor=wake)
        notes.append(
            f"steps after the engine sat idle run {wake:.2f}x their prediction ({woke} such steps"
            + (f"; {data.wake_twin:.2f}x of it seen only without the profiler" if data.wake_twin != 1 else "")
            + "): the emulator slows such steps by as much"
        )
    profile.info.update(
        {
            "device_error": device_error,
            "host_error": host_error,
            "holdout": holdout,
            "host_scales": data.host_scales,
        }
    )
    if data.instantiate is not None:
        notes.append(
            f"graphs captured while serving took {data.instantiate * 1e6:.1f} µs per captured kernel to "
            "instantiate after the capture: the emulator charges it when a capture ends"
        )
    if data.host_scales:
        values = sorted(data.host_scales.values())
        notes.append(
            f"host times scaled by {values[0]:.2f}-{values[-1]:.2f} per run: the profiler's slow-down, "
            "measured against timeline twins (`--capture timeline` runs of the same engine, model, workload)"
        )

    reports, models = [], []
    for m in profile.models:
        errors = per_key_errors.get((m.key, m.dtype))
        if m.target == "device" and errors is not None and errors.size:
            m = _with(m, holdout_median=float(np.median(errors)), holdout_p90=float(np.quantile(errors, 0.9)))
        models.append(m)
        if m.target == "device" and not m.key.startswith("family:"):
            reports.append(
                KeyReport(
                    m.key,
                    m.dtype,
                    m.form,
                    m.features,
                    m.samples,
                    m.signatures,
                    m.cv_error,
                    m.holdout_median,
                    m.holdout_p90,
                    m.time_share,
                )  # fmt: skip
            )
    profile = replace(profile, models=models)  # its lookups are rebuilt from the models
    inexact = sum(1 for ok in data.exact if not ok)
    if inexact:
        notes.append(
            f"{inexact} of {len(data.exact)} signatures got fallback features (list arguments not kept)"
        )
    reports.sort(key=lambda r: -r.time_share)
    return FitResult(
        profile=profile,
        keys=reports,
        holdout_iterations=int(held_steps.sum()),
        device_error=device_error,
        host_error=host_error,
        rows=len(data.sig),
        signatures=len(data.keys),
        seconds=time.perf_counter() - started,
        notes=notes,
    )


@dataclass
class Check:
    """A profile's predictions against traces it may not have seen (`check`)."""

    device_error: float | None  # time-weighted error of device time per step
    host_error: float | None
    predicted_seconds: float  # device time of all steps, predicted and measured
    measured_seconds: float
    steps: int
    extrapolated_share: float  # of measured device time, predicted by anything but an exact in-range model


def check(profile: Profile, traces: Iterable[str | Path]) -> Check:
    """Predict every step of other traces with a profile and compare with what they measured.

    >>> check(Profile.read("h100.parquet").on(gpu("h200")), ["traces/h200/gen-b32-p1024"]).device_error
    """
    import torch

    data = _read([str(t) for t in traces], lambda stage, done, total: None)
    all_steps = np.ones(data.steps, dtype=bool)
    in_step = data.step >= 0
    device_error, host_error, _ = _evaluate(profile, data, in_step, all_steps)
    in_step &= ~data.captured
    predicted = _predictions(profile, data)[data.sig]
    flagged = np.array(
        [
            profile.extrapolated(k, f, getattr(torch, d, None) if d else None)
            for k, f, d in zip(data.keys, data.features, data.dtypes, strict=True)
        ]
    )[data.sig]
    measured = float(data.device[in_step].sum())
    return Check(
        device_error=device_error,
        host_error=host_error,
        predicted_seconds=float(predicted[in_step].sum()),
        measured_seconds=measured,
        steps=data.steps,
        extrapolated_share=float(data.device[in_step & flagged].sum()) / max(measured, 1e-30),
    )


def _profile(data: _Data, rows: np.ndarray, progress: Progress, seed: int, traces: list[str]) -> Profile:
    run = data.runs[0]
    device = {
        "kind": run["device_kind"],
        "name": run["device_name"],
        "sm_count": run["sm_count"],
        "memory_bytes": run["memory_bytes"],
        "torch_version": run["torch_version"],
        "cuda_version": run["cuda_version"],
        "driver_version": run["driver_version"],
    }
    import revati

    return Profile(
        models=_device_models(data, rows, progress, seed) + _host_models(data, rows),
        device=device,
        synchronous=_synchronous(data.runs),
        graph_instantiate=data.instantiate if data.instantiate is not None else GRAPH_INSTANTIATE,
        launch_latency=0.0 if _synchronous(data.runs) else 5e-6,
        sync_latency=0.0 if _synchronous(data.runs) else 4e-6,
        info={
            "traces": traces,
            "runs": [r["run_id"] for r in data.runs],
            "engines": sorted({r["engine"] for r in data.runs}),
            "models": sorted({r["model"] for r in data.runs}),
            "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "revati_version": getattr(revati, "__version__", "?"),
            "profile_version": PROFILE_VERSION,
        },
    )
