"""DuckDB views over traces and `revati compare`: figures, matching, warnings, JSON, plots."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from revati.analysis import VIEWS, compare, open_traces
from revati.cli import app
from revati.metrics import RequestResult, summarize
from revati.schema import read_table

TRACES = Path(__file__).resolve().parent.parent / "traces"
CB = TRACES / "cpu" / "small-hf-cb"
GEN = TRACES / "cpu" / "small-hf-generate"
TINY = TRACES / "cpu" / "tiny-hf-cb"
TWO_RUNS = TRACES / "h100" / "cb-eager-timeline"  # two runs of one workload, no op rows


def test_views_derive_the_same_latencies_as_the_emulators_metrics():
    rows = read_table(CB, "requests").to_pylist()
    fields = ("request_id", "arrival", "prompt_tokens", "output_tokens", "token_times")
    results = [RequestResult(*(r[f] for f in fields)) for r in rows]
    expected = summarize(results)
    con = open_traces({"x": [CB]})
    for metric, view in (("ttft", "requests"), ("tpot", "requests"), ("e2e", "requests"), ("itl", "itl")):
        p50, p99 = con.execute(f"select quantile_cont({metric}, [0.5, 0.99]) from {view}").fetchall()[0][0]
        assert p50 == pytest.approx(getattr(expected, metric).p50, rel=1e-12)
        assert p99 == pytest.approx(getattr(expected, metric).p99, rel=1e-12)
    (tok_s,) = con.execute("select tok_s from throughput").fetchall()[0]
    assert tok_s == pytest.approx(expected.throughput_tok_s, rel=1e-12)


def test_every_view_is_queryable_and_tagged_with_its_side():
    con = open_traces({"recorded": [CB], "other": [GEN]})
    for name in VIEWS:
        sides = {s for (s,) in con.execute(f"select distinct side from {name}").fetchall()}
        assert sides == {"recorded", "other"}, name


def test_a_trace_compared_with_itself_has_no_error():
    result = compare([CB], [CB])
    assert result.warnings == []
    assert all(err == 0 for _, _, err in result.figures.values())
    assert result.matched_requests == 48 and result.per_request == {"ttft": 0.0, "tpot": 0.0, "e2e": 0.0}
    assert result.op_coverage == pytest.approx(1.0)
    assert all(k["error_share"] < 1e-12 for k in result.op_keys)  # DuckDB sums in parallel: last-bit noise


def test_throughput_is_per_run_then_averaged():
    result = compare([TWO_RUNS], [TWO_RUNS])
    con = open_traces({"x": [TWO_RUNS]})
    per_run = [t for (t,) in con.execute("select tok_s from throughput").fetchall()]
    assert len(per_run) == 2 and per_run[0] != per_run[1]
    assert result.figures["throughput_tok_s"][0] == pytest.approx(sum(per_run) / 2)


def test_other_models_or_workloads_are_flagged_and_compared_as_distributions_only():
    result = compare([CB], [TINY])
    assert any("not comparable: the models differ" in w and "small-llama" in w for w in result.warnings)
    assert any("workloads differ" in w and "only the distributions" in w for w in result.warnings)
    assert result.matched_requests == 0 and result.per_request["ttft"] is None
    assert not math.isnan(result.figures["ttft_p50"][2])  # distributions are still compared


def _with_workload(source: Path, target: Path, workload: str) -> Path:
    """A copy of a trace whose run row names another workload spec."""
    shutil.copytree(source, target)
    for part in (target / "run").glob("*.parquet"):
        table = pq.read_table(part)
        column = table.schema.get_field_index("workload")
        pq.write_table(table.set_column(column, "workload", pa.array([workload] * table.num_rows)), part)
    return target


def test_one_trace_file_named_from_two_directories_is_one_workload(tmp_path):
    here = _with_workload(CB, tmp_path / "a", "../shared/workloads/azure_conv_2023.csv?limit=40")
    there = _with_workload(CB, tmp_path / "b", "/work/shared/workloads/azure_conv_2023.csv?limit=40")
    other = _with_workload(CB, tmp_path / "c", "/work/shared/workloads/azure_conv_2023.csv?limit=41")
    assert compare([here], [there]).warnings == []
    assert any("workloads differ" in w for w in compare([here], [other]).warnings)


def test_other_engines_are_flagged():
    result = compare([CB], [GEN])
    assert any("engines differ" in w for w in result.warnings)


def test_compare_cli_prints_a_table_json_and_plots(tmp_path):
    runner = CliRunner()
    shown = runner.invoke(app, ["compare", str(CB), str(GEN)])
    assert shown.exit_code == 0, shown.stderr
    assert "tpot p50 (ms)" in shown.stdout and "throughput (tok/s)" in shown.stdout
    assert "engines differ" in shown.stderr
    as_json = runner.invoke(app, ["compare", str(CB), str(CB), "--json", "--plots", str(tmp_path / "plots")])
    summary = json.loads(as_json.stdout)
    assert summary["figures"]["ttft_p50"]["error"] == 0 and summary["matched_requests"] == 48
    pngs = sorted(Path(p).name for p in summary["plots"])
    assert pngs == ["latency_cdfs.png", "op_error.png", "step_times.png"]
    for name in pngs:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_cli_names_a_missing_trace(tmp_path):
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "nope"), str(CB)])
    assert result.exit_code == 2 and "nope" in result.stderr and "no such trace directory" in result.stderr
