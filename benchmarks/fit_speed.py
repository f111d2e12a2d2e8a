"""How long `revati fit` takes on a million op rows (target: under 10 s on the 2-core CI machine).

The shipped CPU traces (small-llama, hf-cb and hf-generate: 506 k op rows, 20 k distinct shapes) are
copied under new run ids until the rows pass one million, then fitted once, held-out check included.
Prints rows, shapes, wall seconds and rows per second, all taken in this one run.

    python benchmarks/fit_speed.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from revati.fit import fit
from revati.schema import read_table

REPO = Path(__file__).resolve().parent.parent
SOURCES = [REPO / "traces" / "cpu" / "small-hf-cb", REPO / "traces" / "cpu" / "small-hf-generate"]


def _copy(source: Path, out: Path, run_id: str) -> int:
    """The trace at `source` written again under `out` with every row's run_id set to `run_id`."""
    rows = 0
    for table in ("run", "ops", "iterations", "requests"):
        data = read_table(source, table)
        data = data.set_column(
            data.schema.get_field_index("run_id"), "run_id", pa.array([run_id] * len(data))
        )
        (out / table).mkdir(parents=True)
        pq.write_table(data, out / table / "part-00000.parquet")
        rows += len(data) if table == "ops" else 0
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="op rows to fit at least")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        traces, rows = [], 0
        while rows < args.rows:
            source = SOURCES[len(traces) % len(SOURCES)]
            out = Path(tmp) / f"copy-{len(traces)}"
            rows += _copy(source, out, f"{source.name}-copy-{len(traces)}")
            traces.append(out)
        started = time.perf_counter()
        result = fit(traces, holdout=0.2)
        seconds = time.perf_counter() - started
    print(
        f"fit: {result.rows:,} op rows ({len(traces)} runs), {result.signatures:,} shapes, "
        f"{seconds:.1f} s wall ({result.rows / seconds:,.0f} rows/s); held-out step error "
        f"{result.device_error:.1%} device, {result.host_error:.1%} host; target < 10 s: "
        f"{'met' if seconds < 10 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
