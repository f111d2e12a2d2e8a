"""Turn a torch.profiler (Kineto / CUPTI) trace into rows of the trace's `ops`, `kernels` and `iterations`.

The input is the Chrome trace that `torch.profiler.profile.export_chrome_trace` writes, already loaded
(`{"traceEvents": [...]}`): the one export that carries everything needed, kernel launch geometry
(grid, block, shared memory) and the kernels a CUDA graph replays included; `_KinetoEvent` objects carry
neither. The event kinds read, as Kineto writes them (times in µs, `ph: "X"`):

- `cpu_op`: an op on a host thread (`tid`), with `args` "External id", "Input Dims", "Input type",
  "Concrete Inputs"; ops nest (aten::linear → aten::t, aten::addmm).
- `user_annotation`: a `record_function` range; the recorder's markers are named `revati::...` (below).
- `cuda_runtime` / `cuda_driver`: a CUDA API call, with "correlation" and the "External id" of the op
  (or annotation) it was called under.
- `kernel` / `gpu_memcpy` / `gpu_memset`: device activity, with "correlation" (its API call), "External
  id", "stream", and for kernels "grid", "block", "shared memory". A kernel replayed from a CUDA graph
  carries the correlation of the `cudaGraphLaunch` and no External id.

Which ops become `ops` rows: the ones a `__torch_dispatch__` handler sees, as the emulator does. That is,
on each thread, the outermost op that is not a CompositeImplicitAutograd decomposition (aten::linear,
aten::to and aten::scaled_dot_product_attention decompose before dispatch reaches a backend; their
children are the ops). Ops nested inside such an op (aten::copy_ inside aten::_to_copy) are its
implementation: their kernels count as its kernels.

Kernels replayed from a CUDA graph map back to the ops captured: the recorder marks each capture
(`revati::graph_capture#G`) and each replay (`revati::graph_replay#G`); the k-th device activity of a
replay is the k-th launch made during capture G. Each replay adds one op row per captured op that ran
(`in_graph`, `parent_id` = the captured op's row), so a replayed op has its measured device time.
"""

from __future__ import annotations

import bisect
import functools
import gzip
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from revati.op_features import canonical_op

MARK_ITERATION = "revati::iteration#"
MARK_SERVING = "revati::serving_start"
MARK_CAPTURE = "revati::graph_capture#"
MARK_REPLAY = "revati::graph_replay#"

_HOST_CATS = {"cpu_op", "user_annotation"}
_API_CATS = {"cuda_runtime", "cuda_driver"}
_DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
# API calls that put work on a stream: during capture each becomes one node of the graph.
_LAUNCHES = {
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cudaLaunchCooperativeKernel",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaMemcpyAsync",
    "cudaMemsetAsync",
    "cudaMemcpy2DAsync",
    "cudaMemset2DAsync",
}

# Kineto's spelling of a tensor's scalar type -> torch's dtype name (as the emulator writes it).
DTYPES = {
    "float": "float32",
    "double": "float64",
    "c10::Half": "float16",
    "c10::BFloat16": "bfloat16",
    "c10::Float8_e4m3fn": "float8_e4m3fn",
    "c10::Float8_e5m2": "float8_e5m2",
    "c10::Float8_e4m3fnuz": "float8_e4m3fnuz",
    "c10::Float8_e5m2fnuz": "float8_e5m2fnuz",
    "long int": "int64",
    "int": "int32",
    "short int": "int16",
    "signed char": "int8",
    "unsigned char": "uint8",
    "bool": "bool",
    "c10::complex<float>": "complex64",
    "c10::complex<double>": "complex128",
}

_COLLECTIVES = {
    "allreduce": "all_reduce",
    "all_reduce": "all_reduce",
    "allgather": "all_gather",
    "all_gather": "all_gather",
    "_allgather_base": "all_gather",
    "allgather_into_tensor_coalesced": "all_gather",
    "reduce_scatter": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "broadcast": "broadcast",
    "alltoall": "all_to_all",
    "all_to_all": "all_to_all",
    "alltoall_base": "all_to_all",
    "send": "send",
    "recv": "recv",
    "gather": "gather",
    "scatter": "scatter",
    "reduce": "reduce",
    "barrier": "barrier",
}
_DTYPE_BYTES = {"Float": 4, "BFloat16": 2, "Half": 2, "Double": 8, "Long": 8, "Int": 4, "Byte": 1, "Char": 1}


class KinetoError(ValueError):
    """A profiler trace that does not have the shape Kineto writes."""


@dataclass(eq=False)
class HostEvent:
    """A cpu_op or user_annotation range on one host thread."""

    name: str
    cat: str
    tid: int
    start: float  # µs
    end: float  # µs
    ext: int | None
    args: dict
    parent: HostEvent | None = None
    owner: HostEvent | None = None  # the dispatch-level op this event belongs to (itself, for one)
    iteration: int | None = None
    capture: int | None = None  # graph id while being captured
    replay: int | None = None  # graph id while being replayed
    descendants: int = 0  # host events nested inside (profiler overhead is paid per event)
    op_id: int | None = None
    kernels: list = field(default_factory=list)


@dataclass
class Parsed:
    """Rows for the trace tables (lists of dicts without run_id) and what the parse noticed."""

    ops: list[dict]
    kernels: list[dict]
    iterations: dict[int, dict]  # iteration id -> host / device interval and event counts
    unmapped_replay_kernels: int = 0
    replays: int = 0


def load(path) -> dict:
    """Read an exported Chrome trace (.json or .json.gz); a clear error naming the file when it is not one."""
    try:
        with gzip.open(path, "rt") if str(path).endswith(".gz") else open(path) as f:
            trace = json.load(f)
    except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KinetoError(f"{path}: not a readable Chrome trace ({e})") from e
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise KinetoError(
            f"{path}: no 'traceEvents' list; expected torch.profiler's export_chrome_trace output"
        )
    return trace


def parse(
    trace: dict, *, synchronous: bool = False, event_overhead_us: float = 0.0, inside_overhead_us: float = 0.0
) -> Parsed:
    """Rows of `ops`, `kernels` and iteration intervals from a loaded Chrome trace (module doc).

    Times in the rows are seconds from the `revati::serving_start` marker (from the first host event
    when there is none). synchronous: the device is the host (CPU): an op's device time is its host
    time, less the profiler's cost inside it: `inside_overhead_us` for its own event and `event_overhead_us`
    for each event nested in it.
    """
    events = trace.get("traceEvents")
    if not isinstance(events, list):
        raise KinetoError("no 'traceEvents' list; expected torch.profiler's export_chrome_trace output")
    host, apis, device = [], {}, []
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat")
        try:
            if cat in _HOST_CATS:
                args = e.get("args") or {}
                ts = float(e["ts"])
                host.append(
                    HostEvent(
                        e["name"], cat, e["tid"], ts, ts + float(e["dur"]), args.get("External id"), args
                    )
                )
            elif cat in _API_CATS:
                apis[e["args"]["correlation"]] = e
            elif cat in _DEVICE_CATS:
                device.append(e)
        except (KeyError, TypeError, ValueError) as err:
            raise KinetoError(f"{cat} event {e.get('name')!r} lacks a field Kineto writes: {err}") from err
    _nest(host)
    _nest_comms(host)
    by_ext = {h.ext: h for h in host if h.ext is not None}
    origin = next((h.start for h in host if h.name == MARK_SERVING), None)
    if origin is None:
        origin = min((h.start for h in host), default=0.0)

    dispatch_ops = [h for h in host if h.owner is h]
    for op_id, op in enumerate(dispatch_ops):
        op.op_id = op_id
    captured = _captured_launches(apis, by_ext, host)
    replays: dict[int, list[dict]] = defaultdict(list)  # correlation of a cudaGraphLaunch -> its activities
    kernel_rows: list[dict] = []
    steps: list[int | None] = []  # per kernel row: the step it was launched in (by its launcher, not its op)
    for e in sorted(device, key=lambda e: e["ts"]):
        args = e.get("args") or {}
        api = apis.get(args.get("correlation"))
        if api is not None and "GraphLaunch" in api["name"]:
            replays[args["correlation"]].append(e)
            continue
        ext = args.get("External id", (api or {}).get("args", {}).get("External id"))
        launcher = by_ext.get(ext)
        op = launcher.owner if launcher is not None else None
        row = _kernel_row(e, len(kernel_rows), op.op_id if op is not None else None, origin)
        if op is not None:
            op.kernels.append(row)
            _collective(row, op)
        kernel_rows.append(row)
        steps.append(launcher.iteration if launcher is not None else None)

    overhead = (inside_overhead_us, event_overhead_us)
    rows = [_op_row(op, origin, synchronous, overhead) for op in dispatch_ops]
    unmapped = 0
    replay_marks = _replay_marks(host)
    for corr, activities in sorted(replays.items(), key=lambda kv: kv[1][0]["ts"]):
        api = apis[corr]
        marker = by_ext.get(api.get("args", {}).get("External id"))
        if marker is None or marker.replay is None:  # Kineto leaves cudaGraphLaunch without an External id
            marker = _enclosing(replay_marks, float(api["ts"]))
        graph = marker.replay if marker is not None else None
        launches = align(activities, captured.get(graph, []))
        if launches is None:  # not the graph we saw captured: keep its kernels, unmapped
            unmapped += len(activities)
            launches = [None] * len(activities)
        replay_rows: dict[int, dict] = {}
        for e, launch in zip(activities, launches, strict=True):
            op = launch[1].owner if launch is not None else None
            row = _kernel_row(e, len(kernel_rows), None, origin)
            row["graph_id"], row["graph_node_id"] = graph, launch[0] if launch is not None else None
            if op is not None:
                op_row = replay_rows.get(op.op_id)
                if op_row is None:
                    op_row = replay_rows[op.op_id] = _replay_row(
                        rows[op.op_id], len(rows), api, marker, origin
                    )
                    rows.append(op_row)
                row["op_id"] = op_row["op_id"]
                op_row["_kernels"].append(row)
                _collective(row, op)
            kernel_rows.append(row)
            steps.append(marker.iteration if marker is not None else None)
        for op_row in replay_rows.values():
            _device_span(op_row, op_row.pop("_kernels"), synchronous=False)
    iterations = _iterations(host, kernel_rows, steps, origin)
    return Parsed(rows, kernel_rows, iterations, unmapped, len(replays))


def _nest(host: list[HostEvent]) -> None:
    """Set parent, owner, and the iteration / capture / replay markers of every host event."""
    host.sort(key=lambda h: (h.tid, h.start, -h.end))
    stack: list[HostEvent] = []
    tid = None
    for h in host:
        if h.tid != tid:
            stack, tid = [], h.tid
        while stack and (h.start >= stack[-1].end or h.end > stack[-1].end + 1e-3):
            stack.pop()
        parent = stack[-1] if stack else None
        h.parent = parent
        if parent is not None:
            h.iteration, h.capture, h.replay = parent.iteration, parent.capture, parent.replay
            h.owner = parent.owner
            for ancestor in stack:
                ancestor.descendants += 1
        if h.cat == "user_annotation" and h.name.startswith("revati::"):
            _mark(h)
        elif h.owner is None and h.cat == "cpu_op" and "::" in h.name and not composite(h.name):
            h.owner = h
        stack.append(h)


def _replay_marks(host: list[HostEvent]) -> tuple[list[float], list[HostEvent]]:
    """The graph replay markers sorted by start, with their starts (for bisection).

    Not per thread: in a second profiling session in one process, Kineto numbers host threads apart
    from the CUDA API calls' threads (seen on torch 2.11), so API calls are placed by time alone.
    """
    hs = sorted(
        (h for h in host if h.cat == "user_annotation" and h.name.startswith(MARK_REPLAY)),
        key=lambda h: h.start,
    )
    return [h.start for h in hs], hs


def _enclosing(marks: tuple[list[float], list[HostEvent]], ts: float) -> HostEvent | None:
    """The marker whose interval holds `ts`, if any."""
    starts, hs = marks
    i = bisect.bisect_right(starts, ts) - 1
    return hs[i] if i >= 0 and hs[i].start <= ts <= hs[i].end else None


def _mark(h: HostEvent) -> None:
    for prefix, attr in ((MARK_ITERATION, "iteration"), (MARK_CAPTURE, "capture"), (MARK_REPLAY, "replay")):
        if h.name.startswith(prefix):
            try:
                setattr(h, attr, int(h.name[len(prefix) :]))
            except ValueError as e:
                raise KinetoError(f"marker {h.name!r}: expected {prefix}<integer>") from e


@functools.cache
def composite(name: str) -> bool:
    """Whether an op decomposes before dispatch reaches a backend (CompositeImplicitAutograd only).

    `name` as the profiler spells it: with the overload when overload names are captured
    ('aten::sum.dim_IntList'), else without ('aten::linear'): then the op counts as composite when every
    overload of it is (a composite overload of an op that also has backend overloads, e.g.
    select.Dimname, is then kept as one op with its children's kernels, rather than lost).
    """
    ns, _, rest = name.partition("::")
    op, _, overload = rest.partition(".")
    try:
        overloads = getattr(getattr(torch.ops, ns), op).overloads()
    except (AttributeError, RuntimeError):
        return False
    # out= variants and TorchScript's prim_ overloads are never what tensor code without out= calls
    names = (
        [overload]
        if overload
        else [o for o in overloads if not o.endswith("out") and not o.startswith("prim")]
    )
    return bool(names) and all(_composite_overload(ns, op, o) for o in names)


def _composite_overload(ns: str, op: str, overload: str) -> bool:
    qualified = f"{ns}::{op}" if overload == "default" else f"{ns}::{op}.{overload}"
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    try:
        return has(qualified, "CompositeImplicitAutograd") and not any(
            has(qualified, key) for key in ("CUDA", "CPU", "CompositeExplicitAutograd", "Meta")
        )
    except RuntimeError:
        return False


def _captured_launches(apis: dict, by_ext: dict, host: list[HostEvent]) -> dict[int, list[HostEvent]]:
    """Per graph id: the op of each stream launch made while that graph was captured, in order.

    Only launches between the capture's cudaStreamBeginCapture and cudaStreamEndCapture count: torch
    launches a few kernels inside `capture_begin` before the stream starts capturing (the RNG's seed and
    offset fills); those run once, they are no nodes of the graph.
    """
    ordered = sorted(apis.values(), key=lambda a: a["ts"])
    starts = [a["ts"] for a in ordered]
    windows: dict[int, tuple[float, float]] = {}
    for h in host:
        if h.cat == "user_annotation" and h.name.startswith(MARK_CAPTURE):
            # by time alone: API calls' thread numbers need not match the host events' (see _replay_marks)
            inside = ordered[bisect.bisect_left(starts, h.start) : bisect.bisect_right(starts, h.end)]
            begin = next((a["ts"] for a in inside if a["name"].startswith("cudaStreamBeginCapture")), h.start)
            end = next((a["ts"] for a in reversed(inside) if a["name"] == "cudaStreamEndCapture"), h.end)
            windows[h.capture] = (begin, end)
    out: dict[int, list] = defaultdict(list)
    for api in ordered:
        if api["name"] not in _LAUNCHES:
            continue
        h = by_ext.get(api.get("args", {}).get("External id"))
        if h is None or h.capture is None:
            continue
        begin, end = windows.get(h.capture, (-math.inf, math.inf))
        if begin <= api["ts"] <= end:
            out[h.capture].append((_launch_kind(api["name"]), h))
    return out


def _launch_kind(api: str) -> str:
    return "gpu_memset" if "Memset" in api else "gpu_memcpy" if "Memcpy" in api else "kernel"


def align(activities: list[dict], launches: list[tuple[str, HostEvent]]) -> list | None:
    """Match the device activities of one graph replay, in order, to the launches captured into that graph.

    Returns, per activity, (node index, launch op) or None. Kernels match kernel launches one to one, in
    order; a memset or memcpy matches a launch of its kind when one is next, else it belongs to the launch
    that follows it (libraries clear a workspace with driver calls the profiler does not show, e.g. before
    a split-K GEMM); a copy launch with no activity made no node. None when the kernels do not pair up:
    then this is not the graph that was captured.
    """
    kernels = sum(e.get("cat") == "kernel" for e in activities)
    if kernels != sum(kind == "kernel" for kind, _ in launches):
        return None
    out: list = []
    j = 0
    for e in activities:
        kind = e.get("cat", "kernel")
        while j < len(launches) and kind == "kernel" and launches[j][0] != "kernel":
            j += 1  # a captured copy that left no activity
        if j >= len(launches):
            out.append(None)
        elif launches[j][0] == kind:
            out.append((j, launches[j][1]))
            j += 1
        else:  # a copy the profiler saw no launch of: the next launch's
            out.append((None, launches[j][1]))
    return out


def _inputs(args: dict) -> tuple[list, list, str | None]:
    """(input shapes, dtypes, scalars) of a cpu_op, in the emulator's spelling."""
    shapes, dtypes, scalars = [], [], []
    dims = args.get("Input Dims") or []
    types = args.get("Input type") or []
    concrete = args.get("Concrete Inputs") or []
    for i, kind in enumerate(types):
        dim = dims[i] if i < len(dims) else []
        if kind in DTYPES:
            shapes.append(list(dim))
            dtypes.append(DTYPES[kind])
        elif kind in ("TensorList", "GenericList") and dim and all(isinstance(d, list) for d in dim):
            shapes.extend(list(d) for d in dim)
            dtypes.extend("unknown" for _ in dim)
        elif kind == "Scalar" and i < len(concrete) and concrete[i] != "":
            scalars.append(_scalar(concrete[i]))
    return shapes, dtypes, (repr(scalars) if scalars else None)


def _scalar(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _seconds(us: float, origin: float) -> float:
    return (us - origin) / 1e6


def _op_row(op: HostEvent, origin: float, synchronous: bool, overhead_us: tuple[float, float]) -> dict:
    shapes, dtypes, scalars = _inputs(op.args)
    host_duration = (op.end - op.start) / 1e6
    row = {
        "rank": 0,
        "op_id": op.op_id,
        "parent_id": None,
        "name": canonical_op(op.name),
        "input_shapes": shapes,
        "dtypes": dtypes,
        "scalars": scalars,
        "stream": 0,
        "host_start": _seconds(op.start, origin),
        "host_duration": host_duration,
        "in_graph": op.capture is not None,
        "iteration_id": op.iteration,
        "warmup": op.start < origin,
    }
    if synchronous:
        row["device_start"] = row["host_start"]
        inside, per_event = overhead_us
        row["device_duration"] = max(0.0, host_duration - (inside + per_event * op.descendants) / 1e6)
    else:
        _device_span(row, op.kernels, synchronous=False)
    return row


def _replay_row(captured: dict, op_id: int, api: dict, marker: HostEvent | None, origin: float) -> dict:
    return {
        **captured,
        "op_id": op_id,
        "parent_id": captured["op_id"],
        "host_start": _seconds(api["ts"], origin),
        "host_duration": 0.0,
        "in_graph": True,
        "iteration_id": marker.iteration if marker is not None else None,
        "warmup": api["ts"] < origin,
        "_kernels": [],
    }


def _device_span(row: dict, kernels: list[dict], synchronous: bool) -> None:
    if kernels:
        row["device_start"] = min(k["start"] for k in kernels)
        row["device_duration"] = sum(k["end"] - k["start"] for k in kernels)
        row["stream"] = kernels[0]["stream"]
    else:
        row["device_start"] = row["host_start"]
        row["device_duration"] = 0.0


def _kernel_row(e: dict, kernel_id: int, op_id: int | None, origin: float) -> dict:
    args = e.get("args") or {}
    start = _seconds(float(e["ts"]), origin)
    return {
        "rank": 0,
        "kernel_id": kernel_id,
        "op_id": op_id,
        "name": e["name"],
        "stream": int(args.get("stream", 0)),
        "grid": list(args.get("grid") or []),
        "block": list(args.get("block") or []),
        "shared_memory": int(args.get("shared memory", 0)),
        "start": start,
        "end": start + float(e.get("dur", 0.0)) / 1e6,
        "graph_id": None,
        "graph_node_id": None,
        "collective": None,
        "collective_bytes": None,
        "group_size": None,
        "seq": None,
    }


def _collective(row: dict, op: HostEvent) -> None:
    """Collective fields of an NCCL kernel, from the record_param_comms event its op recorded."""
    if not row["name"].lower().startswith("nccl"):
        return
    comms = op.args if op.name == "record_param_comms" else None
    if comms is None:
        comms = op.args.get("_comms")
    if comms is None:
        return
    name = str(comms.get("Collective name", ""))
    row["collective"] = _COLLECTIVES.get(name, name or None)
    nelems = max(int(comms.get("In msg nelems", 0) or 0), int(comms.get("Out msg nelems", 0) or 0))
    row["collective_bytes"] = nelems * _DTYPE_BYTES.get(str(comms.get("dtype")), 1)
    row["group_size"] = int(comms.get("Group size", 0) or 0) or None
    seq = comms.get("Seq", comms.get("seq"))
    row["seq"] = int(seq) if seq not in (None, "") else None


def _iterations(
    host: list[HostEvent], kernels: list[dict], steps: list[int | None], origin: float
) -> dict[int, dict]:
    """Host interval of each iteration marker, its device interval from the kernels launched in it (also
    those of no op and of unmapped graph replays), its event count."""
    out: dict[int, dict] = {}
    for h in host:
        if h.cat == "user_annotation" and h.name.startswith(MARK_ITERATION):
            out[h.iteration] = {
                "host_start": _seconds(h.start, origin),
                "host_end": _seconds(h.end, origin),
                "device_start": None,
                "device_end": None,
                "events": h.descendants,
            }
    for k, step in zip(kernels, steps, strict=True):
        it = out.get(step)
        if it is None:
            continue
        it["device_start"] = k["start"] if it["device_start"] is None else min(it["device_start"], k["start"])
        it["device_end"] = k["end"] if it["device_end"] is None else max(it["device_end"], k["end"])
    return out


def _nest_comms(host: list[HostEvent]) -> None:
    """Copy each record_param_comms event's args onto its dispatch-level op as `_comms`."""
    for h in host:
        if h.name == "record_param_comms" and h.owner is not None and h.owner is not h:
            h.owner.args.setdefault("_comms", h.args)
