"""Serving metrics on hand-made results whose figures are worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest

from revati.metrics import RequestResult, Stats, metric_errors, relative_error, summarize

# A: arrives 0, tokens at 1, 2, 4 → TTFT 1, TPOT (4-1)/2 = 1.5, gaps 1 and 2, E2E 4
# B: arrives 1, tokens at 3, 3.5 → TTFT 2, TPOT 0.5,          gap 0.5,     E2E 2.5
# C: arrives 2, one token at 5   → TTFT 3, no TPOT,            no gap,      E2E 3
# D: arrives 3, no token         → unfinished, left out of every statistic
RESULTS = [
    RequestResult("A", 0.0, 10, 3, [1.0, 2.0, 4.0]),
    RequestResult("B", 1.0, 10, 2, [3.0, 3.5]),
    RequestResult("C", 2.0, 10, 1, [5.0]),
    RequestResult("D", 3.0, 10, 4, []),
]


def test_counts_and_unfinished_requests():
    m = summarize(RESULTS)
    assert (m.requests, m.unfinished) == (3, 1)


def test_ttft_from_arrival_to_first_token():
    # samples 1, 2, 3: p90 sits at rank 1.8 → 2 + 0.8 × (3 − 2)
    assert summarize(RESULTS).ttft == pytest.approx(Stats(mean=2.0, p50=2.0, p90=2.8, p99=2.98))


def test_tpot_skips_one_token_outputs():
    # samples 1.5 and 0.5 only (C has one token): p90 = 0.5 + 0.9 × 1
    assert summarize(RESULTS).tpot == pytest.approx(Stats(mean=1.0, p50=1.0, p90=1.4, p99=1.49))


def test_itl_pools_every_gap():
    # gaps 1, 2, 0.5 → sorted 0.5, 1, 2
    assert summarize(RESULTS).itl == pytest.approx(Stats(mean=3.5 / 3, p50=1.0, p90=1.8, p99=1.98))


def test_e2e_from_arrival_to_last_token():
    # samples 4, 2.5, 3 → sorted 2.5, 3, 4
    assert summarize(RESULTS).e2e == pytest.approx(Stats(mean=9.5 / 3, p50=3.0, p90=3.8, p99=3.98))


def test_throughput_over_first_arrival_to_last_completion():
    m = summarize(RESULTS)
    assert m.duration == 5.0  # completion of C at 5 − arrival of A at 0
    assert m.throughput_tok_s == pytest.approx(6 / 5)  # 3 + 2 + 1 output tokens
    assert m.throughput_req_s == pytest.approx(3 / 5)


def test_given_duration_overrides_the_span():
    assert summarize(RESULTS, duration=10.0).throughput_tok_s == pytest.approx(0.6)


def test_to_dict_is_flat_and_named_by_metric_and_statistic():
    d = summarize(RESULTS).to_dict()
    assert d["ttft_p50"] == 2.0
    assert d["tpot_p99"] == pytest.approx(1.49)
    assert d["e2e_mean"] == pytest.approx(9.5 / 3)
    assert d["throughput_tok_s"] == pytest.approx(1.2)
    assert all(isinstance(v, float) for v in d.values())
    assert {
        f"{m}_{s}" for m in ("ttft", "tpot", "itl", "e2e") for s in ("mean", "p50", "p90", "p99")
    } <= d.keys()


def test_one_token_outputs_only_give_nan_tpot_and_itl():
    m = summarize([RequestResult("A", 0.0, 4, 1, [0.25])])
    assert math.isnan(m.tpot.p50) and math.isnan(m.itl.mean)
    assert m.ttft.p99 == 0.25


def test_nothing_to_summarize_is_an_error():
    with pytest.raises(ValueError, match="no request results"):
        summarize([])
    with pytest.raises(ValueError, match="none of the 1 requests produced a token"):
        summarize([RequestResult("A", 0.0, 4, 1, [])])


def test_relative_error_is_against_the_recorded_figure():
    assert relative_error(105.0, 100.0) == pytest.approx(0.05)
    assert relative_error(95.0, 100.0) == pytest.approx(0.05)
    assert relative_error(0.0, 0.0) == 0.0
    assert relative_error(1.0, 0.0) == math.inf


def test_metric_errors_cover_the_headline_figures():
    recorded = summarize(RESULTS)
    slower = summarize(
        [
            RequestResult(
                r.request_id, r.arrival, r.prompt_tokens, r.output_tokens, [t * 2 for t in r.token_times]
            )
            for r in RESULTS
        ]
    )
    errors = metric_errors(slower, recorded)
    assert set(errors) == {
        "ttft_p50",
        "ttft_p99",
        "tpot_p50",
        "tpot_p99",
        "e2e_p50",
        "e2e_p99",
        "throughput_tok_s",
    }
    # token times doubled: TPOT doubles exactly; TTFT samples become 2, 5, 8 → p50 5 vs 2
    assert errors["tpot_p50"] == pytest.approx(1.0)
    assert errors["ttft_p50"] == pytest.approx(1.5)
    assert errors["throughput_tok_s"] == pytest.approx(0.5)  # 6 tokens over 10 s instead of 5 s
    assert metric_errors(recorded, recorded) == dict.fromkeys(errors, 0.0)
