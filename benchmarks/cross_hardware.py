"""Predicting a GPU that was never recorded: an H100 profile scaled to the H200 (and back), against the
other GPU's own recordings of the same runs.

For each `gen-*` run recorded on both GPUs (same model, shapes and kernels): the time-weighted error of
device time per engine step when the other GPU's profile is scaled by the hardware table, when it is used
unscaled, and, for reference, the held-out error of a profile fitted on that GPU's own recording.
Profiles are fitted here from the other GPU's `gen-*` traces only, so no step predicted was fitted on.

    python benchmarks/cross_hardware.py
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from revati.fit import check, fit
from revati.hardware import gpu

TRACES = Path(__file__).resolve().parent.parent / "traces"


def _runs(kind: str) -> list[Path]:
    return sorted(p for p in (TRACES / kind).glob("gen-*") if p.is_dir() and not p.name.endswith("timeline"))


def main() -> None:
    console = Console()
    for source, target in (("h100", "h200"), ("h200", "h100")):
        profile = fit(_runs(source), holdout=0.0).profile
        scaled = profile.on(gpu(target))
        table = Table(title=f"{source} profile predicting {target} steps (time-weighted error per step)")
        for name in ("run", "scaled", "predicted / measured", "unscaled", f"{target}'s own (held out)"):
            table.add_column(name, justify="left" if name == "run" else "right")
        for run in _runs(target):
            with_scaling, without = check(scaled, [run]), check(profile, [run])
            own = fit([run], holdout=0.2).device_error
            table.add_row(
                run.name,
                f"{with_scaling.device_error:.1%}",
                f"{with_scaling.predicted_seconds / with_scaling.measured_seconds:.3f}",
                f"{without.device_error:.1%}",
                f"{own:.1%}",
            )
        console.print(table)


if __name__ == "__main__":
    main()
