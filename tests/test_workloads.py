"""Workloads: generated from a spec, replayed from a trace file, and validated with clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from revati.workloads import DEFAULT_WORKLOAD, Request, Workload, WorkloadError, parse_workload

AZURE_CONV = Path(__file__).resolve().parents[2] / "shared" / "workloads" / "azure_conv_2023.csv"


@pytest.fixture
def azure_conv() -> Path:
    if not AZURE_CONV.is_file():
        pytest.skip(f"{AZURE_CONV} not present (shared workloads live beside the checkout)")
    return AZURE_CONV


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_same_spec_gives_the_same_requests_and_seed_changes_them():
    spec = "poisson:rate=2,n=50,prompt=lognormal(1020,0.9),output=lognormal(129,0.9),seed=3"
    assert parse_workload(spec) == parse_workload(spec)
    assert parse_workload(spec).requests != parse_workload(spec.replace("seed=3", "seed=4")).requests


def test_poisson_rate_and_lognormal_medians_for_many_requests():
    w = parse_workload("poisson:rate=4,n=20000,prompt=lognormal(1020,0.9),output=lognormal(129,0.9)")
    arrivals = np.array([r.arrival for r in w.requests])
    assert arrivals[0] == 0.0
    assert np.all(np.diff(arrivals) >= 0)
    assert (len(w) - 1) / arrivals[-1] == pytest.approx(4, rel=0.03)
    assert np.median([r.prompt_tokens for r in w.requests]) == pytest.approx(1020, rel=0.03)
    assert np.median([r.output_tokens for r in w.requests]) == pytest.approx(129, rel=0.03)


def test_gamma_arrivals_have_the_requested_burstiness():
    w = parse_workload("gamma:rate=2,cv=2,n=20000,prompt=uniform(16,64),output=fixed(8)")
    gaps = np.diff([r.arrival for r in w.requests])
    assert gaps.mean() == pytest.approx(0.5, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(2, rel=0.1)
    prompts = [r.prompt_tokens for r in w.requests]
    assert min(prompts) == 16 and max(prompts) == 64
    assert {r.output_tokens for r in w.requests} == {8}


def test_infinite_rate_sends_everything_at_once():
    w = parse_workload("poisson:rate=inf,n=5,prompt=fixed(4),output=fixed(2)")
    assert [r.arrival for r in w.requests] == [0.0] * 5


def test_default_workload_is_bounded_and_near_azure_medians():
    w = parse_workload(DEFAULT_WORKLOAD)
    prompts = [r.prompt_tokens for r in w.requests]
    outputs = [r.output_tokens for r in w.requests]
    assert len(w) == 100
    assert max(prompts) <= 4096 and max(outputs) <= 512 and min(prompts + outputs) >= 1
    assert 700 < np.median(prompts) < 1400
    assert 90 < np.median(outputs) < 180


def test_describe_is_one_line_with_count_and_spec():
    w = parse_workload("poisson:rate=1,n=3,prompt=fixed(10),output=fixed(2)")
    line = w.describe()
    assert "\n" not in line
    assert line.startswith("3 requests")
    assert "prompt median 10" in line and w.spec in line


def test_replay_plain_columns_and_clip(tmp_path):
    path = write_csv(tmp_path / "t.csv", "arrival,prompt_tokens,output_tokens\n0,100,5\n1,3000,7\n3,50,1\n")
    w = parse_workload(f"{path}?scale=2&max_prompt=2048")
    assert w.requests == (
        Request("0", 0.0, 100, 5),
        Request("1", 0.5, 2048, 7),
        Request("2", 1.5, 50, 1),
    )


def test_replay_jsonl_and_parquet_with_request_ids(tmp_path):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"request_id": "a", "arrival": 0.5, "prompt_tokens": 4, "output_tokens": 2}\n')
    assert parse_workload(jsonl).requests == (Request("a", 0.5, 4, 2),)
    pq.write_table(
        pa.table({"arrived_at": [0.0, 2.0], "num_prefill_tokens": [9, 8], "num_decode_tokens": [1, 2]}),
        tmp_path / "t.parquet",
    )
    assert [r.prompt_tokens for r in parse_workload(tmp_path / "t.parquet").requests] == [9, 8]


def test_replay_azure_conversation_trace_with_limit_and_scale(azure_conv):
    full = parse_workload(f"{azure_conv}?limit=100")
    fast = parse_workload(f"{azure_conv}?limit=100&scale=4")
    assert len(full) == 100
    assert full.requests[1] == Request("1", 4.314579, 396, 109)  # second row of the file
    assert fast.requests[-1].arrival == pytest.approx(full.requests[-1].arrival / 4)
    assert [r.prompt_tokens for r in fast.requests] == [r.prompt_tokens for r in full.requests]


def test_replay_whole_azure_trace_matches_its_published_medians(azure_conv):
    w = parse_workload(azure_conv)
    assert len(w) == 19366
    assert np.median([r.prompt_tokens for r in w.requests]) == 1020
    assert np.median([r.output_tokens for r in w.requests]) == 129


def test_missing_column_names_file_and_expected_names(tmp_path):
    path = write_csv(tmp_path / "t.csv", "arrival,prompt_tokens,tokens_out\n0,1,1\n")
    with pytest.raises(
        WorkloadError, match=r"t\.csv: no output column; expected one of output_tokens, num_decode"
    ):
        parse_workload(path)


@pytest.mark.parametrize("value", ["0", "-3", "2.5"])
def test_bad_length_names_file_row_and_column(tmp_path, value):
    path = write_csv(
        tmp_path / "t.csv", f"arrived_at,num_prefill_tokens,num_decode_tokens\n0,4,1\n1,{value},1\n"
    )
    with pytest.raises(WorkloadError, match=r"t\.csv, row 2, column 'num_prefill_tokens'"):
        parse_workload(path)


def test_unsorted_arrivals_name_the_row(tmp_path):
    path = write_csv(tmp_path / "t.csv", "arrival,prompt_tokens,output_tokens\n0,1,1\n5,1,1\n4,1,1\n")
    with pytest.raises(WorkloadError, match=r"row 3, column 'arrival': arrival 4 is earlier.*sort the file"):
        parse_workload(path)


def test_missing_value_names_the_row(tmp_path):
    path = write_csv(tmp_path / "t.csv", "arrival,prompt_tokens,output_tokens\n0,1,1\n1,,1\n")
    with pytest.raises(WorkloadError, match=r"row 2, column 'prompt_tokens': value missing"):
        parse_workload(path)


def test_empty_workloads_are_rejected(tmp_path):
    path = write_csv(tmp_path / "t.csv", "arrival,prompt_tokens,output_tokens\n")
    with pytest.raises(WorkloadError, match="no requests"):
        parse_workload(path)
    with pytest.raises(WorkloadError, match="no requests"):
        Workload("empty", ())


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(WorkloadError, match="no such workload file"):
        parse_workload(tmp_path / "nope.csv")
    with pytest.raises(WorkloadError, match="unknown trace format '.txt'"):
        parse_workload(tmp_path / "t.txt")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "poisson:rate=2,n=5,prompt=zipf(2),output=fixed(1)",
            "prompt='zipf\\(2\\)' is not a known distribution",
        ),
        ("poisson:rate=2,n=5,prompt=fixed(1),output=fixed(1),burst=3", "unknown key 'burst'; poisson takes"),
        ("gamma:rate=2,n=5,prompt=fixed(1),output=fixed(1)", "missing cv"),
        ("poisson:rate=fast,n=5,prompt=fixed(1),output=fixed(1)", "rate='fast' is not a number"),
        ("poisson:rate=2,n=5,prompt=uniform(1),output=fixed(1)", "uniform takes 2 argument"),
        ("poisson:rate=2,n=5,prompt=fixed(0),output=fixed(1)", "lengths below 1 token"),
        ("poisson:rate=0,n=5,prompt=fixed(1),output=fixed(1)", "must be positive"),
    ],
)
def test_spec_errors_say_what_is_wrong(spec, message):
    with pytest.raises(WorkloadError, match=message):
        parse_workload(spec)


def test_unknown_file_option_lists_the_options(tmp_path):
    path = write_csv(tmp_path / "t.csv", "arrival,prompt_tokens,output_tokens\n0,1,1\n")
    with pytest.raises(
        WorkloadError, match="unknown option 'rate'; options are limit, max_output, max_prompt, scale"
    ):
        parse_workload(f"{path}?rate=2")


def test_with_fields_sets_fields_of_a_generated_spec_and_options_of_a_trace_file(tmp_path):
    from revati.workloads import with_fields

    spec = "poisson:rate=2,n=9,prompt=fixed(8),output=fixed(4)"
    faster = parse_workload(with_fields(spec, {"rate": 8, "seed": 3}))
    assert len(faster) == 9 and faster.spec.startswith("poisson:rate=8,n=9")
    assert faster.requests[-1].arrival < parse_workload(spec).requests[-1].arrival
    trace = tmp_path / "t.csv"
    trace.write_text("arrival,prompt_tokens,output_tokens\n0,5,2\n1,6,3\n2,7,4\n")
    halved = parse_workload(with_fields(f"{trace}?limit=2", {"scale": 2}))
    assert [r.arrival for r in halved.requests] == [0.0, 0.5]
    with pytest.raises(WorkloadError, match="cannot set 'burst'"):
        with_fields(spec, {"burst": 1})
    with pytest.raises(WorkloadError, match="cannot set 'rate'"):
        with_fields(str(trace), {"rate": 1})
