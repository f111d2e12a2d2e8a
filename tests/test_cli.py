"""The `revati emulate` command as its users see it: exit codes, one-line errors, figures, traces, scripts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from revati.cli import app
from revati.schema import read_table

TINY = ["--model", "tiny-llama", "--workload", "poisson:rate=50,n=3,prompt=fixed(16),output=fixed(4)"]
REVATI = Path(sys.executable).with_name("revati")


def emulate(*args: str):
    """`revati emulate ARGS` in this process; the result has exit_code, stdout, stderr, exception."""
    return CliRunner().invoke(app, ["emulate", *args])


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)  # in case FORCE_COLOR is set where the tests run


def error_line(result) -> str:
    """The one line a failed command printed to stderr."""
    lines = _plain(result.stderr).strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("revati: ")
    return lines[0]


# --- bad input: exit 2, one line naming the problem, nothing written ---------------------------------

HEADER = "arrival,prompt_tokens,output_tokens\n"

BAD_INPUTS = [
    pytest.param(["--model", "gpt-17"], {}, ["unknown model 'gpt-17'", "tiny-llama"], id="unknown-model"),
    pytest.param(["--gpu", "b999"], {}, ["unknown GPU 'b999'", "h100"], id="unknown-gpu"),
    pytest.param(["--engine", "tgi"], {}, ["unknown engine 'tgi'", "hf-cb"], id="unknown-engine"),
    pytest.param(["--host-time", "sometimes"], {}, ["--host-time", "'sometimes'"], id="bad-host-time"),
    pytest.param(
        ["--workload", "{tmp}/trace.csv"],
        {"trace.csv": "arrival,prompt_tokens\n0,16\n"},
        ["trace.csv", "no output column", "output_tokens"],
        id="csv-missing-column",
    ),
    pytest.param(
        ["--workload", "{tmp}/trace.csv"],
        {"trace.csv": HEADER + "0,16,4\n0.1,-4,4\n"},
        ["trace.csv", "row 2", "'prompt_tokens'", "-4"],
        id="csv-negative-length",
    ),
    pytest.param(
        ["--workload", "{tmp}/trace.csv"],
        {"trace.csv": HEADER + "0,16,4\n0.5,16,4\n0.2,16,4\n"},
        ["trace.csv", "row 3", "'arrival'", "sort the file"],
        id="csv-unsorted-arrivals",
    ),
    pytest.param(
        ["--workload", "{tmp}/gone.csv"], {}, ["gone.csv", "no such workload file"], id="missing-workload"
    ),
    pytest.param(
        ["--profile", "{tmp}/profile.parquet"],
        {"profile.parquet": "a,b\n1,2\n"},
        ["profile.parquet", "not a readable Parquet file"],
        id="profile-not-parquet",
    ),
    pytest.param(
        ["--profile", "{tmp}/gone.parquet"], {}, ["gone.parquet", "no such file"], id="missing-profile"
    ),
    # rich markup must not eat a bracketed part of a name: the message shows what the user typed
    pytest.param(["--workload", "{tmp}/runs[v2]/trace.csv"], {}, ["runs[v2]/trace.csv"], id="bracketed-path"),
]


@pytest.mark.parametrize("args, files, fragments", BAD_INPUTS)
def test_bad_input_is_one_line_naming_the_problem_and_writes_nothing(tmp_path, args, files, fragments):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    out = tmp_path / "trace"
    result = emulate(*TINY, *(a.format(tmp=tmp_path) for a in args), "--out", str(out))
    assert result.exit_code == 2, result.output
    line = error_line(result)
    for fragment in fragments:
        assert fragment in line
    assert "Traceback" not in result.output
    assert not out.exists()


def test_out_that_is_a_file_is_bad_input(tmp_path):
    out = tmp_path / "trace"
    out.write_text("not a directory")
    result = emulate(*TINY, "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "is a file" in error_line(result)
    assert out.read_text() == "not a directory"


def test_out_that_holds_files_is_bad_input(tmp_path):
    out = tmp_path / "trace"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = emulate(*TINY, "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "already holds files" in error_line(result)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# --- a successful run: figures as JSON and a readable trace -----------------------------------------

FIGURES = {
    "ttft_p50_ms",
    "tpot_p50_ms",
    "itl_p99_ms",
    "e2e_p99_ms",
    "throughput_tok_s",
    "virtual_seconds",
    "wall_seconds",
    "time_warp",
    "peak_memory_gib",
    "synthesized_values",
}


@pytest.mark.parametrize("engine", ["hf-generate", "hf-cb"])
def test_tiny_run_prints_figures_as_json_and_writes_a_complete_trace(tmp_path, engine):
    out = tmp_path / "trace"
    result = emulate(*TINY, "--engine", engine, "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures.keys() >= FIGURES
    assert figures["requests"] == 3
    assert figures["engine"] == engine
    assert all(figures[k] > 0 for k in FIGURES - {"synthesized_values"})
    assert figures["trace"] == str(out)

    run = read_table(out, "run").to_pylist()
    assert len(run) == 1
    assert run[0]["source"] == "emulated"
    assert run[0]["complete"] is True
    assert run[0]["engine"] == engine
    requests = read_table(out, "requests").to_pylist()
    assert sorted(r["request_id"] for r in requests) == ["0", "1", "2"]
    for r in requests:
        assert r["output_tokens"] == 4
        assert len(r["token_times"]) == r["output_tokens"]
        assert r["token_times"] == sorted(r["token_times"])
    assert read_table(out, "iterations").num_rows > 0
    # serving alone: from t0 (set-up and warm-up before it) to the last token, inside the whole run
    assert figures["serving_virtual_seconds"] == max(t for r in requests for t in r["token_times"])
    assert figures["serving_virtual_seconds"] < figures["virtual_seconds"]
    assert 0 < figures["serving_wall_seconds"] < figures["wall_seconds"]
    serving_warp = figures["serving_virtual_seconds"] / figures["serving_wall_seconds"]
    assert figures["serving_time_warp"] == pytest.approx(serving_warp)


def test_a_workload_file_named_by_its_absolute_path_is_described_not_read_as_markup(tmp_path):
    # the description ends in "[/abs/path.csv?limit=2]", which rich would read as a closing tag
    trace = tmp_path / "requests.csv"
    trace.write_text("arrival,prompt_tokens,output_tokens\n0.0,16,4\n0.01,12,3\n0.02,9,2\n")
    result = emulate("--engine", "hf-generate", "--model", "tiny-llama", "--workload", f"{trace}?limit=2",
                     "--out", str(tmp_path / "trace"))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"[{trace}?limit=2]" in _plain(result.output).replace("\n", "")


def test_an_emulated_cpu_sizes_the_paged_cache_from_the_workload_as_the_recorded_cpu_did(tmp_path):
    # with the CPU profile the virtual device is that CPU, with its 20+ GB as "free memory": sized from
    # that, transformers' continuous batching would take gigabytes for its cache, not what the CPU run took
    profile = Path(__file__).resolve().parent.parent / "traces" / "cpu" / "profile.parquet"
    result = emulate(*TINY, "--engine", "hf-cb", "--profile", str(profile), "--dtype", "float32", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["peak_memory_gib"] < 0.1


# --- `revati emulate -- python SCRIPT`: any script with CUDA virtualized ----------------------------

MATMUL_SCRIPT = """
    import time
    import torch

    assert torch.cuda.is_available()
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    start = time.perf_counter()
    b = a @ a
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(f"device: {torch.cuda.get_device_name()}")
    print(f"elapsed: {elapsed!r}")
"""


def script(tmp_path: Path, source: str, name: str = "bench.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def reported(stdout: str, key: str) -> str:
    match = re.search(rf"^{key}: (.+)$", stdout, re.MULTILINE)
    assert match, f"no {key!r} line in:\n{stdout}"
    return match[1]


def test_script_sees_a_virtual_h100_and_its_clock(tmp_path):
    result = emulate("--", "python", script(tmp_path, MATMUL_SCRIPT))
    assert result.exit_code == 0, result.output
    assert reported(result.stdout, "device") == "NVIDIA H100 80GB HBM3"
    # 2·4096³ bf16 FLOP take ~0.2 ms on an H100; a CPU doing the real matmul would take far longer
    assert 0 < float(reported(result.stdout, "elapsed")) < 0.01


def test_script_gpu_option_changes_the_device(tmp_path):
    result = emulate("--gpu", "h200", "--", "python", script(tmp_path, MATMUL_SCRIPT))
    assert result.exit_code == 0, result.output
    assert reported(result.stdout, "device") == "NVIDIA H200"


def test_script_exit_code_is_the_commands_exit_code(tmp_path):
    path = script(tmp_path, "import sys\nsys.exit(3)\n")
    result = subprocess.run([str(REVATI), "emulate", "--", "python", path], capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr


def test_script_own_errors_are_not_reported_as_bad_input(tmp_path):
    path = script(tmp_path, "raise ValueError('the script failed')\n")
    result = emulate("--", "python", path)
    assert result.exit_code == 1
    assert isinstance(result.exception, ValueError)
    assert "revati:" not in result.stderr


@pytest.mark.parametrize(
    "argv, fragment",
    [
        pytest.param(["python", "{tmp}/gone.py"], "no such script", id="missing-script"),
        pytest.param(["python"], "give a script to run", id="no-script"),
        pytest.param(["python", "-m"], "give a script to run", id="no-module"),
    ],
)
def test_script_that_cannot_start_is_bad_input(tmp_path, argv, fragment):
    result = emulate("--", *(a.format(tmp=tmp_path) for a in argv))
    assert result.exit_code == 2, result.output
    assert fragment in error_line(result)


# --- out of memory: the run fails cleanly -----------------------------------------------------------


def test_model_that_does_not_fit_fails_with_out_of_memory(tmp_path):
    out = tmp_path / "trace"
    result = emulate(
        "--model", "llama-3.1-70b", "--gpu", "l40s", "--engine", "hf-generate",
        "--workload", "poisson:rate=1,n=1,prompt=fixed(8),output=fixed(2)",
        "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in _plain(result.stderr).splitlines() if line.startswith("revati: ")]
    assert len(lines) == 1, result.stderr
    assert "out of memory" in lines[0]
    assert "llama-3.1-70b" in lines[0]
    assert "NVIDIA L40S" in lines[0]
    assert "--tp 4 (32.9 GiB of weights per GPU)" in lines[0]  # the least that leaves room: 48 GiB each
    assert not out.exists()


def test_engine_options_reach_the_engine_and_unknown_ones_are_refused(tmp_path):
    from typer.testing import CliRunner

    from revati.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["emulate", "--engine", "hf-generate", "--model", "tiny-llama", "-o", "nope=1",
                              "--out", str(tmp_path / "bad")])  # fmt: skip
    assert bad.exit_code == 2
    assert "batch_size" in bad.output and not (tmp_path / "bad").exists()
    work = "poisson:rate=inf,n=4,prompt=fixed(16),output=fixed(4)"
    runs = {}
    for size in (1, 4):
        result = runner.invoke(app, ["emulate", "--engine", "hf-generate", "--model", "tiny-llama", "--json",
                                     "-o", f"batch_size={size}", "--workload", work,
                                     "--out", str(tmp_path / f"b{size}")])  # fmt: skip
        assert result.exit_code == 0, result.output
        runs[size] = json.loads(result.stdout)
    # one request at a time: the last one waits for three others; all four at once: nobody waits
    assert runs[1]["ttft_p99_ms"] > 2 * runs[4]["ttft_p99_ms"]


def test_serving_options_given_with_a_script_are_refused_not_ignored(tmp_path):
    from typer.testing import CliRunner

    from revati.cli import app

    script = tmp_path / "s.py"
    script.write_text("import torch\nprint(torch.cuda.get_device_name())\n")
    result = CliRunner().invoke(app, ["emulate", "--model", "tiny-llama", "--", "python", str(script)])
    assert result.exit_code == 2
    assert "--model does not apply to a script run" in result.output


def test_sglang_without_sglang_installed_says_how_to_get_it_and_records_are_refused(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    missing = lambda name, *a: None if name in ("sglang", "vllm") else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", missing)
    runner = CliRunner()
    result = runner.invoke(app, ["emulate", "--engine", "sglang", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2
    assert "make sglang-venv" in result.output and not (tmp_path / "e").exists()
    result = runner.invoke(app, ["emulate", "--engine", "vllm", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2
    assert "make vllm-venv" in result.output and not (tmp_path / "e").exists()
    record = runner.invoke(
        app, ["record", "--device", "cpu", "--engine", "sglang", "--out", str(tmp_path / "r")]
    )
    assert record.exit_code == 2
    assert "not built yet" in record.output and not (tmp_path / "r").exists()
