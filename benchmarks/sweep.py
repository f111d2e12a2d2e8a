"""Sweep throughput: configurations per minute on the local process pool and on a local Ray instance,
taken in one run (this machine is noisy), and the wall time of a 48-point sweep over Llama-3.1-8B on H100.

- tiny: benchmarks/sweeps/tiny-12.toml (12 points, tiny-llama) run locally, then on Ray, with the same
  number of workers; each backend's time counts from the sweep's start, its start-up (the fork server's
  imports, Ray's processes) included. Their result tables must be identical (deterministic host time).
- 8b: benchmarks/sweeps/llama-8b-h100-48.toml on the local backend (about 10-15 min on 2 cores);
  skip it with --tiny-only.

    python benchmarks/sweep.py [--workers 2] [--tiny-only] [--out runs/bench-sweep]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from revati.sweep import RUN_COLUMNS, best, load_spec, run_sweep

SPECS = Path(__file__).parent / "sweeps"


def _timed(spec, out: Path, backend: str, workers: int):
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    run = run_sweep(spec, out, backend=backend, workers=workers)
    return run, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tiny-only", action="store_true", help="skip the 48-point Llama-3.1-8B sweep")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-sweep"))
    args = parser.parse_args()
    console = Console()

    tiny = load_spec(SPECS / "tiny-12.toml")
    table = Table(title=f"sweep throughput · {tiny.path.name} · {args.workers} workers", title_justify="left")
    for name in ("backend", "points", "wall s", "configs / min", "median point s"):
        table.add_column(name, justify="right" if name != "backend" else "left")
    runs = {}
    for backend in ("local", "ray"):
        run, wall = _timed(tiny, args.out / f"tiny-{backend}", backend, args.workers)
        runs[backend] = (run, wall)
        per_point = statistics.median(r["wall_seconds"] for r in run.rows())
        table.add_row(backend, str(run.ran), f"{wall:.1f}", f"{run.ran / wall * 60:.1f}", f"{per_point:.2f}")
    console.print(table)
    (local, local_wall), (ray, ray_wall) = runs["local"], runs["ray"]
    same = local.results.drop(list(RUN_COLUMNS)).equals(ray.results.drop(list(RUN_COLUMNS)))
    console.print(
        f"Ray / local configurations per minute: {local_wall / ray_wall:.2f}× · "
        f"result tables identical: {same}"
    )

    if args.tiny_only:
        return
    big = load_spec(SPECS / "llama-8b-h100-48.toml")
    console.print(f"[dim]{big.path.name}: {big.size} points, local backend, {args.workers} workers ...[/]")
    run, wall = _timed(big, args.out / "llama-8b-h100", "local", args.workers)
    rows = run.rows()
    statuses = {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}}
    point_walls = [r["wall_seconds"] for r in rows]
    console.print(
        f"48-point Llama-3.1-8B sweep on H100: {wall / 60:.1f} min wall "
        f"({run.ran / wall * 60:.1f} configs / min), "
        f"{statuses}; a point takes {min(point_walls):.0f}-{max(point_walls):.0f} s "
        f"(median {statistics.median(point_walls):.0f} s); emulated serving time "
        f"{sum(r['virtual_seconds'] or 0 for r in rows):.0f} s in all"
    )
    top = best(rows)
    if top is not None:
        console.print(
            f"best under the SLOs: #{top['index']} {top['params']} · {top['throughput_tok_s']:.0f} tok/s · "
            f"TTFT p99 {top['ttft_p99_ms']:.0f} ms · TPOT p50 {top['tpot_p50_ms']:.1f} ms"
        )


if __name__ == "__main__":
    main()
