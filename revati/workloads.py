"""Workloads: requests with arrival times and token lengths, from a spec string or a request trace file.

Spec syntax (`parse_workload`):

    KIND:key=value,key=value,...

    poisson:rate=2,n=100,prompt=lognormal(1020,0.6),output=lognormal(129,0.6),max_prompt=4096,seed=0
    gamma:rate=2,cv=2,n=50,prompt=uniform(16,64),output=fixed(8)

- kinds: `poisson` (exponential gaps) and `gamma` (gamma gaps with coefficient of variation `cv`;
  cv=1 is Poisson, larger is burstier). The first request arrives at 0.
- required keys: `rate` (requests/s; `inf` = all at once), `n`, `prompt`, `output`; `cv` for gamma.
- optional keys: `seed` (default 0), `max_prompt`, `max_output` (clip lengths from above).
- lengths: `fixed(n)`, `uniform(lo,hi)` (integers, both ends included),
  `lognormal(median,sigma)` (rounded, at least 1).

A file path replays a trace, one request a row, as CSV, Parquet or JSONL (`.jsonl` / `.ndjson`),
with columns `arrival,prompt_tokens,output_tokens` or the Azure names
`arrived_at,num_prefill_tokens,num_decode_tokens` (arrivals in seconds, sorted), and options in a
URL-style query:

    azure_conv_2023.csv?scale=2&limit=100&max_prompt=2048

- `scale`: rate multiplier; arrival times are divided by it (scale=2 → twice the request rate).
- `limit`: keep the first N requests.  `max_prompt`, `max_output`: clip lengths from above.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq


class WorkloadError(ValueError):
    """A workload spec or trace file that cannot be turned into requests."""


@dataclass(frozen=True)
class Request:
    """One request of a workload: arrival is seconds from the run's start."""

    request_id: str
    arrival: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival, with the spec string that produced them."""

    spec: str
    requests: tuple[Request, ...]

    def __post_init__(self):
        if not self.requests:
            raise WorkloadError(f"workload {self.spec!r} has no requests")

    def __len__(self) -> int:
        return len(self.requests)

    def describe(self) -> str:
        """One line: count, span and rate, length medians and maxima."""
        n = len(self.requests)
        span = self.requests[-1].arrival - self.requests[0].arrival
        rate = f"{(n - 1) / span:.2f} req/s" if span > 0 else "all at once"
        prompts = [r.prompt_tokens for r in self.requests]
        outputs = [r.output_tokens for r in self.requests]
        return (
            f"{n} requests over {span:.1f} s ({rate}); "
            f"prompt median {np.median(prompts):.0f} max {max(prompts)}, "
            f"output median {np.median(outputs):.0f} max {max(outputs)} [{self.spec}]"
        )


# Azure LLM inference trace 2023 (conversation) medians: prompt 1,020, output 129 tokens.
DEFAULT_WORKLOAD = (
    "poisson:rate=2,n=100,prompt=lognormal(1020,0.6),output=lognormal(129,0.6),"
    "max_prompt=4096,max_output=512,seed=0"
)

_KINDS = {"poisson": {"rate", "n", "prompt", "output"}, "gamma": {"rate", "cv", "n", "prompt", "output"}}
_OPTIONAL = {"seed", "max_prompt", "max_output"}
_DISTRIBUTIONS = {"fixed": 1, "uniform": 2, "lognormal": 2}
_FILE_OPTIONS = {"scale", "limit", "max_prompt", "max_output"}
_COLUMNS = {
    "arrival": ("arrival", "arrived_at"),
    "prompt": ("prompt_tokens", "num_prefill_tokens"),
    "output": ("output_tokens", "num_decode_tokens"),
}


def parse_workload(spec_or_path: str | Path) -> Workload:
    """A workload from a spec ('poisson:rate=2,n=100,...') or a trace file ('trace.csv?scale=2&limit=100')."""
    text = str(spec_or_path).strip()
    return _generate(text) if _generated(text) else _replay(text)


def with_fields(spec: str, fields: dict[str, object]) -> str:
    """The spec with some fields set, the way a sweep varies a workload.

    with_fields('poisson:rate=2,n=9,prompt=fixed(8),output=fixed(4)', {'rate': 4}) → 'poisson:rate=4,n=9,...'
    with_fields('azure.csv?limit=50', {'scale': 2}) → 'azure.csv?limit=50&scale=2' (a trace file's options)
    """
    text = spec.strip()
    if _generated(text):
        kind, _, body = text.partition(":")
        items = _key_values(spec, body)
        allowed = _KINDS[kind.lower()] | _OPTIONAL
        joiner, prefix = ",", f"{kind}:"
    else:
        location, _, query = text.partition("?")
        items = dict(parse_qsl(query, keep_blank_values=True))
        allowed = _FILE_OPTIONS
        joiner, prefix = "&", f"{location}?"
    for key, value in fields.items():
        if key not in allowed:
            raise WorkloadError(
                f"workload {spec!r}: cannot set {key!r}; this workload takes {', '.join(sorted(allowed))}"
            )
        items[key] = str(value)
    return prefix + joiner.join(f"{k}={v}" for k, v in items.items())


def workload_identity(spec: str) -> str:
    """A spec with a replayed file named by its file name: `../w/azure.csv?limit=9` and
    `/home/me/w/azure.csv?limit=9` are one workload given from two directories. (Two different files of
    one name would pass as one: traces keep the spec, not the file's contents.)"""
    text = spec.strip()
    if _generated(text):
        return text
    location, _, query = text.partition("?")
    return Path(location).name + (f"?{query}" if query else "")


def _generated(text: str) -> bool:
    kind, sep, _ = text.partition(":")
    return bool(sep) and kind.lower() in _KINDS


# --- generated workloads ---------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses: 'a=1,b=f(1,2)' → ['a=1', 'b=f(1,2)']."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _number(spec: str, key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise WorkloadError(f"workload spec {spec!r}: {key}={value!r} is not a number") from None


def _key_values(spec: str, body: str) -> dict[str, str]:
    """'rate=2,prompt=fixed(8)' → {'rate': '2', 'prompt': 'fixed(8)'}, keys lower-cased, in order."""
    fields = {}
    for item in _split_top_level(body):
        key, eq, value = item.partition("=")
        if not eq:
            raise WorkloadError(f"workload spec {spec!r}: {item!r} is not key=value")
        fields[key.strip().lower()] = value.strip()
    return fields


def _parse_fields(spec: str) -> tuple[str, dict[str, str]]:
    kind, _, body = spec.partition(":")
    kind = kind.lower()
    fields = _key_values(spec, body)
    required, allowed = _KINDS[kind], _KINDS[kind] | _OPTIONAL
    unknown = sorted(fields.keys() - allowed)
    if unknown:
        raise WorkloadError(
            f"workload spec {spec!r}: unknown key {unknown[0]!r}; {kind} takes {', '.join(sorted(allowed))}"
        )
    missing = sorted(required - fields.keys())
    if missing:
        raise WorkloadError(
            f"workload spec {spec!r}: missing {', '.join(missing)}; "
            f"{kind} needs {', '.join(sorted(required))}"
        )
    return kind, fields


def _lengths(spec: str, key: str, text: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """Draw n token lengths from a distribution written as 'lognormal(1020,0.6)'."""
    match = re.fullmatch(r"(\w+)\((.*)\)", text)
    if not match or match[1].lower() not in _DISTRIBUTIONS:
        raise WorkloadError(
            f"workload spec {spec!r}: {key}={text!r} is not a known distribution; "
            "use fixed(n), uniform(lo,hi) or lognormal(median,sigma)"
        )
    name = match[1].lower()
    args = [_number(spec, key, a) for a in match[2].split(",") if a.strip()]
    if len(args) != _DISTRIBUTIONS[name]:
        raise WorkloadError(
            f"workload spec {spec!r}: {name} takes {_DISTRIBUTIONS[name]} argument(s), got {text!r}"
        )
    if name == "fixed":
        values = np.full(n, args[0])
    elif name == "uniform":
        if args[0] > args[1]:
            raise WorkloadError(f"workload spec {spec!r}: {key}={text!r} has lo > hi")
        values = rng.integers(int(args[0]), int(args[1]), endpoint=True, size=n)
    else:
        values = np.rint(rng.lognormal(math.log(args[0]), args[1], size=n))
    if values.min() < 1:
        raise WorkloadError(f"workload spec {spec!r}: {key}={text!r} gives lengths below 1 token")
    return values.astype(np.int64)


def _arrivals(kind: str, rate: float, cv: float, rng: np.random.Generator, n: int) -> np.ndarray:
    if math.isinf(rate):
        return np.zeros(n)
    if kind == "poisson":
        gaps = rng.exponential(1 / rate, size=n - 1)
    else:  # gamma with mean 1/rate and coefficient of variation cv: shape 1/cv², scale cv²/rate
        gaps = rng.gamma(1 / cv**2, cv**2 / rate, size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def _generate(spec: str) -> Workload:
    kind, fields = _parse_fields(spec)
    numbers = {k: _number(spec, k, v) for k, v in fields.items() if k not in ("prompt", "output")}
    n, rate, cv = int(numbers["n"]), numbers["rate"], numbers.get("cv", 1.0)
    caps = [numbers.get("max_prompt", 1), numbers.get("max_output", 1)]
    if n < 1 or rate <= 0 or cv <= 0 or min(caps) < 1:
        raise WorkloadError(
            f"workload spec {spec!r}: n, rate, cv, max_prompt and max_output must be positive"
        )
    rng = np.random.default_rng(int(numbers.get("seed", 0)))
    arrivals = _arrivals(kind, rate, cv, rng, n)
    prompts = _lengths(spec, "prompt", fields["prompt"], rng, n)
    outputs = _lengths(spec, "output", fields["output"], rng, n)
    prompts = np.minimum(prompts, int(numbers.get("max_prompt", prompts.max())))
    outputs = np.minimum(outputs, int(numbers.get("max_output", outputs.max())))
    return _workload(spec, arrivals, prompts, outputs)


def _workload(spec: str, arrivals, prompts, outputs, ids=None) -> Workload:
    ids = ids if ids is not None else [str(i) for i in range(len(arrivals))]
    requests = tuple(
        Request(rid, float(a), int(p), int(o))
        for rid, a, p, o in zip(ids, arrivals, prompts, outputs, strict=True)
    )
    return Workload(spec, requests)


# --- replayed traces -------------------------------------------------------------------------------


def _read_trace_file(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    readers = {
        ".csv": pa_csv.read_csv,
        ".parquet": pq.read_table,
        ".jsonl": pa_json.read_json,
        ".ndjson": pa_json.read_json,
    }
    if suffix not in readers:
        raise WorkloadError(f"{path}: unknown trace format {suffix!r}; use .csv, .parquet or .jsonl")
    if not path.is_file():
        raise WorkloadError(f"{path}: no such workload file (and not a spec: kinds are {', '.join(_KINDS)})")
    try:
        return readers[suffix](path)
    except (pa.ArrowInvalid, OSError) as e:
        raise WorkloadError(f"{path}: cannot read it as {suffix[1:]} ({e})") from e


def _column(path: Path, table: pa.Table, role: str) -> tuple[str, np.ndarray]:
    """Find the column for a role under its plain or Azure name, as a numpy array without nulls."""
    names = [name for name in _COLUMNS[role] if name in table.column_names]
    if not names:
        raise WorkloadError(
            f"{path}: no {role} column; expected one of {', '.join(_COLUMNS[role])} "
            f"(columns found: {', '.join(table.column_names)})"
        )
    column = table.column(names[0])
    if column.null_count:
        row = pc.index(pc.is_null(column), True).as_py() + 1
        raise WorkloadError(f"{path}, row {row}, column {names[0]!r}: value missing")
    try:
        return names[0], column.to_numpy().astype(np.float64)
    except (TypeError, ValueError, pa.ArrowInvalid) as e:
        raise WorkloadError(f"{path}, column {names[0]!r}: not numeric ({column.type})") from e


def _check_lengths(path: Path, name: str, values: np.ndarray) -> None:
    bad = np.flatnonzero((values < 1) | (values != np.rint(values)))
    if bad.size:
        row = int(bad[0])
        raise WorkloadError(
            f"{path}, row {row + 1}, column {name!r}: {values[row]:g} tokens; "
            "lengths must be whole numbers ≥ 1"
        )


def _check_arrivals(path: Path, name: str, arrivals: np.ndarray) -> None:
    if arrivals[0] < 0:
        raise WorkloadError(f"{path}, row 1, column {name!r}: negative arrival {arrivals[0]:g}")
    earlier = np.flatnonzero(np.diff(arrivals) < 0)
    if earlier.size:
        row = int(earlier[0]) + 1
        raise WorkloadError(
            f"{path}, row {row + 1}, column {name!r}: arrival {arrivals[row]:g} is earlier than the previous "
            f"row's {arrivals[row - 1]:g}; sort the file by arrival"
        )


def _options(spec: str, query: str) -> dict[str, float]:
    options = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _FILE_OPTIONS:
            raise WorkloadError(
                f"workload {spec!r}: unknown option {key!r}; options are {', '.join(sorted(_FILE_OPTIONS))}"
            )
        options[key] = _number(spec, key, value)
    if options.get("scale", 1) <= 0 or options.get("limit", 1) < 1:
        raise WorkloadError(f"workload {spec!r}: scale must be positive and limit at least 1")
    return options


def _replay(spec: str) -> Workload:
    location, _, query = spec.partition("?")
    path = Path(location)
    options = _options(spec, query)
    table = _read_trace_file(path)
    if "limit" in options:
        table = table.slice(0, int(options["limit"]))
    if table.num_rows == 0:
        raise WorkloadError(f"{path}: no requests in the file (or in the rows kept by limit)")
    arrival_name, arrivals = _column(path, table, "arrival")
    prompt_name, prompts = _column(path, table, "prompt")
    output_name, outputs = _column(path, table, "output")
    _check_arrivals(path, arrival_name, arrivals)
    _check_lengths(path, prompt_name, prompts)
    _check_lengths(path, output_name, outputs)
    ids = (
        [str(v) for v in table.column("request_id").to_pylist()]
        if "request_id" in table.column_names
        else None
    )
    return _workload(
        spec,
        arrivals / options.get("scale", 1.0),
        np.minimum(prompts, options.get("max_prompt", np.inf)),
        np.minimum(outputs, options.get("max_output", np.inf)),
        ids,
    )
