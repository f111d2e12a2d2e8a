"""The trace schema: Arrow schemas of the run, ops, kernels, iterations and requests tables, and their IO.

A trace is a directory holding one folder per table; each folder holds numbered part files
(`ops/part-00000.parquet`, ...), each a complete Parquet file written under a temporary name and
renamed into place, so a crash loses at most the rows still in memory and readers never see half
a file. All times are seconds from the run's start; every row carries `run_id`.
"""

from __future__ import annotations

import glob
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = "1"


class TraceError(ValueError):
    """A trace directory or file that is missing, malformed or does not match the schema."""


def _req(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)


def _opt(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=True)


_SECONDS = pa.float64()

RUN = pa.schema(
    [
        _req("run_id", pa.string()),
        _req("source", pa.string()),  # 'recorded' | 'emulated'
        _req("started_at", pa.timestamp("us", tz="UTC")),
        _req("complete", pa.bool_()),
        _req("device_kind", pa.string()),  # hardware key, e.g. 'h100' or 'cpu'
        _req("device_name", pa.string()),
        _req("sm_count", pa.int32()),
        _req("memory_bytes", pa.int64()),
        _req("torch_version", pa.string()),
        _opt("cuda_version", pa.string()),
        _opt("driver_version", pa.string()),
        _req("engine", pa.string()),
        _req("model", pa.string()),
        _req("model_config", pa.string()),  # JSON
        _req("tp", pa.int32()),
        _req("pp", pa.int32()),
        _req("workload", pa.string()),  # workload spec string
        _opt("host_time_mode", pa.string()),  # 'wall' | 'deterministic' (emulated runs)
        _opt("profile", pa.string()),  # profile used (emulated runs)
        _opt("extra", pa.string()),  # JSON
    ]
)

OPS = pa.schema(
    [
        _req("run_id", pa.string()),
        _req("rank", pa.int32()),
        _req("op_id", pa.int64()),
        _opt("parent_id", pa.int64()),
        _req("name", pa.string()),  # canonical op key, e.g. 'aten::mm'
        _req("input_shapes", pa.list_(pa.list_(pa.int64()))),
        _req("dtypes", pa.list_(pa.string())),
        _opt("scalars", pa.string()),  # JSON
        _req("stream", pa.int32()),
        _req("host_start", _SECONDS),
        _req("host_duration", _SECONDS),
        _req("device_start", _SECONDS),
        _req("device_duration", _SECONDS),  # sum of the op's kernels
        _req("in_graph", pa.bool_()),  # launched while a CUDA graph was being captured
        _opt("iteration_id", pa.int64()),
        _req(
            "warmup", pa.bool_()
        ),  # ran before serving started (engine set-up, warm-up request, graph capture)
        _req("predicted", pa.bool_()),
        _req("extrapolated", pa.bool_()),
    ]
)

KERNELS = pa.schema(
    [
        _req("run_id", pa.string()),
        _req("rank", pa.int32()),
        _req("kernel_id", pa.int64()),
        _opt("op_id", pa.int64()),
        _req("name", pa.string()),
        _req("stream", pa.int32()),
        _req("grid", pa.list_(pa.int32())),
        _req("block", pa.list_(pa.int32())),
        _req("shared_memory", pa.int64()),
        _req("start", _SECONDS),
        _req("end", _SECONDS),
        _opt("graph_id", pa.int64()),
        _opt("graph_node_id", pa.int64()),
        _opt("collective", pa.string()),  # e.g. 'all_reduce'
        _opt("collective_bytes", pa.int64()),
        _opt("group_size", pa.int32()),
        _opt("seq", pa.int64()),
    ]
)

ITERATIONS = pa.schema(
    [
        _req("run_id", pa.string()),
        _req("rank", pa.int32()),
        _req("iteration_id", pa.int64()),
        _req("phase", pa.string()),  # 'prefill' | 'decode' | 'mixed'
        _req("batch_size", pa.int32()),
        _req("tokens", pa.int64()),
        _req("kv_tokens", pa.int64()),
        _req("host_start", _SECONDS),
        _req("host_end", _SECONDS),
        _req("device_start", _SECONDS),
        _req("device_end", _SECONDS),
    ]
)

REQUESTS = pa.schema(
    [
        _req("run_id", pa.string()),
        _req("request_id", pa.string()),
        _req("arrival", _SECONDS),
        _req("prompt_tokens", pa.int64()),
        _req("output_tokens", pa.int64()),
        _opt("first_token", _SECONDS),
        _opt("completion", _SECONDS),
        _req("token_times", pa.list_(_SECONDS)),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "run": RUN,
    "ops": OPS,
    "kernels": KERNELS,
    "iterations": ITERATIONS,
    "requests": REQUESTS,
}

# Columns a row may leave out although they are required: the writer fills these in.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "ops": {"in_graph": False, "warmup": False, "predicted": False, "extrapolated": False},
}

_PART_GLOB = "part-*.parquet"


def _part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _encodings(schema: pa.Schema) -> dict:
    """Parquet options that keep traces small: zstd; floats (times) byte-stream-split, which lets zstd find
    their exponents; ascending ids delta-encoded. About half the size of the defaults on real traces."""
    floats = [f.name for f in schema if pa.types.is_floating(f.type)]
    ids = [f.name for f in schema if f.name in ("op_id", "kernel_id", "parent_id")]
    return {
        "compression": "zstd",
        "compression_level": 6,
        "use_byte_stream_split": floats,
        "use_dictionary": [n for n in schema.names if n not in floats and n not in ids],
        "column_encoding": dict.fromkeys(ids, "DELTA_BINARY_PACKED"),
    }


def write_atomically(table: pa.Table, path: Path) -> None:
    """Write one complete Parquet file to a temporary name beside `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    meta = {b"revati.schema_version": SCHEMA_VERSION.encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    with open(tmp, "wb") as f:
        try:
            pq.write_table(table, f, **_encodings(table.schema))
        except (TypeError, ValueError, pa.ArrowNotImplementedError):  # an older pyarrow: plain zstd
            f.seek(0)
            f.truncate()
            pq.write_table(table, f, compression="zstd")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _to_arrow(table: str, columns: dict[str, list], run_id: str) -> pa.Table:
    """Convert buffered Python columns to an Arrow table of the schema, naming the offending column."""
    schema = TABLES[table]
    n = len(next(iter(columns.values()))) if columns else 0
    arrays = []
    for field in schema:
        if field.name == "run_id":
            arrays.append(pa.array([run_id] * n, pa.string()))
            continue
        try:
            array = pa.array(columns[field.name], type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
            raise TraceError(
                f"table {table!r}, column {field.name!r}: cannot store the appended values as {field.type} "
                f"({e}); check what is appended to that column"
            ) from e
        if not field.nullable and array.null_count:
            row = array.is_null().index(True).as_py()
            raise TraceError(
                f"table {table!r}, column {field.name!r}: value missing in row {row} of this batch, "
                f"but the column is required ({field.type}); append a value for it in every row"
            )
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=schema)


class TraceWriter:
    """Buffers trace rows per table in memory and writes them as crash-safe numbered Parquet parts.

    Example::

        with TraceWriter("out/run1", "run1") as w:
            w.write_run({...,"complete": False})
            w.append_row("ops", {"rank": 0, "op_id": 0, "name": "aten::mm", ...})
    """

    def __init__(self, out_dir: str | os.PathLike, run_id: str, flush_rows: int = 65_536):
        self.out_dir = Path(out_dir)
        self.run_id = run_id
        self.flush_rows = flush_rows
        if self.out_dir.is_dir() and any(self.out_dir.glob(f"*/{_PART_GLOB}")):
            raise TraceError(
                f"{self.out_dir} already holds a trace; write to an empty directory or delete that one first"
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._names = {t: frozenset(s.names) for t, s in TABLES.items()}
        self._buffers = {t: self._empty_buffer(t) for t in TABLES if t != "run"}
        self._rows = dict.fromkeys(self._buffers, 0)
        self._parts = dict.fromkeys(self._buffers, 0)
        self._run_row: dict | None = None
        self._lock = threading.Lock()  # engines append from worker threads; keep columns aligned
        self._closed = False

    def _empty_buffer(self, table: str) -> dict[str, list]:
        return {name: [] for name in TABLES[table].names if name != "run_id"}

    def _check_table(self, table: str) -> None:
        if table not in self._buffers:
            known = ", ".join(self._buffers)
            hint = "; use write_run() for the run table" if table == "run" else ""
            raise TraceError(f"unknown trace table {table!r}; tables are: {known}{hint}")
        if self._closed:
            raise TraceError(f"trace writer for {self.out_dir} is closed; cannot append to {table!r}")

    def _unknown_columns(self, table: str, names) -> TraceError:
        unknown = sorted(set(names) - self._names[table])
        return TraceError(
            f"table {table!r} has no column(s) {unknown}; its columns are: {', '.join(TABLES[table].names)}"
        )

    def append_row(self, table: str, row: dict) -> None:
        """Buffer one row (a dict of column values); `run_id` is stamped by the writer."""
        self._check_table(table)
        if not row.keys() <= self._names[table]:
            raise self._unknown_columns(table, row.keys())
        defaults = _DEFAULTS.get(table, {})
        with self._lock:
            for name, values in self._buffers[table].items():
                values.append(row.get(name, defaults.get(name)))
            self._rows[table] += 1
            if self._rows[table] >= self.flush_rows:
                self._flush(table)

    def append(self, table: str, rows: list[dict] | dict[str, list]) -> None:
        """Buffer rows given as a list of row dicts or as a dict of equal-length columns."""
        if isinstance(rows, dict):
            self._append_columns(table, rows)
            return
        for row in rows:
            self.append_row(table, row)

    def _append_columns(self, table: str, columns: dict[str, list]) -> None:
        self._check_table(table)
        if not columns.keys() <= self._names[table]:
            raise self._unknown_columns(table, columns.keys())
        lengths = {name: len(values) for name, values in columns.items()}
        if len(set(lengths.values())) > 1:
            raise TraceError(f"table {table!r}: appended columns differ in length: {lengths}")
        n = next(iter(lengths.values()), 0)
        defaults = _DEFAULTS.get(table, {})
        with self._lock:
            for name, values in self._buffers[table].items():
                values.extend(columns[name] if name in columns else [defaults.get(name)] * n)
            self._rows[table] += n
            if self._rows[table] >= self.flush_rows:
                self._flush(table)

    def _flush(self, table: str) -> None:
        """Write the buffered rows of one table as the next part file; caller holds the lock."""
        if self._rows[table] == 0 and self._parts[table] > 0:
            return
        arrow = _to_arrow(table, self._buffers[table], self.run_id)
        folder = self.out_dir / table
        folder.mkdir(exist_ok=True)
        write_atomically(arrow, folder / _part_name(self._parts[table]))
        self._parts[table] += 1
        self._buffers[table] = self._empty_buffer(table)
        self._rows[table] = 0

    def flush(self) -> None:
        """Write every table's buffered rows now (tables with nothing buffered are skipped)."""
        with self._lock:
            for table in self._buffers:
                if self._rows[table]:
                    self._flush(table)

    def write_run(self, row: dict) -> None:
        """Write (or rewrite) the one-row run table; `run_id` is stamped and `started_at` defaults to now."""
        if not row.keys() <= self._names["run"]:
            raise self._unknown_columns("run", row.keys())
        row = {"started_at": datetime.now(UTC), **row, "run_id": self.run_id}
        columns = {name: [row.get(name)] for name in RUN.names}
        arrow = _to_arrow("run", columns, self.run_id)
        folder = self.out_dir / "run"
        folder.mkdir(exist_ok=True)
        write_atomically(arrow, folder / _part_name(0))
        self._run_row = row

    def close(self, complete: bool = True) -> None:
        """Flush every table (an empty table still gets one empty part) and mark the run complete."""
        if self._closed:
            return
        with self._lock:
            for table in self._buffers:
                self._flush(table)
            self._closed = True
        if self._run_row is not None and complete:
            self.write_run({**self._run_row, "complete": True})

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Whether a stored column type can be cast to the schema's type without losing meaning."""
    if actual.equals(expected) or pa.types.is_null(actual):
        return True
    kinds = (pa.types.is_integer, pa.types.is_floating, pa.types.is_timestamp, pa.types.is_boolean)
    for is_kind in kinds:
        if is_kind(actual) and is_kind(expected):
            return True
    if pa.types.is_integer(actual) and pa.types.is_floating(expected):
        return True
    strings = (pa.types.is_string, pa.types.is_large_string)
    if any(s(actual) for s in strings) and any(s(expected) for s in strings):
        return True
    lists = (pa.types.is_list, pa.types.is_large_list)
    if any(k(actual) for k in lists) and any(k(expected) for k in lists):
        return _compatible(actual.value_type, expected.value_type)
    return False


def _read_part(path: Path, table: str) -> pa.Table:
    """Read one part file and cast it to the schema, or raise a TraceError naming the file and column."""
    schema = TABLES[table]
    try:
        data = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise TraceError(f"{path}: not a readable Parquet file ({e}); delete it or re-record the run") from e
    arrays = []
    for field in schema:
        if field.name not in data.column_names:
            raise TraceError(
                f"{path}: column {field.name!r} is missing; the {table!r} table needs it as {field.type}"
            )
        column = data.column(field.name)
        if not _compatible(column.type, field.type):
            raise TraceError(
                f"{path}: column {field.name!r} has type {column.type}, expected {field.type} "
                f"(schema version {SCHEMA_VERSION}); was it written by another tool or an older revati?"
            )
        if not field.nullable and column.null_count:
            raise TraceError(
                f"{path}: column {field.name!r} has {column.null_count} missing values; it is required"
            )
        arrays.append(column.cast(field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def trace_dirs(path_or_glob: str | os.PathLike) -> list[Path]:
    """The run directories a path names: itself, the runs of a `--runs N` directory, or a glob's matches."""
    text = str(path_or_glob)
    if any(c in text for c in "*?["):
        dirs = [Path(p) for p in sorted(glob.glob(text)) if Path(p).is_dir()]
        if not dirs:
            raise TraceError(f"no trace directories match {text!r}")
        return dirs
    path = Path(text)
    if not path.is_dir():
        raise TraceError(f"{path}: no such trace directory")
    if not _is_trace(path):  # a directory of runs (`revati record --runs N` writes run-1, run-2, ...)
        runs = sorted(d for d in path.iterdir() if d.is_dir() and _is_trace(d))
        if runs:
            return runs
    return [path]


def _is_trace(path: Path) -> bool:
    return any((path / t).is_dir() for t in TABLES)


def table_parts(trace_dir: Path, table: str) -> list[Path]:
    """The part files of one table of one run directory (TraceError if the directory is no trace)."""
    folder = trace_dir / table
    if not folder.is_dir():
        if not any((trace_dir / t).is_dir() for t in TABLES):
            raise TraceError(
                f"{trace_dir} is not a trace directory (it has none of the folders {', '.join(TABLES)}); "
                "pass the directory that `revati record` or `revati emulate` wrote"
            )
        raise TraceError(f"{trace_dir}: no {table!r} table (no folder {folder}); was the run cut short?")
    # Temporary files start with '.' and end in '.tmp', so this glob never sees half-written parts.
    return sorted(folder.glob(_PART_GLOB))


def read_table(path: str | os.PathLike, table: str) -> pa.Table:
    """Read and validate all parts of one table of a trace dir, or of every dir a glob matches.

    Example: ``read_table("traces/*", "requests")`` reads the requests of all runs under traces/.
    """
    if table not in TABLES:
        raise TraceError(f"unknown trace table {table!r}; tables are: {', '.join(TABLES)}")
    parts = [part for d in trace_dirs(path) for part in table_parts(d, table)]
    tables = [_read_part(part, table) for part in parts]
    if not tables:
        return TABLES[table].empty_table()
    return pa.concat_tables(tables)
