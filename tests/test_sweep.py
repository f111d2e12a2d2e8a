"""`revati sweep`: a grid of emulations, each in its own process, locally or on Ray; restartable; judged
against SLOs and prices."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import duckdb
import psutil
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from revati.cli import app
from revati.schema import read_table
from revati.sweep import RUN_COLUMNS, SpecError, best, load_spec, pareto, points, run_sweep

WORKLOAD = "poisson:rate=4,n=6,prompt=fixed(32),output=fixed(6)"
TWELVE = (
    Path(__file__).parents[1] / "benchmarks" / "sweeps" / "tiny-12.toml"
).read_text()  # the shipped example


def write_spec(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def sweep_cli(*args: str):
    return CliRunner().invoke(app, ["sweep", *args])


def comparable(path: Path):
    """A results table without the columns that depend on the run rather than the configuration."""
    return pq.read_table(path).drop(list(RUN_COLUMNS))


def _marked(marker: str) -> list[int]:
    """Live processes (not zombies) whose environment holds `marker`."""
    found = []
    for process in psutil.process_iter():
        try:
            if (
                process.status() != psutil.STATUS_ZOMBIE
                and process.environ().get("REVATI_TEST_MARKER") == marker
            ):
                found.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


# --- the spec --------------------------------------------------------------------------------------


def test_the_grid_is_the_product_of_its_axes_last_axis_fastest(tmp_path):
    spec = load_spec(write_spec(tmp_path, TWELVE))
    todo = points(spec)
    assert spec.size == len(todo) == 12
    assert [p.index for p in todo] == list(range(12))
    assert todo[0].params == {"gpu": "h100", "options.max_batch_tokens": 64, "workload.rate": 4}
    assert todo[1].params == {"gpu": "h100", "options.max_batch_tokens": 64, "workload.rate": 16}
    assert todo[11].params == {"gpu": "h200", "options.max_batch_tokens": 256, "workload.rate": 16}
    assert len({p.point_id for p in todo}) == 12


def test_a_point_is_the_base_configuration_with_its_grid_values(tmp_path):
    spec = load_spec(write_spec(tmp_path, TWELVE))
    point = points(spec)[5]  # h100, max_batch_tokens 256, rate 16
    assert point.config["gpu"] == "h100"
    assert point.config["options"] == {"max_batch_tokens": 256}
    assert point.config["workload"] == WORKLOAD.replace("rate=4", "rate=16")
    argv = point.argv(tmp_path / "t", "none")
    assert argv[:2] == ["emulate", "--json"]
    assert argv[argv.index("--option") + 1] == "max_batch_tokens=256"
    assert argv[argv.index("--workload") + 1] == point.config["workload"]


def test_a_point_id_names_the_configuration_not_its_place_in_the_grid(tmp_path):
    spec = load_spec(write_spec(tmp_path, TWELVE))
    reordered = load_spec(
        write_spec(tmp_path, TWELVE.replace('["h100", "h200"]', '["h200", "h100"]'), "b.toml")
    )
    ids = {json.dumps(p.params, sort_keys=True): p.point_id for p in points(spec)}
    again = {json.dumps(p.params, sort_keys=True): p.point_id for p in points(reordered)}
    assert ids == again
    assert (
        points(spec)[0].index
        != [p for p in points(reordered) if p.point_id == points(spec)[0].point_id][0].index
    )


def test_a_sample_is_a_seeded_subset_of_the_grid(tmp_path):
    spec = load_spec(write_spec(tmp_path, TWELVE + "\n[sample]\nn = 5\nseed = 3\n"))
    first, second = points(spec), points(spec)
    assert len(first) == 5 and spec.size == 12
    assert [p.point_id for p in first] == [p.point_id for p in second]
    assert {p.point_id for p in first} <= {
        p.point_id for p in points(load_spec(write_spec(tmp_path, TWELVE, "a.toml")))
    }
    other = load_spec(write_spec(tmp_path, TWELVE + "\n[sample]\nn = 5\nseed = 4\n", "c.toml"))
    assert [p.index for p in points(other)] != [p.index for p in first]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('model = "tiny-llama"\nbatch = 4\n[grid]\ngpu = ["h100"]\n', ["unknown key 'batch'"]),
        ('model = "tiny-llama"\n[grid]\n', ["grid is empty"]),
        ('model = "tiny-llama"\n', ["grid is empty"]),
        ('model = "tiny-llama"\n[grid]\ngpu = []\n', ["[grid] gpu", "non-empty list"]),
        ('model = "tiny-llama"\n[grid]\nbatch = [1, 2]\n', ["unknown key 'batch' in [grid]"]),
        ('model = "tiny-llama"\n[grid]\ngpu = ["h100", "h900"]\n', ["unknown GPU 'h900'"]),
        ('model = "tiny-llama"\n[grid.options]\nbatch = [1, 2]\n', ["engine option 'batch'"]),
        ('model = "tiny-llama"\n[grid.workload]\nburst = [1, 2]\n', ["cannot set 'burst'"]),
        ('model = "tiny-llama"\n[grid]\ngpu = ["h100"]\n[slo]\nttft_p95_ms = 9\n', ["[slo] ttft_p95_ms"]),
        ('model = "tiny-llama"\n[grid]\ngpu = ["h100"]\n[sample]\ncount = 3\n', ["'count' in [sample]"]),
        ('model = "tiny-llama"\n[grid]\ngpu = ["h100"]\n[prices]\nh100 = "cheap"\n', ["[prices] h100"]),
        ('model = "tiny-llama"\n[grid]\ntp = [1, 0]\n', ["tp must be a whole number"]),
        ('model = "tiny-llama"\n[grid]\ngpu = ["h100"\n', ["not valid TOML"]),
        (
            'model = "tiny-llama"\ntimeout = "long"\n[grid]\ngpu = ["h100"]\n',
            ["timeout must be a positive number"],
        ),
        ('model = "tiny-llama"\n[grid]\ngpu = ["h100"]\n[sample]\nn = true\n', ["[sample] n must be"]),
        ('model = "tiny-llama"\n[grid]\ngpu = ["h100"]\n[sample]\nseed = "x"\n', ["[sample] seed must be"]),
        ('model = "tiny-llama"\n[grid]\ngpu = [1]\n', ["gpu must be a string, not 1"]),
        ('model = "tiny-llama"\nprofile = 3\n[grid]\ngpu = ["h100"]\n', ["profile must be a string"]),
        (
            'model = "tiny-llama"\n[grid]\nprofile = ["nowhere.parquet"]\n',
            ["profile 'nowhere.parquet'", "no such file"],
        ),
    ],
)
def test_a_bad_spec_is_refused_naming_the_file_and_the_key(tmp_path, text, words):
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert message.startswith(str(path))
    for word in words:
        assert word in message


def test_a_spec_that_is_a_directory_is_refused(tmp_path):
    with pytest.raises(SpecError, match="cannot read it"):
        load_spec(tmp_path)


def test_files_a_spec_names_are_found_beside_it_and_counted_by_contents(tmp_path, monkeypatch):
    text = 'model = "tiny-llama"\nworkload = "w.csv?limit=2"\n[grid]\nprofile = ["p.parquet", "roofline"]\n'
    trace = "arrival,prompt_tokens,output_tokens\n0,5,2\n1,6,3\n2,7,4\n"
    ids = []
    for where in ("a", "b"):
        folder = tmp_path / where
        folder.mkdir()
        (folder / "w.csv").write_text(trace)
        (folder / "p.parquet").write_bytes(b"not read here")
        spec = load_spec(write_spec(folder, text))
        monkeypatch.chdir(tmp_path)  # the points find the files beside the spec, not here
        first = points(spec)[0]
        assert first.config["profile"] == str((folder / "p.parquet").resolve())
        assert first.config["workload"] == f"{(folder / 'w.csv').resolve()}?limit=2"
        ids.append([p.point_id for p in points(spec)])
    assert ids[0] == ids[1]  # the same files in another place: the same points
    (tmp_path / "b" / "w.csv").write_text(trace.replace("0,5,2", "0,5,9"))
    assert [p.point_id for p in points(load_spec(tmp_path / "b" / "sweep.toml"))] != ids[0]


@pytest.mark.parametrize(
    ("text", "args", "words"),
    [
        ('model = "tiny-llama"\nbatch = 4\n[grid]\ngpu = ["h100"]\n', [], "unknown key 'batch'"),
        ('model = "tiny-llama"\n[grid]\n', [], "the grid is empty"),
        (
            'model = "tiny-llama"\n[grid]\ngpu = ["h100"]\n',
            ["--backend", "dask"],
            "--backend must be local or ray",
        ),
        ('model = "tiny-llama"\n[grid]\ngpu = ["h100"]\n[prices]\nh900 = 2\n', [], "unknown GPU 'h900'"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, text, args, words):
    path = write_spec(tmp_path, text)
    result = sweep_cli(str(path), "--out", str(tmp_path / "out"), *args)
    assert result.exit_code == 2, result.output
    assert words in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_an_out_directory_holding_other_files_is_refused_and_left_alone(tmp_path):
    path = write_spec(tmp_path, 'model = "tiny-llama"\n[grid]\ngpu = ["h100"]\n')
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = sweep_cli(str(path), "--out", str(out))
    assert result.exit_code == 2 and "not a sweep's" in result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_an_unreachable_ray_address_exits_2_at_once(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write_spec(tmp_path, 'model = "tiny-llama"\n[grid]\ngpu = ["h100"]\n')
    started = time.monotonic()
    result = sweep_cli(
        str(path), "--backend", "ray", "--ray-address", f"127.0.0.1:{port}", "--out", str(tmp_path / "o")
    )
    assert result.exit_code == 2, result.output
    assert f"cannot reach a Ray cluster at 127.0.0.1:{port}" in result.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "o").exists()


# --- judging results -------------------------------------------------------------------------------


def _row(index, tok_s, ttft, met=True, usd=None, status="ok"):
    return {
        "index": index, "point_id": f"p{index}", "status": status, "throughput_tok_s": tok_s,
        "ttft_p99_ms": ttft, "slo_met": met, "usd_per_mtok": usd,
    }  # fmt: skip


def test_the_frontier_holds_the_points_nothing_beats_on_both_throughput_and_latency():
    rows = [
        _row(0, 100, 10), _row(1, 90, 12), _row(2, 150, 20), _row(3, 150, 25), _row(4, 200, 40),
        _row(5, 500, 1, status="failed"), _row(6, 120, 15),
    ]  # fmt: skip
    front = [r["index"] for r in pareto(rows, "ttft_p99_ms")]
    assert front == [0, 6, 2, 4]  # 1 is beaten by 0, 3 by 2; a failed point is never on it
    for r in rows:
        if r["index"] not in front and r["status"] == "ok":
            assert any(
                f["throughput_tok_s"] >= r["throughput_tok_s"] and f["ttft_p99_ms"] <= r["ttft_p99_ms"]
                for f in pareto(rows, "ttft_p99_ms")
            )


def test_best_is_the_highest_throughput_or_lowest_cost_among_points_meeting_the_slos():
    rows = [_row(0, 100, 10, usd=2.0), _row(1, 300, 50, met=False, usd=0.5), _row(2, 200, 20, usd=3.0)]
    assert best(rows)["index"] == 2
    assert best(rows, by="cost")["index"] == 0
    assert best([_row(0, 100, 10, met=False)]) is None
    assert best([_row(0, 100, 10)], by="cost") is None  # no prices: no cost ranking


# --- running sweeps --------------------------------------------------------------------------------


def test_twelve_points_give_one_results_table_identical_locally_and_on_ray(tmp_path):
    pytest.importorskip("ray")
    spec = load_spec(write_spec(tmp_path, TWELVE))
    local = run_sweep(spec, tmp_path / "local", backend="local", workers=2)
    on_ray = run_sweep(spec, tmp_path / "ray", backend="ray", workers=2)
    assert local.ran == on_ray.ran == 12
    rows = local.rows()
    assert [r["status"] for r in rows] == ["ok"] * 12, [r["error"] for r in rows]
    assert comparable(tmp_path / "local" / "results.parquet").equals(
        comparable(tmp_path / "ray" / "results.parquet")
    )
    # deterministic host time: every figure of the configuration, identical; the machine's time is not
    for r in rows:
        assert r["requests"] == 6 and r["throughput_tok_s"] > 0 and r["ttft_p99_ms"] > 0
        met = r["ttft_p99_ms"] <= 15 and r["tpot_p50_ms"] <= 9
        assert r["slo_met"] == met
        price = {"h100": 2.5, "h200": 3.5}[r["gpu"]]
        assert r["usd_per_mtok"] == pytest.approx(price / 3600 / r["throughput_tok_s"] * 1e6)
        trace = tmp_path / "ray" / r["trace"]  # the trace came back from the Ray worker as files
        assert read_table(trace, "requests").num_rows == 6
    # the SLOs and the grid change the figures: faster arrival, more throughput
    by_rate = {
        json.loads(r["params"])["workload.rate"]: r["throughput_tok_s"] for r in rows if r["index"] < 2
    }
    assert by_rate[16] > 1.5 * by_rate[4]
    front = pareto(rows, "ttft_p99_ms")
    assert {r["point_id"] for r in front} == {r["point_id"] for r in rows if r["on_frontier"]}
    # DuckDB reads the results beside the traces
    con = duckdb.connect()
    n, ok = con.execute(
        f"SELECT count(*), count(*) FILTER (status = 'ok') FROM '{tmp_path / 'local' / 'results.parquet'}'"
    ).fetchone()
    assert (n, ok) == (12, 12)
    joined = con.execute(
        f"""SELECT r.index, count(*), median(q.first_token - q.arrival) * 1000
        FROM '{tmp_path / "local" / "results.parquet"}' r
        JOIN read_parquet('{tmp_path / "local" / "traces"}/*/requests/*.parquet') q USING (run_id)
        GROUP BY r.index ORDER BY r.index"""
    ).fetchall()
    assert [(i, n) for i, n, _ in joined] == [(i, 6) for i in range(12)]
    assert all(
        ttft_p50 == pytest.approx(r["ttft_p50_ms"]) for (_, _, ttft_p50), r in zip(joined, rows, strict=True)
    )


def test_changed_slos_and_prices_rejudge_the_points_without_running_them(tmp_path):
    text = f"""
    model = "tiny-llama"
    workload = "{WORKLOAD}"
    [grid.workload]
    rate = [4, 16]
    [slo]
    ttft_p99_ms = 1000
    [prices]
    h100 = 2.5
    """
    first = run_sweep(load_spec(write_spec(tmp_path, text)), tmp_path / "out", workers=2)
    assert first.ran == 2 and all(r["slo_met"] for r in first.rows())
    strict = load_spec(
        write_spec(tmp_path, text.replace("1000", "0.001").replace("2.5", "5.0"), "strict.toml")
    )
    again = run_sweep(strict, tmp_path / "out", workers=2)
    assert again.ran == 0 and again.skipped == 2
    for before, after in zip(first.rows(), again.rows(), strict=True):
        assert after["ttft_p99_ms"] == before["ttft_p99_ms"]
        assert after["slo_met"] is False and "ttft_p99_ms" in after["slo_missed"]
        assert after["usd_per_mtok"] == pytest.approx(2 * before["usd_per_mtok"])


def test_points_that_cannot_run_are_recorded_with_their_error(tmp_path):
    text = f"""
    model = "tiny-llama"
    workload = "{WORKLOAD}"
    [grid]
    tp = [1, 3]
    """
    run = run_sweep(load_spec(write_spec(tmp_path, text)), tmp_path / "out", workers=2)
    ok, bad = run.rows()
    assert ok["status"] == "ok" and ok["error"] is None
    assert bad["status"] == "failed" and "tensor parallelism 3 must divide" in bad["error"]
    assert bad["throughput_tok_s"] is None and not bad["slo_met"] and not bad["on_frontier"]
    assert run_sweep(load_spec(tmp_path / "sweep.toml"), tmp_path / "out").ran == 0  # a failure is a result
    retried = run_sweep(load_spec(tmp_path / "sweep.toml"), tmp_path / "out", retry_failed=True)
    assert (retried.ran, retried.skipped) == (1, 1)
    assert retried.rows()[1]["status"] == "failed"
    slow = write_spec(
        tmp_path,
        f'model = "tiny-llama"\nworkload = "{WORKLOAD}"\ntimeout = 0.05\n[grid]\ntp = [2]\n',
        "t.toml",
    )
    (late,) = run_sweep(load_spec(slow), tmp_path / "slow").rows()
    assert late["status"] == "timeout" and "0.05 s" in late["error"]
    assert pq.read_table(tmp_path / "slow" / "points" / f"{late['point_id']}.parquet").num_rows == 1


def test_an_interrupted_sweep_run_again_completes_only_the_missing_points(tmp_path):
    path = write_spec(tmp_path, TWELVE)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "revati", "sweep", str(path), "--out", str(out), "--workers", "2"]
    marker = f"sweep-{uuid.uuid4().hex}"  # inherited by the sweep's fork server and every point it forks
    env = os.environ | {"REVATI_TEST_MARKER": marker}
    sweep = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while len(list((out / "points").glob("*.parquet"))) < 2:
        assert sweep.poll() is None, sweep.communicate()
        assert time.monotonic() < deadline, "no point finished in 240 s"
        time.sleep(0.2)
    assert _marked(marker), "the points run in processes of their own"
    sweep.send_signal(signal.SIGINT)
    _, stderr = sweep.communicate(timeout=60)
    assert sweep.returncode == 130, stderr
    assert "interrupted with" in stderr and "run the same command again" in stderr
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "points").glob("*.parquet")}
    assert 2 <= len(kept) < 12
    assert not any(p.name.endswith(".tmp") for p in (out / "points").iterdir())  # no half-written point
    deadline = time.monotonic() + 15  # the fork server may take a moment to see its parent gone
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _marked(marker), "processes left running after the sweep stopped"
    again = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["ran"] == 12 - len(kept) and summary["skipped"] == len(kept)
    assert summary["statuses"] == {"ok": 12}
    assert {
        p.name: p.stat().st_mtime_ns for p in (out / "points").glob("*.parquet") if p.name in kept
    } == kept
    assert (out / "frontier.png").stat().st_size > 10_000


def test_help_shows_the_spec_s_tables_with_their_brackets():
    result = sweep_cli("--help")
    assert result.exit_code == 0
    for table in ("[grid]", "[grid.options]", "[slo]", "[prices]"):
        assert table in result.output  # rich markup would otherwise swallow them as tags
