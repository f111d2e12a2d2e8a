"""PNG plots of a comparison (matplotlib, headless): latency CDFs, step times, per-op error.

Each plot reads the DuckDB views of `revati.analysis` and nothing else.
"""

from __future__ import annotations

from pathlib import Path

from revati.analysis import open_traces

_SIDES = ("recorded", "emulated")


def comparison_plots(recorded, emulated, out: Path) -> list[Path]:
    """Write latency_cdfs.png, step_times.png and op_error.png under `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    con = open_traces(dict(zip(_SIDES, (recorded, emulated), strict=True)))
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric in zip(axes, ("ttft", "tpot", "e2e"), strict=True):
        for side in _SIDES:
            values = sorted(
                v * 1e3
                for (v,) in con.execute(
                    f"select {metric} from requests where side = ? and {metric} is not null", [side]
                ).fetchall()
            )
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=side)
        ax.set_xlabel(f"{metric.upper()} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Latency CDFs, recorded vs emulated")
    written.append(_save(fig, out / "latency_cdfs.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for side, marker in zip(_SIDES, ("o", "x"), strict=True):
        rows = con.execute("select tokens, host_time from iterations where side = ?", [side]).fetchall()
        if rows:
            ax.scatter(
                [r[0] for r in rows], [r[1] * 1e3 for r in rows], s=10, marker=marker, alpha=0.6, label=side
            )
    ax.set_xscale("symlog")
    ax.set_xlabel("tokens in the step")
    ax.set_ylabel("step time on the host (ms)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Engine steps")
    written.append(_save(fig, out / "step_times.png"))

    from revati.analysis import QUERIES

    rows = con.execute(QUERIES["op_keys"].format(a="'recorded'", b="'emulated'")).fetchall()[:12]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if rows:
        ax.barh([r[0] for r in rows][::-1], [r[3] * 100 for r in rows][::-1])
    else:
        ax.text(0.5, 0.5, "no op shapes in common", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("time-weighted error (% of recorded device time)")
    ax.set_title("Per-op error, shapes both sides ran")
    written.append(_save(fig, out / "op_error.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
