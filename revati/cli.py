"""The `revati` command.

revati emulate                                   # the embedded default: hf-cb, Llama-3.1-8B, virtual H100
    revati emulate --model llama-3.1-70b --workload "poisson:rate=1,n=20,prompt=fixed(512),output=fixed(8)"
revati emulate -- python bench.py --batch 8      # any script, with CUDA virtualized
revati record --device cuda --runs 3             # the same serving, recorded on a real GPU (or CPU)
revati sweep sweep.toml --backend ray            # many emulations over a grid, on a Ray cluster
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from revati.workloads import DEFAULT_WORKLOAD

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Revati: how fast would this LLM serving code run on a GPU you do not have?",
    rich_markup_mode="rich",
)
out_console = Console()
err_console = Console(stderr=True)

# Options `emulate` and `record` share: the same serving run, virtual or real.
ENGINE_OPTION = typer.Option("hf-cb", help="Serving engine: hf-generate, hf-cb or hf-serve.")
MODEL_OPTION = typer.Option("llama-3.1-8b", help="A shipped model name or the path of an HF config.json.")
WORKLOAD_OPTION = typer.Option(DEFAULT_WORKLOAD, help="Workload spec or trace file (CSV / Parquet / JSONL).")

_BAD_INPUT = 2
_RUN_FAILED = 1


class BadInput(Exception):
    """A one-line problem with what the user asked for (exit code 2)."""


def main() -> None:
    app()


@app.callback()
def _root() -> None:
    """Record, fit, emulate and compare LLM serving runs."""


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog=(
        "Examples:\n\n"
        "  revati emulate\n\n"
        "  revati emulate --engine hf-generate --model tiny-llama --workload 'poisson:rate=4,n=20,"
        "prompt=fixed(64),output=fixed(16)' --json\n\n"
        "  revati emulate --model llama-3.1-70b --gpu b200\n\n"
        "  revati emulate --workload ../shared/workloads/azure_conv_2023.csv?limit=50\n\n"
        "  revati emulate -- python bench.py --batch 8\n\n"
        "  revati emulate --model llama-3.1-70b --gpu h100 --tp 8      # one process stands for 8 ranks\n\n"
        "  revati emulate --tp 2 --pp 2 -- python train_step.py        # 4 processes, one per rank\n\n"
        "  revati emulate -- torchrun --nproc-per-node 4 serve.py"
    ),
)
def emulate(
    ctx: typer.Context,
    engine: str = ENGINE_OPTION,
    model: str = MODEL_OPTION,
    gpu: str | None = typer.Option(
        None,
        help="Virtual GPU kind (h100, h200, a100, l40s, ...); default: the profile's device, else h100.",
    ),
    workload: str = WORKLOAD_OPTION,
    profile: str | None = typer.Option(
        None,
        help="A profile fitted by `revati fit`, or 'roofline' (default: the profile shipped for the GPU, "
        "else the roofline).",
    ),
    host_time: str = typer.Option("deterministic", help="Host time: 'deterministic' (modeled) or 'wall'."),
    out: Path | None = typer.Option(None, help="Trace directory to write (default: runs/emu-<time>)."),
    ops: str = typer.Option("sample", help="Op rows the trace keeps: all, sample (1 step in 20) or none."),
    dtype: str = typer.Option("bfloat16", help="Weights and activations dtype."),
    option: list[str] = typer.Option(
        [], "--option", "-o", help="An engine option KEY=VALUE, repeatable (e.g. -o batch_size=16)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
    tp: int = typer.Option(
        1, min=1, help="Tensor-parallel ranks. Symmetric: one process emulates one rank and stands for all."
    ),
    pp: int = typer.Option(
        1,
        min=1,
        help="Pipeline stages (script runs): tp x pp processes, one per rank, with coordinated clocks.",
    ),
) -> None:
    """Run real serving code on a virtual GPU and report how fast it would serve."""
    try:
        if ctx.args:
            serving = ("engine", "model", "workload", "profile", "out", "ops", "dtype", "option", "as_json")
            unused = [_flag(ctx, name) for name in serving if _given(ctx, name)]
            if unused:
                verb = "does" if len(unused) == 1 else "do"
                raise BadInput(
                    f"{', '.join(unused)} {verb} not apply to a script run (`revati emulate -- python ...`): "
                    "the script builds its own model and workload; only --gpu, --host-time, --tp and --pp do"
                )
            _emulate_script(ctx.args, gpu or "h100", host_time, tp, pp)
            return
        if pp > 1:
            raise BadInput(
                f"--pp {pp}: the {engine} engine has no pipeline parallelism; --pp applies to script runs "
                "(`revati emulate --pp 2 -- python ...`)"
            )
        if ops not in ("all", "sample", "none"):
            raise BadInput(f"--ops must be all, sample or none, not {ops!r}")
        plan = _plan(engine, model, gpu, workload, profile, host_time, out, dtype)
        plan["options"] = _engine_options(engine, option)
        plan["tp"] = tp
        _check_tp(plan["model_config"], tp)
        from revati.engines import OWN_MODEL

        if tp > 1 and engine in OWN_MODEL:
            raise BadInput(f"--tp {tp}: the {engine} engine is emulated at tensor parallelism 1 for now")
    except BadInput as e:
        _fail(str(e), _BAD_INPUT)
    _run_emulation(plan, ops, as_json)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog=(
        "Examples:\n\n"
        "  revati record --device cpu --model tiny-llama --engine hf-cb "
        "--workload 'poisson:rate=8,n=30,prompt=lognormal(64,0.5),output=fixed(16)' --out runs/cpu-a\n\n"
        "  revati record --device cuda --model llama-3.1-8b --runs 3 --out runs/h100-cb\n\n"
        "  revati record --device cuda -o use_cuda_graph=True --out runs/h100-graphs\n\n"
        "  revati record --device cuda -- python bench.py --batch 8"
    ),
)
def record(
    ctx: typer.Context,
    engine: str = ENGINE_OPTION,
    model: str = MODEL_OPTION,
    device: str = typer.Option("auto", help="Device to record on: cuda, cpu, or auto (cuda when present)."),
    workload: str = WORKLOAD_OPTION,
    out: Path | None = typer.Option(None, help="Trace directory to write (default: runs/rec-<time>)."),
    runs: int = typer.Option(1, min=1, help="Record the workload this many times, as separate run ids."),
    warmup: int = typer.Option(2, min=0, help="Requests served unrecorded before recording starts."),
    dtype: str | None = typer.Option(None, help="Weights dtype (default: bfloat16 on CUDA, float32 on CPU)."),
    option: list[str] = typer.Option(
        [], "--option", "-o", help="An engine option KEY=VALUE, repeatable (e.g. -o use_cuda_graph=True)."
    ),
    keep_profile: bool = typer.Option(
        False, help="Also keep the raw profile as TRACE/profile.json.gz (open it in Perfetto)."
    ),
    capture: str = typer.Option(
        "full",
        help="full: every op and kernel through torch.profiler; timeline: request and step times only, "
        "without the profiler's cost (ground truth for latencies).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
) -> None:
    """Serve a workload on the real device (CUDA or CPU); trace every op, kernel, step and request."""
    try:
        device = _device(device)
        if ctx.args:
            serving = (
                "engine",
                "model",
                "workload",
                "runs",
                "warmup",
                "dtype",
                "option",
                "keep_profile",
                "capture",
                "as_json",
            )
            unused = [_flag(ctx, name) for name in serving if _given(ctx, name)]
            if unused:
                raise BadInput(
                    f"{', '.join(unused)}: not for a script run (`revati record -- python ...`); "
                    "only --device and --out apply"
                )
            _record_script(ctx.args, device, out)
            return
        plan = _record_plan(engine, model, device, workload, out, runs, warmup, dtype)
        plan["options"] = _engine_options(engine, option)
        plan["keep_profile"] = keep_profile
        if capture not in ("full", "timeline"):
            raise BadInput(f"--capture must be 'full' or 'timeline', not {capture!r}")
        plan["capture"] = capture
    except BadInput as e:
        _fail(str(e), _BAD_INPUT)
    _run_recording(plan, as_json)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  revati fit traces/cpu/small-hf-cb -o cpu.parquet\n\n"
        "  revati fit traces/h100/*/ -o h100.parquet      # full runs plus their --capture timeline twins\n\n"
        "  revati fit runs/h100-* -o h100.parquet --holdout 0.2 --json\n\n"
        "  revati emulate --profile h100.parquet --gpu h200     # scaled by the hardware table"
    ),
)
def fit(
    traces: list[Path] = typer.Argument(
        ..., help="Trace directories written by `revati record` (one device)."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Profile file to write (Parquet)."),
    holdout: float = typer.Option(0.2, help="Fraction of engine steps held out to measure the error."),
    seed: int = typer.Option(0, help="Seed of the held-out split."),
    rows: int = typer.Option(25, help="Op keys shown in the table (largest share of device time first)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Fit per-op duration models on recorded traces; report held-out error; write a profile."""
    from revati.fit import FitError
    from revati.fit import fit as fit_traces
    from revati.schema import TraceError

    if output.exists() and output.is_dir():
        _fail(
            f"-o {output} is a directory; give the profile's file name (e.g. {output}/profile.parquet)",
            _BAD_INPUT,
        )
    if output.is_file():
        from revati.profile import Profile, ProfileError

        try:
            Profile.read(output)  # refitting over an older profile is fine; over anything else it is not
        except ProfileError:
            _fail(f"-o {output} exists and is not a Revati profile; it is left as it is", _BAD_INPUT)
    progress = Progress(
        TextColumn("[bold]fitting[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
        console=err_console, transient=True,
    )  # fmt: skip
    tasks: dict[str, int] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done, total=total)

    try:
        with progress:
            result = fit_traces(traces, holdout=holdout, seed=seed, progress=on_progress)
    except (FitError, TraceError) as e:
        _fail(str(e), _BAD_INPUT)
    try:
        result.profile.path = str(result.profile.write(output))
    except OSError as e:
        _fail(f"-o {output}: cannot write the profile ({e.strerror or e})", _BAD_INPUT)
    if as_json:
        out_console.print_json(json.dumps(result.summary()))
        return
    _print_fit(result, rows)


def _print_fit(result, rows: int) -> None:
    table = Table(
        title=f"revati fit · {result.profile.device.get('name')} · held-out error per op row",
        title_justify="left",
        box=None,
    )
    table.add_column("op key", no_wrap=True)
    table.add_column("dtype", no_wrap=True)
    table.add_column("model", no_wrap=True)
    for name in ("rows", "shapes", "median", "p90", "share"):
        table.add_column(name, justify="right", no_wrap=True)
    for k in result.keys[:rows]:
        features = ",".join(f for f in k.features if f != "1")
        table.add_row(
            k.key.removeprefix("aten::").removeprefix("revati::"),
            k.dtype.replace("bfloat16", "bf16").replace("float", "fp") or "-",
            f"{k.form}({features})" if features else k.form, _count(k.samples), _count(k.signatures),
            _pct(k.holdout_median), _pct(k.holdout_p90), f"{k.time_share:.1%}",
        )  # fmt: skip
    if len(result.keys) > rows:
        rest = sum(k.time_share for k in result.keys[rows:])
        table.add_row(f"… {len(result.keys) - rows} more", *[""] * 6, f"{rest:.1%}", style="dim")
    out_console.print(table)
    for note in result.notes:
        err_console.print(f"[dim]note: {escape(note)}[/]", highlight=False)
    out_console.print(
        f"[bold]held-out error per engine step[/] (time-weighted, {result.holdout_iterations} steps): "
        f"device time [bold]{_pct(result.device_error)}[/], host time {_pct(result.host_error)}",
        highlight=False,
    )
    out_console.print(
        f"{result.rows:,} op rows, {result.signatures:,} shapes, {result.seconds:.1f} s · "
        f"wrote {escape(str(result.profile.path))}",
        highlight=False,
        soft_wrap=True,
    )


def _count(n: int) -> str:
    return f"{n / 1000:.1f}k" if n >= 10_000 else str(n)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


@app.command(
    epilog=(
        "Examples:\n\n"
        "  revati compare traces/h100/cb-eager-timeline runs/emu-cb\n\n"
        "  revati compare runs/rec-b runs/emu-b --json\n\n"
        "  revati compare runs/rec-b runs/emu-b --plots plots/"
    ),
)
def compare(
    recorded: Path = typer.Argument(..., help="Trace directory (or directory of runs) taken as the truth."),
    emulated: Path = typer.Argument(..., help="Trace directory compared with it (usually emulated)."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as one JSON object."),
    plots: Path | None = typer.Option(
        None, help="Write PNG plots (latency CDFs, step times, per-op error) here."
    ),
    rows: int = typer.Option(8, help="Op keys shown, largest time-weighted error first."),
) -> None:
    """Compare an emulated run with a recorded one: latency percentiles, throughput, per-request and
    per-op error."""
    from revati.analysis import compare as compare_traces
    from revati.schema import TraceError

    if plots is not None and plots.exists() and not plots.is_dir():
        _fail(f"--plots {plots} is a file; give a directory for the PNGs", _BAD_INPUT)
    try:
        result = compare_traces([recorded], [emulated])
    except TraceError as e:
        _fail(str(e), _BAD_INPUT)
    written = _plot_comparison([recorded], [emulated], plots) if plots is not None else []
    if as_json:
        out_console.print_json(json.dumps(result.summary() | {"plots": [str(p) for p in written]}))
        return
    for warning in result.warnings:
        err_console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False)
    _print_comparison(result, rows, written)


def _print_comparison(result, rows: int, written: list) -> None:
    table = Table(title="revati compare · recorded vs emulated", title_justify="left", box=None)
    for name in ("metric", "recorded", "emulated", "error"):
        table.add_column(name, justify="left" if name == "metric" else "right", no_wrap=True)
    for name, (r, e, err) in result.figures.items():
        if name.startswith("throughput"):
            label, scale = f"throughput ({'tok/s' if 'tok' in name else 'req/s'})", 1.0
        else:
            label, scale = name.replace("_", " ") + " (ms)", 1e3
        recorded, emulated = (None if x is None else x * scale for x in (r, e))
        bold = "bold" if name.endswith(("p50", "tok_s")) else None
        table.add_row(label, _fmt(recorded), _fmt(emulated), _pct(err), style=bold)
    out_console.print(table)
    if result.matched_requests:
        per = ", ".join(f"{k.upper()} {_pct(v)}" for k, v in result.per_request.items())
        out_console.print(
            f"per request ({result.matched_requests} matched by id), mean relative error: {per}"
        )
    if result.op_keys:
        ops = Table(
            title="op keys by time-weighted error (shapes both sides ran)", title_justify="left", box=None
        )
        for name in ("op key", "measured s", "predicted s", "error"):
            ops.add_column(name, justify="left" if name == "op key" else "right", no_wrap=True)
        for k in result.op_keys[:rows]:
            ops.add_row(k["key"], f"{k['measured']:.4f}", f"{k['predicted']:.4f}", _pct(k["error_share"]))
        out_console.print(ops)
        out_console.print(
            f"shapes both sides ran hold {_pct(result.op_coverage)} of the recorded device time"
        )
    for path in written:
        out_console.print(f"wrote {escape(str(path))}", highlight=False)


def _plot_comparison(recorded, emulated, out: Path) -> list[Path]:
    from revati.plots import comparison_plots

    return comparison_plots(recorded, emulated, out)


_SPEC_EXAMPLE = """
  # sweep.toml: 12 points, tiny model, two GPUs
  engine = "hf-cb"
  model = "tiny-llama"
  workload = "poisson:rate=4,n=16,prompt=fixed(64),output=fixed(8)"

  [grid]
  gpu = ["h100", "h200"]
  [grid.options]
  max_batch_tokens = [64, 128, 256]
  [grid.workload]
  rate = [4, 16]

  [slo]              # upper bounds, ms
  ttft_p99_ms = 2000
  tpot_p50_ms = 50

  [prices]           # USD per GPU-hour: adds cost per token
  h100 = 2.5
  h200 = 3.5
"""


@app.command(
    epilog=(
        "Examples:\n\n"
        "  revati sweep sweep.toml\n\n"
        "  revati sweep sweep.toml --workers 4 --out runs/sweep-a     # rerun: only the points not done\n\n"
        "  revati sweep sweep.toml --backend ray                        # a local Ray instance\n\n"
        "  revati sweep sweep.toml --backend ray --ray-address head:6379\n\n"
        "A spec (TOML):\n\n"
        + "\n\n".join(escape(line) for line in _SPEC_EXAMPLE.strip("\n").splitlines() if line)
    ),
)
def sweep(
    spec: Path = typer.Argument(
        ..., help="The sweep spec (TOML): configuration, \\[grid], \\[slo], \\[prices] (example below)."
    ),
    backend: str = typer.Option("local", help="Where points run: local (a process pool) or ray."),
    ray_address: str | None = typer.Option(
        None, help="A Ray cluster: HOST:PORT, ray://HOST:PORT or auto (default: a local Ray started for it)."
    ),
    workers: int | None = typer.Option(
        None, min=1, help="Points run at once (default: this machine's cores; on Ray, the cluster's CPUs)."
    ),
    out: Path | None = typer.Option(
        None, help="Sweep directory (default: runs/sweep-<spec name>); run again, it skips the points done."
    ),
    retry_failed: bool = typer.Option(False, help="Run points that failed in an earlier run again."),
    rows: int = typer.Option(12, help="Frontier points shown."),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as one JSON object."),
) -> None:
    """Emulate every configuration of a grid, each in its own process, and find the best under the SLOs."""
    from revati.sweep import Interrupted, SpecError, SweepError, connect_ray, load_spec, points, run_sweep

    try:
        if backend not in ("local", "ray"):
            raise BadInput(f"--backend must be local or ray, not {backend!r}")
        if ray_address is not None and backend != "ray":
            raise BadInput("--ray-address applies to --backend ray")
        if backend == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                raise BadInput("--backend ray needs Ray: pip install 'revati[ray]'") from None
        plan = load_spec(spec)
        out = out or Path("runs") / f"sweep-{spec.stem}"
        if out.exists() and not out.is_dir():
            raise BadInput(f"--out {out} is a file; give a directory for the sweep")
        if out.is_dir() and any(out.iterdir()) and not (out / "points").is_dir():
            raise BadInput(f"--out {out} holds files that are not a sweep's; choose a new directory")
        total = len(points(plan))
        if backend == "ray":
            connect_ray(ray_address, workers)  # before anything runs: an unreachable cluster is bad input
    except (SpecError, ConnectionError, BadInput) as e:
        _fail(str(e), _BAD_INPUT)
    progress = Progress(
        TextColumn("[bold]sweep[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("points · {task.fields[failed]} failed"),
        TimeElapsedColumn(),
        TextColumn("· eta"),
        TimeRemainingColumn(),
        console=err_console,
        transient=as_json,
    )
    task = progress.add_task(f"{spec.name} · {backend}", total=total, failed=0)

    def on_start(done: int, todo: int) -> None:
        progress.update(task, completed=done)
        if not as_json:
            size = f" (a sample of {plan.size})" if total < plan.size else ""
            progress.console.print(
                f"[dim]{total} points{size}: {done} done before, {todo} to run · {escape(str(out))}[/]",
                highlight=False,
            )

    def on_point(row: dict) -> None:
        failed = progress.tasks[0].fields["failed"] + (row["status"] != "ok")
        progress.update(task, advance=1, failed=failed)

    try:
        with progress:
            result = run_sweep(
                plan, out, backend=backend, workers=workers, ray_address=ray_address,
                retry_failed=retry_failed, on_point=on_point, on_start=on_start,
            )  # fmt: skip
    except Interrupted as e:
        _fail(f"{e}; the finished ones are kept in {out}: run the same command again for the rest", 130)
    except SweepError as e:
        _fail(
            f"{e}; the finished points are kept in {out}: run the same command again for the rest",
            _RUN_FAILED,
        )
    plot = result.out / "frontier.png"
    if as_json:
        out_console.print_json(json.dumps(_sweep_summary(result, plot), default=str))
    else:
        _print_sweep(result, rows, plot)


def _sweep_summary(result, plot: Path) -> dict:
    from revati.sweep import axes_label, best, pareto

    rows = result.rows()
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1

    def pick(r: dict | None) -> dict | None:
        return None if r is None else {"point": axes_label(r), **r}

    return {
        "points": len(rows),
        "ran": result.ran,
        "skipped": result.skipped,
        "statuses": statuses,
        "slo_met": sum(bool(r["slo_met"]) for r in rows),
        "best": pick(best(rows)),
        "best_cost": pick(best(rows, by="cost")),
        "frontier": [pick(r) for r in pareto(rows, result.spec.frontier)],
        "results": str(result.out / "results.parquet"),
        "plot": str(plot),
        "wall_seconds": result.wall_seconds,
    }


def _print_sweep(result, rows: int, plot: Path) -> None:
    from revati.sweep import axes_label

    spec, all_rows = result.spec, result.rows()
    summary = _sweep_summary(result, plot)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(summary["statuses"].items()))
    out_console.print(
        f"[bold]{len(all_rows)} points[/]: {counts} · {summary['slo_met']} meet the SLOs · "
        f"ran {result.ran} in {result.wall_seconds:.0f} s, {result.skipped} done before",
        highlight=False,
    )
    axes = list(spec.grid)
    latency = spec.frontier
    priced = any(r["usd_per_mtok"] is not None for r in all_rows)
    table = Table(title=f"frontier: throughput vs {latency}", title_justify="left", box=None)
    table.add_column("#", justify="right")
    for axis in axes:
        table.add_column(axis.split(".")[-1])
    for name in ("tok/s", latency.removesuffix("_ms") + " ms", "tpot_p50 ms", "SLOs"):
        table.add_column(name, justify="right")
    if priced:
        table.add_column("$/Mtok", justify="right")
    for r in summary["frontier"][:rows]:
        params = json.loads(r["params"])
        cells = [str(r["index"]), *(str(params[a]) for a in axes)]
        cells += [_fmt(r["throughput_tok_s"]), _fmt(r[latency]), _fmt(r["tpot_p50_ms"], 2)]
        cells.append("met" if r["slo_met"] else f"[yellow]{escape(r['slo_missed'] or '')}[/]")
        if priced:
            cells.append(_fmt(r["usd_per_mtok"], 3))
        table.add_row(*cells)
    out_console.print(table)
    slos = ", ".join(f"{k} ≤ {v:g}" for k, v in spec.slo.items()) or "none given"
    for label, key in (("best by throughput", "best"), ("best by cost", "best_cost")):
        top = summary[key]
        if key == "best_cost" and not priced:
            continue
        if top is None:
            out_console.print(f"[bold]{label}[/]: no point meets the SLOs ({escape(slos)})", highlight=False)
            continue
        cost = f" · ${top['usd_per_mtok']:.3f} per M tokens" if top["usd_per_mtok"] is not None else ""
        out_console.print(
            f"[bold]{label}[/] under {escape(slos)}: #{top['index']} {escape(axes_label(top))} · "
            f"{_fmt(top['throughput_tok_s'])} tok/s · {latency} {_fmt(top[latency])} ms{cost}",
            highlight=False,
        )
    failed = [r for r in all_rows if r["status"] != "ok"]
    if failed:
        fails = Table(title="points that did not finish", title_justify="left", box=None)
        for name in ("#", "point", "status", "error"):
            fails.add_column(name, overflow="fold")
        for r in failed[:rows]:
            fails.add_row(str(r["index"]), axes_label(r), r["status"], escape(r["error"] or ""))
        out_console.print(fails)
        out_console.print(
            "[dim]points that did not finish are kept as they are; `--retry-failed` runs them again "
            "(raise the spec's timeout first for those that timed out)[/]"
        )
    out_console.print(f"wrote {escape(summary['results'])} and {escape(str(plot))}", highlight=False)


def _device(name: str) -> str:
    from recorder.device import DeviceError, check

    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check(name)
    except DeviceError as e:
        raise BadInput(str(e)) from None
    return name


def _record_plan(engine, model, device, workload_spec, out, runs, warmup, dtype) -> dict:
    """Validate every input of a recording before anything is built or written."""
    import torch

    from recorder.run import output_dirs
    from revati.engines import ENGINES, OWN_MODEL
    from revati.models import load_config, param_bytes
    from revati.schema import TraceError
    from revati.workloads import parse_workload

    if engine not in ENGINES:
        raise BadInput(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
    if engine in OWN_MODEL:
        raise BadInput(
            f"revati record --engine {engine} is not built yet: the recorder captures ops in its own "
            f"process, and {engine} computes in a scheduler process of its own"
        )
    if dtype is not None and dtype not in ("bfloat16", "float16", "float32"):
        raise BadInput(f"--dtype must be bfloat16, float16 or float32, not {dtype!r}")
    try:
        model_config = load_config(model)
        work = parse_workload(workload_spec)
    except (ValueError, OSError) as e:
        raise BadInput(str(e)) from None
    if out is None:
        out = Path("runs") / f"rec-{datetime.now():%Y%m%d-%H%M%S}"
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file; give a directory to write the trace to")
    try:
        output_dirs(out, runs)
    except TraceError as e:
        raise BadInput(str(e)) from None
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    weights = param_bytes(model_config, getattr(torch, dtype))
    if device == "cuda":
        memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        if weights > memory:
            raise BadInput(
                f"{model} needs {weights / 2**30:.1f} GiB of weights in {dtype}; this GPU has "
                f"{memory / 2**30:.1f} GiB: record a smaller model (tensor parallelism is not recorded yet)"
            )
    if device == "cpu":
        from recorder.device import facts

        memory = facts("cpu")["memory_bytes"]
        if memory and weights > memory / 2:
            raise BadInput(
                f"{model} needs {weights / 2**30:.1f} GiB of weights in {dtype}, more than half of this "
                f"machine's {memory / 2**30:.1f} GiB; record a smaller model on CPU (e.g. --model tiny-llama)"
            )
    return dict(
        engine=engine, model=model, device=device, model_config=model_config, workload=work, out=out,
        runs=runs, warmup=warmup, dtype=dtype,
    )  # fmt: skip


def _run_recording(plan: dict, as_json: bool) -> None:
    from recorder.run import RecordConfig
    from recorder.run import record as record_runs

    config = RecordConfig(
        engine=plan["engine"],
        model=plan["model"],
        device=plan["device"],
        dtype=plan["dtype"],
        runs=plan["runs"],
        warmup_requests=plan["warmup"],
        keep_profile=plan["keep_profile"],
        capture=plan["capture"],
        options=plan["options"],
    )
    work = plan["workload"]
    progress = Progress(
        TextColumn("[bold]recording[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("requests · {task.fields[stage]}"),
        console=err_console,
        transient=as_json,
    )
    task = progress.add_task(
        f"{plan['engine']} · {plan['model']} · {plan['device']}", total=len(work) * plan["runs"], stage=""
    )
    if not as_json:
        err_console.print(
            f"[dim]{escape(work.describe())} · {plan['runs']} run(s) → {escape(str(plan['out']))}[/]",
            highlight=False,
        )

    with progress, _out_of_memory_fails(plan):
        results = record_runs(
            config,
            work,
            plan["out"],
            plan["model_config"],
            on_result=lambda _r: progress.update(task, advance=1),
            on_stage=lambda s: progress.update(task, stage=s),
        )
    figures = [_record_figures(r) for r in results]
    if as_json:
        out_console.print_json(json.dumps(figures if len(figures) > 1 else figures[0]))
        return
    table = Table(
        title=f"{plan['engine']} · {plan['model']} recorded on {plan['device']}", title_justify="left"
    )
    for column in ("run", "TTFT p50 / p99 (ms)", "TPOT p50 (ms)", "E2E p50 (ms)", "tok/s", "ops", "kernels",
                   "steps", "wall (s)", "trace"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("run", "trace") else "right")
    for f in figures:
        table.add_row(
            f["run_id"],
            f"{_fmt(f['ttft_p50_ms'])} / {_fmt(f['ttft_p99_ms'])}",
            _fmt(f["tpot_p50_ms"], 2),
            _fmt(f["e2e_p50_ms"]),
            _fmt(f["throughput_tok_s"]),
            f"{f['ops']:,}",
            f"{f['kernels']:,}",
            f"{f['iterations']:,}",
            f"{f['wall_seconds']:.2f}",
            f["trace"],
        )
    out_console.print(table)
    if len(figures) > 1:
        spread = {
            key: _spread([f[key] for f in figures])
            for key in ("ttft_p50_ms", "tpot_p50_ms", "e2e_p50_ms", "throughput_tok_s")
        }
        text = " · ".join(f"{k.removesuffix('_ms')} {v:.1%}" for k, v in spread.items() if v is not None)
        out_console.print(f"run-to-run spread ((max − min) / mean): {text}", highlight=False)


@contextlib.contextmanager
def _out_of_memory_fails(plan: dict):
    """A real GPU that runs out of memory mid-recording: one line and exit code 1, not a traceback."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        _fail(
            f"out of memory on the GPU while recording {plan['model']}: {str(e).splitlines()[0]}", _RUN_FAILED
        )


def _spread(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    if len(values) < 2 or sum(values) == 0:
        return None
    return (max(values) - min(values)) / (sum(values) / len(values))


def _record_figures(r) -> dict:
    m = r.metrics
    figures = {"run_id": r.run_id, "trace": str(r.trace_dir), "requests": m.requests}
    for name in ("ttft", "tpot", "itl", "e2e"):
        for p in ("p50", "p90", "p99"):
            figures[f"{name}_{p}_ms"] = _finite(getattr(getattr(m, name), p) * 1000)
    figures.update(
        throughput_tok_s=_finite(m.throughput_tok_s),
        wall_seconds=r.wall_seconds,
        serving_seconds=r.serving_seconds,
        ops=r.ops,
        kernels=r.kernels,
        iterations=r.iterations,
        profiler_events=r.profiler_events,
        profiler_event_overhead_us=r.event_overhead_us,
        export_seconds=r.export_seconds,
    )
    return figures


def _record_script(argv: list[str], device: str, out: Path | None) -> None:
    from recorder.run import output_dirs, record_script
    from revati.schema import TraceError

    if argv and argv[0] == "--":
        argv = argv[1:]
    _check_script(argv, "record")
    out = out or Path("runs") / f"rec-{datetime.now():%Y%m%d-%H%M%S}"
    try:
        output_dirs(out, 1)
    except TraceError as e:
        raise BadInput(str(e)) from None
    code, trace = record_script(argv, device, out)
    err_console.print(
        f"[dim]revati: recorded {escape(' '.join(argv))} on {device} → {escape(str(trace))}[/]",
        highlight=False,
    )
    sys.exit(code)


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _flag(ctx: typer.Context, name: str) -> str:
    param = next(p for p in ctx.command.params if p.name == name)
    return max(param.opts, key=len)


def _engine_options(engine: str, pairs: list[str]) -> dict:
    """`-o key=value` pairs checked against the engine's own options; values parsed as Python literals."""
    import ast

    from revati.engines import engine_options

    known = engine_options(engine)
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in known:
            raise BadInput(
                f"--option {pair!r}: {engine} takes KEY=VALUE with KEY one of {', '.join(known) or '(none)'}"
            )
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text  # a bare word: a string option such as attn_implementation=eager
    return options


def _fail(message: str, code: int) -> None:
    # escape: paths and names may hold '[...]', which rich would otherwise read as markup and drop
    err_console.print(f"[bold red]revati:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _check_installed(engine: str) -> None:
    """Engines with requirements of their own (SGLang, vLLM) say how to get them."""
    import importlib.util

    for package, name, target, venv, how in (
        ("sglang", "SGLang", "sglang-venv", ".venv-sglang", "CPU torch, SGLang without its CUDA kernels"),
        (
            "vllm",
            "vLLM",
            "vllm-venv",
            ".venv-vllm",
            "CPU torch, vLLM's CUDA wheel without loading its kernels",
        ),
    ):
        if engine.startswith(package) and importlib.util.find_spec(package) is None:
            raise BadInput(
                f"the {engine} engine needs {name}, which this Python environment lacks: `make {target}` "
                f"builds {venv} with it ({how}); then run {venv}/bin/revati emulate --engine {engine} ..."
            )


def _plan(engine, model, gpu_name, workload_spec, profile, host_time, out, dtype) -> dict:
    """Validate every input before anything is built or written."""
    from revati.engines import ENGINES
    from revati.models import load_config
    from revati.workloads import parse_workload

    if engine not in ENGINES:
        raise BadInput(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
    _check_installed(engine)
    _check_host_time(host_time)
    if dtype not in ("bfloat16", "float16", "float32"):
        raise BadInput(f"--dtype must be bfloat16, float16 or float32, not {dtype!r}")
    spec, cost = _cost_model(profile, gpu_name)
    if hasattr(cost, "serving"):
        cost = cost.serving(engine)  # host costs as recorded with this engine, where it was
    try:
        model_config = load_config(model)
    except (ValueError, OSError) as e:
        raise BadInput(str(e)) from None
    try:
        work = parse_workload(workload_spec)
    except (ValueError, OSError) as e:
        raise BadInput(str(e)) from None
    if out is None:
        out = Path("runs") / f"emu-{datetime.now():%Y%m%d-%H%M%S}"
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file; give a directory to write the trace to")
    if out.exists() and any(out.iterdir()):
        raise BadInput(f"--out {out} already holds files; choose an empty or new directory")
    return dict(
        engine=engine, model=model, spec=spec, model_config=model_config, workload=work, cost=cost,
        host_time=host_time, out=out, dtype=dtype, profile=profile,
    )  # fmt: skip


def _check_host_time(host_time: str) -> None:
    if host_time not in ("wall", "deterministic"):
        raise BadInput(f"--host-time must be 'wall' or 'deterministic', not {host_time!r}")


def _cost_model(profile: str | None, gpu_name: str | None):
    """The virtual GPU and what prices its ops: a fitted profile (scaled to another GPU when asked), the
    profile shipped for the GPU, or the roofline."""
    from revati.cost import Roofline
    from revati.hardware import gpu as gpu_spec
    from revati.profile import Profile, ProfileError, shipped_profile

    spec = None
    if gpu_name is not None or profile in (None, "roofline"):
        try:
            spec = gpu_spec(gpu_name or "h100")
        except ValueError as e:
            raise BadInput(str(e)) from None
    if profile == "roofline":
        return spec, Roofline(spec)
    path = Path(profile) if profile is not None else shipped_profile(spec.key)
    if path is None:
        return spec, Roofline(spec)
    try:
        fitted = Profile.read(path)
        if spec is None:
            return fitted.device_spec(), fitted
        return spec, fitted.on(spec)
    except ProfileError as e:
        raise BadInput(f"--profile: {e}") from None


def _run_emulation(plan: dict, ops: str, as_json: bool) -> None:
    import torch

    from replayer.run import EmulationConfig, emulate

    config = EmulationConfig(
        engine=plan["engine"],
        model=plan["model"],
        gpu=plan["spec"].key,
        host_time=plan["host_time"],
        dtype=plan["dtype"],
        profile=getattr(plan["cost"], "path", None),
        ops=ops,
        tp=plan.get("tp", 1),
        options=plan["options"],
    )
    work = plan["workload"]
    progress = Progress(
        TextColumn("[bold]emulating[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("requests · virtual {task.fields[vt]:.1f} s"),
        console=err_console,
        auto_refresh=False,  # refreshed per finished request: no timer thread under the time warp
        transient=as_json,
    )
    task = progress.add_task(
        f"{plan['engine']} · {plan['model']} · {plan['spec'].key}{_tp_label(plan)}", total=len(work), vt=0.0
    )

    def on_result(r) -> None:
        progress.update(task, advance=1, vt=r.completion)
        progress.refresh()

    if not as_json:
        err_console.print(
            f"[dim]{escape(work.describe())} · cost: {escape(plan['cost'].describe())} · "
            f"host time: {plan['host_time']}[/]",
            highlight=False,
        )
    try:
        with progress:
            progress.refresh()
            result = emulate(
                config,
                work,
                plan["spec"],
                plan["cost"],
                plan["model_config"],
                out=plan["out"],
                on_result=on_result,
            )
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        # The engine may wrap the OutOfMemoryError it caught in its own error (hf-cb does).
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "CUDA out of memory" not in str(e):
            raise
        _fail(_oom_message(e, plan), _RUN_FAILED)
    figures = _figures(result, plan)
    if as_json:
        out_console.print_json(json.dumps(figures))
    else:
        _print_table(figures, plan)


def _oom_message(error: Exception, plan: dict) -> str:
    import torch

    from revati.engines import OWN_MODEL
    from revati.hardware import GPUS
    from revati.models import check_tp, param_bytes

    spec = plan["spec"]
    weights = param_bytes(plan["model_config"], getattr(torch, plan["dtype"]))
    detail = str(error).splitlines()[0]
    if weights > spec.memory_bytes:
        hints = []
        if plan["engine"] not in OWN_MODEL:  # the least tensor parallelism that leaves a quarter free
            for tp in (2, 4, 8, 16):
                try:
                    check_tp(plan["model_config"], tp)
                except ValueError:
                    continue
                if weights / tp <= 0.75 * spec.memory_bytes:
                    hints.append(f"--tp {tp} ({weights / tp / 2**30:.1f} GiB of weights per GPU)")
                    break
        roomy = [key for key, g in GPUS.items() if g.memory_bytes > 1.1 * weights]
        if roomy:
            hints.append(f"a GPU with more memory ({', '.join(roomy)})")
        hint = " or ".join(hints) or "a smaller model"
        return (
            f"out of memory on the virtual {spec.name}: {plan['model']} does not fit, its weights alone take "
            f"{weights / 2**30:.1f} GiB in {plan['dtype']} and the GPU has "
            f"{spec.memory_bytes / 2**30:.1f} GiB; try {hint}. {detail}"
        )
    return (
        f"out of memory on the virtual {spec.name} while serving {plan['model']} "
        f"(weights {weights / 2**30:.1f} GiB of {spec.memory_bytes / 2**30:.1f} GiB). {detail}"
    )


def _figures(result, plan) -> dict:
    m = result.metrics
    figures = {
        "engine": plan["engine"],
        "model": plan["model"],
        "gpu": plan["spec"].key,
        "tp": plan.get("tp", 1),
        "host_time": plan["host_time"],
        "cost_model": result.cost_model,
        "requests": m.requests,
    }
    for name in ("ttft", "tpot", "itl", "e2e"):
        stats = getattr(m, name)
        for p in ("p50", "p90", "p99"):
            figures[f"{name}_{p}_ms"] = _finite(getattr(stats, p) * 1000)
    figures.update(
        throughput_tok_s=_finite(m.throughput_tok_s),
        throughput_req_s=_finite(m.throughput_req_s),
        virtual_seconds=result.virtual_seconds,
        wall_seconds=result.wall_seconds,
        time_warp=result.warp,
        serving_virtual_seconds=result.serving_virtual_seconds,
        serving_wall_seconds=result.serving_wall_seconds,
        serving_time_warp=result.serving_warp,
        peak_memory_gib=result.peak_memory / 2**30,
        weights_memory_gib=result.weights_memory / 2**30,
        synthesized_values=sum(result.synthesized.values()),
        synthesized=result.synthesized,
        ops=result.ops,
        op_signatures=result.op_signatures,
        hot_path_ops=result.hot_path_ops,
        clock_stalls=result.clock_stalls,
        processes=result.processes,
        unfitted_ops=result.unfitted,
        graphs_captured=result.graphs_captured,
        graph_replays=result.graph_replays,
        trace=str(result.trace_dir) if result.trace_dir else None,
    )
    return figures


def _serving(f: dict) -> str:
    """Serving alone, where the run had set-up before its t0 worth telling apart (over 5 % of its wall)."""
    warp, wall = f.get("serving_time_warp"), f.get("serving_wall_seconds")
    if warp is None or wall is None or wall > 0.95 * f["wall_seconds"]:
        return ""
    return f"; serving alone {warp:.2f}× ({f['serving_virtual_seconds']:.2f} s in {wall:.2f} s)"


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) or math.isinf(x) else x


def _print_table(f: dict, plan) -> None:
    table = Table(
        title=f"{f['engine']} · {f['model']} on a virtual {plan['spec'].name}", title_justify="left"
    )
    table.add_column("metric")
    for p in ("p50", "p90", "p99"):
        table.add_column(p, justify="right")
    for name, label in (
        ("ttft", "TTFT (ms)"),
        ("tpot", "TPOT (ms)"),
        ("itl", "ITL (ms)"),
        ("e2e", "E2E (ms)"),
    ):
        table.add_row(label, *(_fmt(f[f"{name}_{p}_ms"]) for p in ("p50", "p90", "p99")))
    out_console.print(table)
    summary = Table(show_header=False, box=None, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column()
    rows = [
        ("requests", f"{f['requests']}"),
        ("throughput", f"{_fmt(f['throughput_tok_s'])} tok/s · {_fmt(f['throughput_req_s'], 2)} req/s"),
        ("virtual time", f"{f['virtual_seconds']:.2f} s"),
        ("wall time", f"{f['wall_seconds']:.2f} s"),
        ("time warp", f"{f['time_warp']:.2f}× (virtual s per wall s)" + _serving(f)),
        (
            "peak virtual memory",
            f"{f['peak_memory_gib']:.2f} GiB (weights {f['weights_memory_gib']:.2f} GiB)",
        ),
        ("synthesized values", f"{f['synthesized_values']} {_synth(f['synthesized'])}"),
        ("ops", f"{f['ops']:,} ({f['op_signatures']:,} distinct signatures{_hot(f)})" + _processes(f)),
        ("not fitted", _unfitted(f)),
        *([("CUDA graphs", _graphs(f))] if f.get("graphs_captured") else []),
        ("clock stalls", f"{f['clock_stalls']} (virtual time moved on a real-time guess; 0 is exact)"),
        ("cost model", f["cost_model"]),
        ("trace", f["trace"] or "-"),
    ]
    for k, v in rows:
        summary.add_row(k, v)
    out_console.print(summary)


def _graphs(f: dict) -> str:
    return (
        f"{f['graphs_captured']} captured, {f['graph_replays']:,} replays (each an O(1) advance of the clock)"
    )


def _hot(f: dict) -> str:
    """The share of ops the C++ hot path served (none in wall mode, or where it did not build)."""
    served = f.get("hot_path_ops") or 0
    return f"; {served / f['ops']:.0%} by the C++ hot path" if served and f["ops"] else ""


def _processes(f: dict) -> str:
    n = f.get("processes", 1)
    return f" in {n} processes" if n > 1 else ""


def _unfitted(f: dict) -> str:
    """Op keys priced by a family model or the roofline: where the cost model guesses."""
    keys = f.get("unfitted_ops") or []
    if not keys:
        return "none (every op priced by a model fitted for it)"
    shown = ", ".join(k.removeprefix("aten::") for k in keys[:8])
    return f"{len(keys)} op keys ({shown}{', ...' if len(keys) > 8 else ''})"


def _synth(d: dict) -> str:
    return "(" + ", ".join(f"{k}: {v}" for k, v in sorted(d.items())) + ")" if d else ""


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _tp_label(plan: dict) -> str:
    return f" · tp {plan['tp']}" if plan.get("tp", 1) > 1 else ""


def _check_tp(model_config, tp: int) -> None:
    from revati.models import check_tp as check

    try:
        check(model_config, tp)
    except ValueError as e:
        raise BadInput(f"--tp: {e}") from None


def _emulate_script(argv: list[str], gpu_name: str, host_time: str, tp: int = 1, pp: int = 1) -> None:
    from replayer.ranks import is_torchrun
    from replayer.run import emulate_script
    from revati.cost import Roofline
    from revati.hardware import gpu as gpu_spec

    if argv and argv[0] == "--":
        argv = argv[1:]
    try:
        spec = gpu_spec(gpu_name)
    except ValueError as e:
        raise BadInput(str(e)) from None
    _check_host_time(host_time)
    if is_torchrun(argv) or pp > 1:
        if is_torchrun(argv) and (tp > 1 or pp > 1):
            raise BadInput(
                "--tp / --pp with torchrun: torchrun's --nproc-per-node says how many ranks there are"
            )
        _emulate_ranks(argv, spec, host_time, tp * pp)
        return
    _check_script(argv)
    # Not wrapped in `except ValueError`: once the script runs, its own errors are its own, not bad input.
    code, emu = emulate_script(argv, spec, Roofline(spec), host_time, tp=tp)
    err_console.print(
        f"[dim]revati: virtual {spec.name}: {emu.clock.now:.4f} s of virtual time, "
        f"{emu.dispatcher.ops:,} ops, peak {emu.allocator.peak / 2**30:.2f} GiB[/]",
        highlight=False,
    )
    sys.exit(code)


def _emulate_ranks(argv: list[str], spec, host_time: str, ranks: int) -> None:
    """One process per rank (or torchrun's), emulated from the environment; a table of the ranks' clocks."""
    import tempfile

    from replayer.ranks import is_torchrun, launch

    if not is_torchrun(argv):
        _check_script(argv)
    with tempfile.TemporaryDirectory(prefix="revati-ranks-") as tmp:
        try:
            code, rows = launch(argv, ranks, spec.key, host_time, Path(tmp), gpus_per_node=spec.gpus_per_node)
        except FileNotFoundError as e:
            raise BadInput(f"cannot start {argv[0]!r}: {e.strerror}") from None
    table = Table(title=f"{len(rows)} ranks on virtual {spec.name}s", title_justify="left")
    for col in ("rank", "virtual s", "collectives", "waited (real s)", "ops", "peak GiB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r.rank), f"{r.virtual_seconds:.6f}", f"{r.collectives:,}", f"{r.waited:.3f}", f"{r.ops:,}",
            f"{r.peak_memory / 2**30:.2f}",
        )  # fmt: skip
    err_console.print(table)
    if not rows:
        err_console.print("[bold red]revati:[/] no rank reported (did the command start any?)")
    sys.exit(code)


def _check_script(argv: list[str], verb: str = "emulate") -> None:
    """The script or module to run is named and, for a script, exists."""
    from revati.scripts import Script

    try:
        Script.parse(argv, verb)
    except (ValueError, FileNotFoundError) as e:
        raise BadInput(str(e)) from None
