"""DuckDB views over traces, recorded and emulated alike: the one place the analysis SQL lives.

`open_traces({"recorded": [dir, ...], "emulated": [dir, ...]})` returns a DuckDB connection whose views
hold every named set of traces side by side, each row tagged with its `side` (the name given):

- `runs`          one row per run: device, model, engine, workload, source, profile
- `requests`      one row per request, with TTFT, TPOT and E2E derived (seconds)
- `itl`           one row per gap between two tokens of a request
- `iterations`    one row per engine step, with its host and device time
- `ops`           one row per op (what the trace kept), warm-up rows left out
- `op_shapes`     per op shape (key, input shapes, dtypes, scalars): rows and mean device time
- `throughput`    per run: output tokens and requests per second, first arrival to last token

Each view is one SQL statement below; `VIEWS` is the whole vocabulary. DuckDB reads the Parquet files
in place: `con.sql("select side, quantile_cont(ttft, 0.5) from requests group by side")`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import duckdb

from revati.metrics import relative_error
from revati.schema import TABLES, TraceError, table_parts, trace_dirs
from revati.workloads import workload_identity

# {table_name} is replaced by a union over every side's parts of that trace table (see `open_traces`).
VIEWS: dict[str, str] = {
    "runs": """
        select side, run_id, source, device_kind, device_name, engine, model, workload, host_time_mode,
               profile, torch_version, started_at
        from {run}
    """,
    "requests": """
        select side, run_id, request_id, arrival, prompt_tokens, output_tokens,
               token_times[1] as first_token, token_times[-1] as completion,
               token_times[1] - arrival as ttft,
               token_times[-1] - arrival as e2e,
               case when output_tokens > 1
                    then (token_times[-1] - token_times[1]) / (output_tokens - 1) end as tpot
        from {requests}
        where len(token_times) > 0
    """,
    "itl": """
        select side, run_id, request_id, token_times[i + 1] - token_times[i] as itl
        from (select *, unnest(range(1, len(token_times))) as i from {requests})
    """,
    "iterations": """
        select side, run_id, iteration_id, phase, batch_size, tokens, kv_tokens,
               host_end - host_start as host_time, device_end - device_start as device_time
        from {iterations}
    """,
    "ops": """
        select side, run_id, op_id, name as key, input_shapes, dtypes, scalars, iteration_id,
               host_duration, device_duration, predicted, extrapolated
        from {ops}
        where not warmup and not (in_graph and parent_id is null)  -- captured ops run nothing
    """,
    "op_shapes": """
        select side, key, input_shapes, dtypes, coalesce(scalars, '') as scalars,
               count(*) as rows, avg(device_duration) as device_mean
        from ops group by all
    """,
    "throughput": """
        select side, run_id, sum(output_tokens) as tokens, count(*) as finished,
               sum(output_tokens) / (max(completion) - min(arrival)) as tok_s,
               count(*) / (max(completion) - min(arrival)) as req_s
        from requests group by side, run_id
    """,
}


def open_traces(sides: Mapping[str, Iterable[str | os.PathLike]]) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views of `VIEWS` over each named set of trace directories.

    >>> con = open_traces({"recorded": ["traces/cpu/small-hf-cb"], "emulated": ["runs/emu-1"]})
    >>> con.sql("select side, count(*) from requests group by side").fetchall()
    """
    con = duckdb.connect()
    for table in ("run", "requests", "iterations", "ops"):
        selects = []
        for side, paths in sides.items():
            parts = [str(p) for path in paths for d in trace_dirs(path) for p in table_parts(d, table)]
            if parts:
                selects.append(
                    f"select {_quote(side)} as side, * from read_parquet({parts!r}, union_by_name=true)"
                )
        con.register(f"{table}_empty", TABLES[table].empty_table())  # every column, even with no parts
        empty = f"select null::varchar as side, * from {table}_empty"
        con.execute(f"create view {table}_parts as " + " union all by name ".join([*selects, empty]))
    for name, sql in VIEWS.items():
        con.execute(f"create view {name} as " + sql.format(**{t: f"{t}_parts" for t in TABLES}))
    return con


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# --- comparing two sides ------------------------------------------------------------------------------

# Named queries of `compare`, over the views above; {a} and {b} are the two sides' names, quoted.
QUERIES: dict[str, str] = {
    "percentiles": """
        select side, metric, quantile_cont(value, [0.5, 0.9, 0.99]) as p
        from (
            select side, 'ttft' as metric, ttft as value from requests
            union all select side, 'tpot', tpot from requests where tpot is not null
            union all select side, 'itl', itl from itl
            union all select side, 'e2e', e2e from requests
        ) group by side, metric
    """,
    "throughput": "select side, avg(tok_s), avg(req_s), count(*) as runs from throughput group by side",
    # requests of the two sides with the same id (averaged over runs of a side), relative error per metric
    "per_request": """
        with a as (select request_id, avg(ttft) ttft, avg(tpot) tpot, avg(e2e) e2e from requests
                   where side = {a} group by request_id),
             b as (select request_id, avg(ttft) ttft, avg(tpot) tpot, avg(e2e) e2e from requests
                   where side = {b} group by request_id)
        select count(*) as matched,
               avg(abs(b.ttft - a.ttft) / a.ttft) as ttft, avg(abs(b.tpot - a.tpot) / a.tpot) as tpot,
               avg(abs(b.e2e - a.e2e) / a.e2e) as e2e
        from a join b using (request_id)
    """,
    # per op key: time-weighted error of the mean device time of shapes both sides ran
    "op_keys": """
        with a as (select * from op_shapes where side = {a}), b as (select * from op_shapes where side = {b}),
             total as (select sum(rows * device_mean) as t from a)
        select a.key, sum(a.rows * a.device_mean) as measured, sum(a.rows * b.device_mean) as predicted,
               sum(a.rows * abs(b.device_mean - a.device_mean)) / any_value(total.t) as error_share
        from a join b using (key, input_shapes, dtypes, scalars), total
        where a.device_mean > 0
        group by a.key order by error_share desc
    """,
    "op_coverage": """
        with a as (select * from op_shapes where side = {a} and device_mean > 0),
             b as (select * from op_shapes where side = {b})
        select sum(a.rows * a.device_mean) filter (where b.key is not null) / sum(a.rows * a.device_mean)
        from a left join b using (key, input_shapes, dtypes, scalars)
    """,
    "identity": "select side, model, device_kind, engine, workload, source from runs",
}

METRICS = ("ttft", "tpot", "itl", "e2e")
_STATS = ("p50", "p90", "p99")


@dataclass
class Comparison:
    """Recorded against emulated (or any two sides): figures side by side and their relative errors."""

    figures: dict[str, tuple[float | None, float | None, float | None]]  # name -> (recorded, emulated, error)
    matched_requests: int
    per_request: dict[str, float | None]  # mean relative error per request, by metric (ids matched)
    op_keys: list[dict]  # key, measured, predicted, error_share (time-weighted, shapes both sides ran)
    op_coverage: float | None  # share of recorded device time in shapes the other side ran too
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """Plain JSON-able values (for `revati compare --json`)."""
        return {
            "figures": {
                k: dict(zip(("recorded", "emulated", "error"), v, strict=True))
                for k, v in self.figures.items()
            },
            "matched_requests": self.matched_requests,
            "per_request_error": self.per_request,
            "op_keys": self.op_keys,
            "op_coverage": self.op_coverage,
            "warnings": self.warnings,
        }


def compare(
    recorded: Iterable, emulated: Iterable, names: tuple[str, str] = ("recorded", "emulated")
) -> Comparison:
    """Compare two sets of traces: latency percentiles, throughput, per-request and per-op errors.

    >>> compare(["traces/h100/cb-eager-timeline"], ["runs/emu-1"]).figures["tpot_p50"]
    (0.0994, 0.0938, 0.056)
    """
    a, b = names
    con = open_traces({a: recorded, b: emulated})
    q = {name: sql.format(a=_quote(a), b=_quote(b)) for name, sql in QUERIES.items()}
    warnings = _comparable(con.execute(q["identity"]).fetchall(), a, b)
    figures: dict[str, tuple] = {}
    percentiles = {(side, metric): p for side, metric, p in con.execute(q["percentiles"]).fetchall()}
    for metric in METRICS:
        for i, stat in enumerate(_STATS):
            r, e = (percentiles.get((side, metric)) for side in (a, b))
            figures[f"{metric}_{stat}"] = _row(r[i] if r else None, e[i] if e else None)
    throughput = {side: (tok, req) for side, tok, req, _ in con.execute(q["throughput"]).fetchall()}
    for i, name in enumerate(("throughput_tok_s", "throughput_req_s")):
        figures[name] = _row(*(throughput[s][i] if s in throughput else None for s in (a, b)))
    same_workload = not any("workloads differ" in w for w in warnings)
    matched, *errors = con.execute(q["per_request"]).fetchall()[0] if same_workload else (0, None, None, None)
    per_request = (
        dict(zip(("ttft", "tpot", "e2e"), errors, strict=True))
        if matched
        else dict.fromkeys(("ttft", "tpot", "e2e"))
    )
    if not matched:
        why = "no request ids match between the two sides" if same_workload else "the workloads differ"
        warnings.append(f"{why}: only the distributions are compared, not request by request")
    op_keys = [
        {"key": k, "measured": m, "predicted": p, "error_share": s}
        for k, m, p, s in con.execute(q["op_keys"]).fetchall()
    ]
    coverage = con.execute(q["op_coverage"]).fetchall()[0][0]
    return Comparison(figures, int(matched), per_request, op_keys, coverage, warnings)


def _row(recorded: float | None, emulated: float | None) -> tuple:
    if recorded is None or emulated is None:
        return recorded, emulated, None
    return recorded, emulated, relative_error(emulated, recorded)


def _comparable(identity: list[tuple], a: str, b: str) -> list[str]:
    """Warnings for sides that are not the same serving run: other models, devices, engines, workloads."""
    sides = {
        side: [
            (*row[1:4], workload_identity(row[4]) if row[4] is not None else None)
            for row in identity
            if row[0] == side
        ]
        for side in (a, b)
    }
    for side, rows in sides.items():
        if not rows:
            raise TraceError(f"the {side} traces hold no run row")
    warnings = []
    for i, what in enumerate(("model", "device", "engine", "workload")):
        left, right = {r[i] for r in sides[a]}, {r[i] for r in sides[b]}
        if left != right:
            warnings.append(
                f"not comparable: the {what}s differ ({a}: {', '.join(sorted(map(str, left)))}; "
                f"{b}: {', '.join(sorted(map(str, right)))})"
            )
    return warnings
