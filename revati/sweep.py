"""Sweeps: many emulations over a grid of configurations, in a local process pool or on a Ray cluster.

spec = load_spec("sweep.toml")            # engine, model, workload, a [grid], [slo], [prices]
sweep = run_sweep(spec, Path("runs/sweep"), backend="local", workers=2)
sweep.results                              # one Arrow row per configuration (results.parquet)

Each point is one `revati emulate --json` in a process of its own (forked from a server that imported torch
and transformers once), so a point that crashes or runs out of memory takes nothing else down, and this
module imports nothing of the replayer. A finished point is written at once as its own Parquet file under
points/; a sweep run again skips the points found there.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from revati.schema import write_atomically
from revati.workloads import DEFAULT_WORKLOAD, WorkloadError, parse_workload, with_fields


class SpecError(ValueError):
    """A sweep spec that cannot run: names the file and the key."""


class SweepError(RuntimeError):
    """A sweep that could not go on (its Ray cluster failed); the points finished are kept."""


# What one point's emulation is given; each can be fixed at the top of the spec or varied in [grid].
_CONFIG = {
    "engine": "hf-cb",
    "model": "llama-3.1-8b",
    "workload": DEFAULT_WORKLOAD,
    "gpu": None,  # None: the profile's device, else h100 (as `revati emulate`)
    "tp": 1,
    "dtype": "bfloat16",
    "profile": None,
    "host_time": "deterministic",
}
_TYPES = {k: (str, type(None)) if v is None else type(v) for k, v in _CONFIG.items()}
_TABLES = ("options", "grid", "sample", "slo", "prices")
_SETTINGS = {"timeout": 3600.0, "ops": "none", "frontier": "ttft_p99_ms"}
_METRICS = [f"{m}_{p}_ms" for m in ("ttft", "tpot", "itl", "e2e") for p in ("p50", "p90", "p99")]


@dataclass(frozen=True)
class SweepSpec:
    """A parsed spec: the fixed configuration, the axes varied, and how results are judged."""

    path: Path
    base: dict  # _CONFIG keys plus 'options'
    grid: dict[str, list]  # axis → values; axes: a _CONFIG key, 'options.NAME' or 'workload.FIELD'
    sample: int | None = None  # a random sample of this many grid points, else the whole grid
    seed: int = 0
    slo: dict[str, float] = field(default_factory=dict)  # metric (e.g. ttft_p99_ms) → upper bound
    prices: dict[str, float] = field(default_factory=dict)  # GPU kind → USD per GPU-hour
    timeout: float = _SETTINGS["timeout"]  # seconds one point may run
    ops: str = _SETTINGS["ops"]  # op rows each point's trace keeps
    frontier: str = _SETTINGS["frontier"]  # the latency the frontier trades throughput against

    @property
    def size(self) -> int:
        """Points in the full grid."""
        return math.prod(len(v) for v in self.grid.values())


@dataclass(frozen=True)
class Point:
    """One configuration of a sweep: its grid values and the emulation they make."""

    index: int  # position in the grid
    params: dict  # axis → value, the grid's coordinates of this point
    config: dict  # the emulation: _CONFIG keys plus 'options'

    @functools.cached_property  # taken once: it stats the files the configuration names
    def point_id(self) -> str:
        """Stable across runs: a hash of the emulation's configuration, not of its position in the grid nor of
        where the files it names lie (a file counts by its name and contents)."""
        identity = {k: _identity(v) for k, v in self.config.items()}
        text = json.dumps(identity, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def argv(self, trace_dir: Path, ops: str) -> list[str]:
        """The arguments of the `revati emulate` that runs this point."""
        c = self.config
        argv = ["emulate", "--json", "--ops", ops, "--out", str(trace_dir)]
        argv += ["--engine", c["engine"], "--model", c["model"], "--workload", c["workload"]]
        argv += ["--tp", str(c["tp"]), "--dtype", c["dtype"], "--host-time", c["host_time"]]
        if c["gpu"] is not None:
            argv += ["--gpu", c["gpu"]]
        if c["profile"] is not None:
            argv += ["--profile", c["profile"]]
        for key, value in sorted(c["options"].items()):
            argv += ["--option", f"{key}={value!r}"]
        return argv


# --- the spec --------------------------------------------------------------------------------------


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and check a TOML sweep spec; SpecError names the key that is wrong."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read it ({e.strerror or e})") from None
    unknown = sorted(data.keys() - _CONFIG.keys() - set(_TABLES) - _SETTINGS.keys())
    if unknown:
        known = [*_CONFIG, *_TABLES, *_SETTINGS]
        raise SpecError(f"{path}: unknown key {unknown[0]!r}; a spec takes {', '.join(known)}")
    for name in _TABLES:
        if not isinstance(data.get(name, {}), dict):
            raise SpecError(f"{path}: {name!r} must be a table ([{name}])")
    base = {k: data.get(k, default) for k, default in _CONFIG.items()} | {"options": data.get("options", {})}
    grid = _grid(path, data.get("grid", {}))
    sample = data.get("sample", {})
    unknown = sorted(sample.keys() - {"n", "seed"})
    if unknown:
        raise SpecError(f"{path}: unknown key {unknown[0]!r} in [sample]; it takes n and seed")
    n, seed = sample.get("n"), sample.get("seed", 0)
    if n is not None and not (_is_whole(n) and n >= 1):
        raise SpecError(f"{path}: [sample] n must be a whole number ≥ 1, not {n!r}")
    if not _is_whole(seed):
        raise SpecError(f"{path}: [sample] seed must be a whole number, not {seed!r}")
    timeout = data.get("timeout", _SETTINGS["timeout"])
    if not (_is_number(timeout) and timeout > 0):
        raise SpecError(f"{path}: timeout must be a positive number of seconds, not {timeout!r}")
    slo = data.get("slo", {})
    bad = sorted(k for k, v in slo.items() if k not in _METRICS or not _is_number(v) or v <= 0)
    if bad:
        raise SpecError(
            f"{path}: [slo] {bad[0]} = {slo[bad[0]]!r}; SLOs are upper bounds in ms (a positive number) on "
            f"{', '.join(_METRICS)}"
        )
    prices = _prices(path, data.get("prices", {}))
    spec = SweepSpec(
        path=path,
        base=base,
        grid=grid,
        sample=n,
        seed=seed,
        slo={k: float(v) for k, v in slo.items()},
        prices=prices,
        timeout=float(timeout),
        ops=data.get("ops", _SETTINGS["ops"]),
        frontier=data.get("frontier", _SETTINGS["frontier"]),
    )
    _check(spec)
    return spec


def _prices(path: Path, table: dict) -> dict[str, float]:
    """USD per GPU-hour by GPU key ('H100-SXM' is 'h100')."""
    from revati.hardware import gpu

    prices = {}
    for name, value in table.items():
        if not _is_number(value) or value < 0:
            raise SpecError(f"{path}: [prices] {name} must be USD per GPU-hour (a number ≥ 0)")
        try:
            prices[gpu(name).key] = float(value)
        except ValueError as e:
            raise SpecError(f"{path}: [prices]: {e}") from None
    return prices


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _grid(path: Path, table: dict) -> dict[str, list]:
    """Axes from [grid]: `gpu = [...]` for a configuration key, [grid.options] and [grid.workload] for engine
    options and workload fields."""
    axes: dict[str, list] = {}
    for key, values in table.items():
        if key in ("options", "workload") and isinstance(values, dict):
            for name, inner in values.items():
                axes[f"{key}.{name}"] = inner
        elif key in _CONFIG:
            axes[key] = values
        else:
            raise SpecError(
                f"{path}: unknown key {key!r} in [grid]; axes are {', '.join(_CONFIG)}, "
                "[grid.options] NAME (engine options) and [grid.workload] FIELD (workload fields)"
            )
    if not axes:
        raise SpecError(
            f"{path}: the grid is empty; give [grid] at least one axis, e.g. gpu = ['h100', 'h200']"
        )
    for axis, values in axes.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"{path}: [grid] {axis} must be a non-empty list of values, not {values!r}")
        if len(set(map(repr, values))) != len(values):
            raise SpecError(f"{path}: [grid] {axis} repeats a value: {values!r}")
    return axes


def _check(spec: SweepSpec) -> None:
    """Every value the grid can take, checked once before anything runs. Combinations that cannot run (a
    TP degree that does not divide a model's heads) are left to the points, which record why."""
    from revati.engines import ENGINES, engine_options
    from revati.hardware import gpu
    from revati.models import load_config

    where = spec.path
    values = {k: [spec.base[k]] for k in _CONFIG} | {
        k: v for k, v in spec.grid.items() if not k.startswith(("options.", "workload."))
    }
    for key, values_of_key in values.items():
        for value in values_of_key:
            if not (isinstance(value, _TYPES[key]) and not isinstance(value, bool)):
                kind = "a whole number" if key == "tp" else "a string"
                raise SpecError(f"{where}: {key} must be {kind}, not {value!r}")
    todo = points(spec)
    for key in ("model", "profile", "workload"):  # as the points name them: files found beside the spec
        values[key] = list(dict.fromkeys(p.config[key] for p in todo))
    names = {
        *spec.base["options"],
        *(k.removeprefix("options.") for k in spec.grid if k.startswith("options.")),
    }
    for engine in values["engine"]:
        if engine not in ENGINES:
            raise SpecError(f"{where}: unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
        unknown = sorted(names - engine_options(engine).keys())
        if unknown:
            raise SpecError(
                f"{where}: engine option {unknown[0]!r} is not one of {engine}'s: "
                f"{', '.join(engine_options(engine))}"
            )
    for name in values["gpu"]:
        if name is not None:
            try:
                gpu(name)
            except ValueError as e:
                raise SpecError(f"{where}: gpu: {e}") from None
    for model in values["model"]:
        try:
            load_config(model)
        except (ValueError, OSError) as e:
            raise SpecError(f"{where}: model: {e}") from None
    for tp in values["tp"]:
        if tp < 1:
            raise SpecError(f"{where}: tp must be a whole number ≥ 1, not {tp!r}")
    for key, allowed in (
        ("dtype", ("bfloat16", "float16", "float32")),
        ("host_time", ("deterministic", "wall")),
    ):
        bad = [v for v in values[key] if v not in allowed]
        if bad:
            raise SpecError(f"{where}: {key} {bad[0]!r}; use {' or '.join(allowed)}")
    for profile in values["profile"]:
        if profile not in (None, "roofline") and not Path(profile).is_file():  # read by each point
            raise SpecError(f"{where}: profile {profile!r}: no such file")
    if spec.ops not in ("all", "sample", "none"):
        raise SpecError(f"{where}: ops must be all, sample or none, not {spec.ops!r}")
    if spec.frontier not in _METRICS:
        raise SpecError(
            f"{where}: frontier {spec.frontier!r}: the latency to plot, one of {', '.join(_METRICS)}"
        )
    for workload in values["workload"]:
        try:
            parse_workload(workload)
        except (WorkloadError, OSError) as e:
            raise SpecError(f"{where}: {e}") from None


def points(spec: SweepSpec) -> list[Point]:
    """The points to run: the whole grid, or a seeded random sample of it, in grid order."""
    axes = list(spec.grid)
    indices = range(spec.size)
    if spec.sample is not None and spec.sample < spec.size:
        indices = sorted(random.Random(spec.seed).sample(indices, spec.sample))
    return [_point(spec, i, axes) for i in indices]


def _point(spec: SweepSpec, index: int, axes: list[str]) -> Point:
    params, rest = {}, index
    for axis in reversed(axes):  # mixed radix, last axis fastest, as itertools.product
        values = spec.grid[axis]
        params[axis] = values[rest % len(values)]
        rest //= len(values)
    params = {a: params[a] for a in axes}
    config = {k: v for k, v in spec.base.items() if k != "options"} | {"options": dict(spec.base["options"])}
    fields = {}
    for axis, value in params.items():
        kind, _, name = axis.partition(".")
        if kind == "options":
            config["options"][name] = value
        elif kind == "workload" and name:
            fields[name] = value
        else:
            config[axis] = value
    if fields:
        try:
            config["workload"] = with_fields(config["workload"], fields)
        except WorkloadError as e:
            raise SpecError(f"{spec.path}: [grid.workload]: {e}") from None
    for key in ("model", "profile", "workload"):  # files named in a spec are found beside it
        config[key] = _beside(spec.path, config[key])
    return Point(index, params, config)


def _identity(value):
    """A file named in a configuration as its name and a hash of its bytes; anything else as it is."""
    if not isinstance(value, str):
        return value
    location, sep, query = value.partition("?")
    path = Path(location)
    if not path.exists():
        return value
    target = path / "config.json" if path.is_dir() else path  # a model directory: its config
    if not target.is_file():
        return value
    stat = target.stat()
    return f"{path.name}#{_digest(target.resolve(), stat.st_mtime_ns, stat.st_size)}{sep}{query}"


@functools.lru_cache(maxsize=256)
def _digest(path: Path, mtime_ns: int, size: int) -> str:  # keyed by mtime and size: read once per version
    return hashlib.sha1(path.read_bytes()).hexdigest()[:12]


def _beside(spec_path: Path, value):
    """A file a spec names (model config, profile, workload trace) is looked for beside the spec first, then
    from the working directory; names and generated workloads stay as they are."""
    if not isinstance(value, str):
        return value
    location, sep, query = value.partition("?")
    candidate = spec_path.parent / location
    if Path(location).is_absolute() or not candidate.exists():
        return value
    return str(candidate.resolve()) + sep + query


# --- one point -------------------------------------------------------------------------------------


class Children:
    """The points' processes a sweep has running, so that stopping it stops them all, including one whose
    process is still starting (the first waits seconds for the fork server's imports)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._live: set = set()
        self.stopping = threading.Event()

    def start(self, child) -> bool:
        """Start `child` unless the sweep is stopping; False when it was not started."""
        with self._lock:
            if self.stopping.is_set():
                return False
            self._live.add(child)
        child.start()
        if self.stopping.is_set():  # stopped while it started: stop_all may have seen no pid yet
            _kill(child)
        return True

    def done(self, child) -> None:
        with self._lock:
            self._live.discard(child)

    def stop_all(self) -> None:
        """Kill every point running and start no more."""
        self.stopping.set()
        with self._lock:
            for child in self._live:
                if child.pid is not None:
                    _kill(child)


def _kill(child) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)  # the point's session: what it started too
    child.kill()


def run_point(
    point: Point, trace_dir: Path, timeout: float, ops: str, children: Children | None = None
) -> dict:
    """Emulate one point in a process of its own; the row of its outcome (status 'ok', 'failed', 'oom' or
    'timeout', with the error in the emulation's own words). Never raises for a point that went wrong."""
    started = time.perf_counter()
    try:
        return _run_point(point, trace_dir, timeout, ops, children or Children(), started)
    except Exception as e:  # a point that broke in an unforeseen way is a failed point, not a failed sweep
        if "bootstrapping phase" in str(e):  # the fork server re-imported an unguarded main script
            raise SweepError(
                "a script that calls run_sweep needs its work under `if __name__ == '__main__':` (points are "
                "forked from a server that imports the script's main module, as with any multiprocessing)"
            ) from None
        message = " ".join(str(e).split())
        return _failure(point, "failed", f"{type(e).__name__}: {message[:500]}", started)


def _run_point(point: Point, trace_dir: Path, timeout: float, ops: str, children: Children, started) -> dict:
    shutil.rmtree(trace_dir, ignore_errors=True)  # what an interrupted attempt left
    with tempfile.TemporaryDirectory(prefix="revati-point-") as tmp:
        stdout, stderr = Path(tmp) / "stdout", Path(tmp) / "stderr"
        child = _forkserver().Process(
            target=_emulate, args=(point.argv(trace_dir, ops), str(stdout), str(stderr))
        )
        if not children.start(child):
            return _failure(point, "failed", "the sweep stopped before this point started", started)
        try:
            child.join(timeout)
            if child.is_alive():
                _kill(child)
                child.join()
                return _failure(
                    point, "timeout", f"no result after {timeout:g} s (the spec's timeout)", started
                )
        finally:
            children.done(child)
        said = stdout.read_text(errors="replace") if stdout.exists() else ""
        complaint = stderr.read_text(errors="replace") if stderr.exists() else ""
    if child.exitcode == 0:
        try:
            figures = json.loads(said[said.index("{") :])
        except ValueError:
            return _failure(point, "failed", f"unreadable output: {said[-300:]!r}", started)
        figures["run_id"] = _run_id(trace_dir)
        return _row(point, "ok", None, figures, time.perf_counter() - started)
    error = _error_line(complaint, child.exitcode)
    return _failure(point, "oom" if "out of memory" in error else "failed", error, started)


def _run_id(trace_dir: Path) -> str | None:
    from revati.schema import TraceError, read_table

    try:
        return read_table(trace_dir, "run").column("run_id")[0].as_py()
    except (TraceError, OSError, IndexError):
        return None


# What `revati emulate` imports (~5 s on a laptop core): loaded once by a fork server, which then forks a
# fresh process per point that starts with them in place.
_PRELOAD = ["revati.cli", "revati.engines", "replayer.run", "transformers.models.llama.modeling_llama"]
_CONTEXT = None
_CONTEXT_LOCK = threading.Lock()


def _forkserver():
    global _CONTEXT
    with _CONTEXT_LOCK:
        if _CONTEXT is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(_PRELOAD)
            _CONTEXT = context
        return _CONTEXT


def _emulate(args: list[str], stdout: str, stderr: str) -> None:
    """A point's process: `revati emulate ARGS`, its output to files, alone in its session."""
    os.setsid()  # Ctrl-C at a terminal reaches the sweep, which stops its points itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    import torch

    torch.set_num_threads(1)  # points run side by side, one core each
    from revati.cli import main

    sys.argv = ["revati", *args]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _die_with_parent() -> None:
    """Die when the process that started this one does: a fork server left behind by a killed sweep or Ray
    worker exits, and its points must not run on."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _error_line(stderr: str, exitcode: int | None) -> str:
    """What went wrong in a point's process: its `revati:` message, else the exception its last traceback
    ends with, else the signal that killed it or its exit code, with its last line of output."""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("revati:")]
    if said:
        return said[-1].removeprefix("revati:").strip()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        ends = [line for line in lines[starts[-1] + 1 :] if not line.startswith(" ")]
        if ends:
            return ends[0][:500]
    if exitcode is not None and exitcode < 0:
        how = f"killed by {signal.Signals(-exitcode).name}"
    else:
        how = f"exit code {exitcode}"
    return f"{how}; its last output: {lines[-1][:300]}" if lines else how


def _failure(point: Point, status: str, error: str, started: float) -> dict:
    return _row(point, status, error, {}, time.perf_counter() - started)


POINT = pa.schema(
    [
        pa.field("point_id", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # ok, failed, oom, timeout
        ("error", pa.string()),
        ("params", pa.string()),  # JSON: this point's grid values
        ("engine", pa.string()),
        ("model", pa.string()),
        ("workload", pa.string()),
        ("gpu", pa.string()),
        ("tp", pa.int64()),
        ("dtype", pa.string()),
        ("profile", pa.string()),
        ("host_time", pa.string()),
        ("options", pa.string()),  # JSON
        ("requests", pa.int64()),
        *[(name, pa.float64()) for name in _METRICS],
        ("throughput_tok_s", pa.float64()),
        ("throughput_req_s", pa.float64()),
        ("virtual_seconds", pa.float64()),
        ("peak_memory_gib", pa.float64()),
        ("weights_memory_gib", pa.float64()),
        ("synthesized_values", pa.int64()),
        ("clock_stalls", pa.int64()),
        ("cost_model", pa.string()),
        ("wall_seconds", pa.float64()),  # this machine's time for the point, start-up included
        ("trace", pa.string()),  # the point's trace directory, relative to the sweep's
        ("run_id", pa.string()),  # its run in that trace: joins with the trace's tables
        ("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)
# Added when the results are put together, so a changed [slo] or [prices] needs no point run again.
RESULTS = pa.schema(
    [
        *POINT,
        ("slo_met", pa.bool_()),
        ("slo_missed", pa.string()),  # the SLOs this point misses, comma-separated
        ("gpu_hour_usd", pa.float64()),  # price of the configuration's GPUs (tp of them) per hour
        ("usd_per_mtok", pa.float64()),  # per million output tokens at the emulated throughput
        ("on_frontier", pa.bool_()),
    ]
)
# Depend on the run (the machine's speed, the clock, a fresh id), not on the configuration: left out when
# two sweeps' results are compared.
RUN_COLUMNS = ("wall_seconds", "finished_at", "run_id")


def _row(point: Point, status: str, error: str | None, figures: dict, wall: float) -> dict:
    c = point.config
    row = {
        "point_id": point.point_id,
        "index": point.index,
        "status": status,
        "error": error,
        "params": json.dumps(point.params, sort_keys=True),
        **{k: c[k] for k in ("engine", "model", "workload", "gpu", "tp", "dtype", "profile", "host_time")},
        "options": json.dumps(c["options"], sort_keys=True),
        "wall_seconds": wall,
        "trace": f"traces/{point.point_id}" if status == "ok" else None,
        "finished_at": datetime.now(UTC),
    }
    for name in POINT.names:
        if name in figures and name not in ("trace", "wall_seconds"):
            row[name] = figures[name]
    return row


# --- running a sweep -------------------------------------------------------------------------------


@dataclass
class SweepRun:
    """A sweep's outcome: every point's row (this run's and earlier runs'), and what this run did."""

    # out/: spec.toml (the spec as run), points/<id>.parquet, traces/<id>/, results.parquet, frontier.png

    spec: SweepSpec
    out: Path
    results: pa.Table
    ran: int  # points run now
    skipped: int  # points found done by an earlier run
    wall_seconds: float

    def rows(self) -> list[dict]:
        """The results as dicts, in grid order."""
        return self.results.to_pylist()


class Interrupted(Exception):
    """The sweep was stopped (SIGINT / SIGTERM); the points finished before that are kept."""

    def __init__(self, done: int, total: int):
        super().__init__(f"interrupted with {done} of {total} points done")
        self.done, self.total = done, total


def run_sweep(
    spec: SweepSpec,
    out: Path,
    *,
    backend: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    retry_failed: bool = False,
    on_point: Callable[[dict], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> SweepRun:
    """Run the points of `spec` not already done under `out`; write results.parquet and frontier.png, and
    return the results. From a script, call it under `if __name__ == "__main__":` (points are forked from
    a server that imports the main module)."""
    todo = points(spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / "points").mkdir(exist_ok=True)
    (out / "spec.toml").write_text(spec.path.read_text())
    done = _done(out, retry_failed)
    pending = [p for p in todo if p.point_id not in done]
    if on_start is not None:
        on_start(len(todo) - len(pending), len(pending))
    started = time.perf_counter()

    def record(row: dict) -> None:
        write_atomically(pa.Table.from_pylist([row], schema=POINT), _point_file(out, row["point_id"]))
        if on_point is not None:
            on_point(row)

    if pending:
        # Ray first: ray.init installs its own SIGTERM handler, which the sweep's replaces while it runs
        joined = backend == "ray" and connect_ray(ray_address, workers)
        with _sigterm_interrupts():
            try:
                if backend == "ray":
                    _run_ray(pending, out, spec, workers, record)
                else:
                    _run_local(pending, out, spec, workers, record)
            except KeyboardInterrupt:
                finished = (
                    len(todo) - len(pending) + sum(_point_file(out, p.point_id).exists() for p in pending)
                )
                raise Interrupted(finished, len(todo)) from None
            finally:
                if joined:
                    import ray

                    ray.shutdown()
    results = _results(spec, out, todo)
    write_atomically(results, out / "results.parquet")
    run = SweepRun(spec, out, results, len(pending), len(todo) - len(pending), time.perf_counter() - started)
    frontier_plot(run, out / "frontier.png")
    return run


def _point_file(out: Path, point_id: str) -> Path:
    """Where a finished point's row lies: its presence is what makes the point done."""
    return out / "points" / f"{point_id}.parquet"


def _done(out: Path, retry_failed: bool) -> set[str]:
    done = set()
    for path in (out / "points").glob("*.parquet"):
        if retry_failed:
            status = pq.read_table(path, columns=["status"]).column("status")[0].as_py()
            if status != "ok":
                continue
        done.add(path.stem)
    return done


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops a sweep as Ctrl-C does: finished points kept, running ones stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _run_local(pending, out, spec, workers, record) -> None:
    """A pool of `workers` emulations at a time, each in its own process; rows written as they finish."""
    children = Children()
    pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1, thread_name_prefix="sweep")
    futures = [
        pool.submit(run_point, p, out / "traces" / p.point_id, spec.timeout, spec.ops, children)
        for p in pending
    ]
    try:
        for future in as_completed(futures):
            record(future.result())
    except BaseException:
        children.stop_all()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- Ray -------------------------------------------------------------------------------------------


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast (ConnectionError) when nothing listens at a Ray address (`ray.init` retries for minutes)."""
    if address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://").rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"Ray address {address!r} is not HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach a Ray cluster at {address} ({e.strerror or e})") from None


def _ray_point(point: Point, timeout: float, ops: str) -> tuple[dict, dict[str, bytes]]:
    """A point on a Ray worker, which may be another machine: the trace comes back as its files' bytes."""
    with tempfile.TemporaryDirectory(prefix="revati-point-") as tmp:
        trace = Path(tmp) / "trace"
        row = run_point(point, trace, timeout, ops)
        files = {str(f.relative_to(trace)): f.read_bytes() for f in trace.rglob("*") if f.is_file()}
    return row, files


def connect_ray(address: str | None, workers: int | None = None) -> bool:
    """Join the Ray cluster at `address` (HOST:PORT, ray://HOST:PORT, auto), or start a local Ray instance
    when it is None; True when this call started or joined it. ConnectionError says why it could not."""
    import ray

    if ray.is_initialized():
        return False
    if address in (None, "local"):
        ray.init(
            num_cpus=workers or os.cpu_count(), include_dashboard=False, log_to_driver=False,
            object_store_memory=200 * 2**20,  # rows and small traces pass through it, nothing more
        )  # fmt: skip
        return True
    check_ray_address(address)
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError) as e:
        raise ConnectionError(f"cannot join a Ray cluster at {address} ({str(e).splitlines()[0]})") from None
    return True


def _run_ray(pending, out, spec, workers, record) -> None:
    """The same points as Ray tasks on the Ray this process is connected to, at most `workers` in flight
    (default: the cluster's CPUs)."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=0)(_ray_point)
    limit = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    queue = list(pending)
    flying: dict = {}  # task → (point, when it was submitted)
    try:
        while queue or flying:
            while queue and len(flying) < limit:
                p = queue.pop(0)
                flying[task.remote(p, spec.timeout, spec.ops)] = (p, time.perf_counter())
            ready, _ = ray.wait(list(flying), num_returns=1, timeout=0.5)
            for ref in ready:
                p, submitted = flying.pop(ref)
                try:
                    row, files = ray.get(ref)
                except ray.exceptions.RayError as e:  # the worker died under the point
                    oom = isinstance(e, ray.exceptions.OutOfMemoryError)
                    row = _failure(p, "oom" if oom else "failed", f"Ray: {str(e).splitlines()[0]}", submitted)
                    files = {}
                _write_files(out / "traces" / p.point_id, files)
                record(row)
    except ray.exceptions.RayError as e:
        raise SweepError(f"the Ray cluster failed the sweep: {str(e).splitlines()[0]}") from None
    except BaseException:
        for ref in flying:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    shutil.rmtree(folder, ignore_errors=True)  # what an earlier attempt left
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)


# --- results ---------------------------------------------------------------------------------------


def _results(spec: SweepSpec, out: Path, todo: list[Point]) -> pa.Table:
    """This spec's rows, in grid order, judged against its SLOs and prices, the frontier marked."""
    rows = []
    for p in todo:
        path = _point_file(out, p.point_id)
        if path.exists():
            row = pq.read_table(path).to_pylist()[0]
            row.update(index=p.index, params=json.dumps(p.params, sort_keys=True))  # this spec's numbering
            rows.append(row)
    for row in rows:
        missed = [k for k, bound in spec.slo.items() if row["status"] == "ok" and not _within(row[k], bound)]
        row["slo_met"] = row["status"] == "ok" and not missed
        row["slo_missed"] = ", ".join(missed) or None
        price = _price(spec, row["gpu"])
        row["gpu_hour_usd"] = price * row["tp"] if price is not None else None
        tok_s = row.get("throughput_tok_s")
        row["usd_per_mtok"] = (
            row["gpu_hour_usd"] / 3600 / tok_s * 1e6 if price is not None and tok_s else None
        )
    frontier = {r["point_id"] for r in pareto(rows, spec.frontier)}
    for row in rows:
        row["on_frontier"] = row["point_id"] in frontier
    return pa.Table.from_pylist(rows, schema=RESULTS)


def _price(spec: SweepSpec, key: str | None) -> float | None:
    """USD per GPU-hour: the spec's [prices], else the hardware table's, where either has one."""
    from revati.hardware import GPUS

    if key is None:
        return None
    return spec.prices.get(key, GPUS[key].price_per_hour if key in GPUS else None)


def _within(value, bound: float) -> bool:
    return value is not None and value <= bound


def pareto(rows: list[dict], latency: str) -> list[dict]:
    """The points no other point beats on both throughput (higher) and `latency` (lower), by latency."""
    ok = [r for r in rows if r["status"] == "ok" and r.get(latency) is not None and r.get("throughput_tok_s")]
    ok.sort(key=lambda r: (r[latency], -r["throughput_tok_s"]))
    front, best = [], -math.inf
    for r in ok:
        if r["throughput_tok_s"] > best:
            front.append(r)
            best = r["throughput_tok_s"]
    return front


def best(rows: list[dict], by: str = "throughput") -> dict | None:
    """The configuration meeting every SLO with the highest throughput, or (by='cost') the lowest USD per
    million tokens; None when no point meets them."""
    met = [r for r in rows if r["slo_met"]]
    if by == "cost":
        priced = [r for r in met if r["usd_per_mtok"] is not None]
        return min(priced, key=lambda r: (r["usd_per_mtok"], r["index"])) if priced else None
    return max(met, key=lambda r: (r["throughput_tok_s"], -r["index"])) if met else None


def axes_label(row: dict) -> str:
    """A point named by its grid values: 'gpu=h200 tp=2 options.max_batch_tokens=512'."""
    return " ".join(f"{k}={v}" for k, v in json.loads(row["params"]).items())


def frontier_plot(run: SweepRun, path: Path) -> Path:
    """A PNG of throughput against the frontier latency: every point, the SLO-meeting ones, the frontier
    (numbered as in results.parquet), the best configuration under the SLOs."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    rows, latency = run.rows(), run.spec.frontier
    ok = [r for r in rows if r["status"] == "ok" and r[latency] is not None]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for met, style in (
        (False, dict(c="0.6", label="misses an SLO")),
        (True, dict(c="tab:blue", label="meets the SLOs")),
    ):
        chosen = [r for r in ok if r["slo_met"] == met]
        if chosen:
            ax.scatter([r[latency] for r in chosen], [r["throughput_tok_s"] for r in chosen], s=28, **style)
    front = pareto(rows, latency)
    if front:
        ax.plot(
            [r[latency] for r in front], [r["throughput_tok_s"] for r in front], "-o", c="tab:red",
            mfc="none", ms=10, label="frontier (#: point index)",
        )  # fmt: skip
        for r in front:
            ax.annotate(f"#{r['index']}", (r[latency], r["throughput_tok_s"]), xytext=(6, -10),
                        textcoords="offset points", fontsize=7, color="tab:red")  # fmt: skip
    top = best(rows)
    if top is not None:
        label = "best under the SLOs:\n" + "\n".join(
            f"  {k} = {v}" for k, v in json.loads(top["params"]).items()
        )
        ax.scatter([top[latency]], [top["throughput_tok_s"]], marker="*", s=260, c="gold", ec="k", zorder=5,
                   label=label)  # fmt: skip
    if latency in run.spec.slo:
        ax.axvline(
            run.spec.slo[latency], ls="--", c="0.4", lw=1, label=f"SLO: {latency} ≤ {run.spec.slo[latency]:g}"
        )
    if not ok:
        ax.text(0.5, 0.5, "no point finished", ha="center", va="center", transform=ax.transAxes)
    metric, percentile, _ = latency.split("_")
    ax.set_xlabel(f"{metric.upper()} {percentile} (ms)")
    ax.set_ylabel("throughput (output tok/s)")
    ax.set_title(f"{run.spec.path.name}: {len(ok)} of {len(rows)} points finished")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
