"""Serving metrics: TTFT, TPOT, ITL, E2E, throughput, and the relative error between two runs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class RequestResult:
    """What an engine run produced for one request; all times are seconds from the run's start."""

    request_id: str
    arrival: float
    prompt_tokens: int
    output_tokens: int
    token_times: list[float] = field(default_factory=list)

    @property
    def first_token(self) -> float:
        return self.token_times[0]

    @property
    def completion(self) -> float:
        return self.token_times[-1]

    def trace_row(self) -> dict:
        """The request as a row of a trace's `requests` table (recorded and emulated runs alike)."""
        return {
            "request_id": self.request_id,
            "arrival": self.arrival,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "first_token": self.token_times[0] if self.token_times else None,
            "completion": self.token_times[-1] if self.token_times else None,
            "token_times": list(self.token_times),
        }


@dataclass(frozen=True)
class Stats:
    """Mean and percentiles (linear interpolation) of one latency in seconds; NaN without samples."""

    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        """Stats of a list of samples."""
        if not samples:
            return cls(math.nan, math.nan, math.nan, math.nan)
        p50, p90, p99 = np.percentile(samples, [50, 90, 99], method="linear")
        return cls(float(np.mean(samples)), float(p50), float(p90), float(p99))


@dataclass(frozen=True)
class ServingMetrics:
    """Per-run serving figures: latency stats per metric and throughput over the run."""

    requests: int  # requests that produced at least one token
    unfinished: int  # requests that produced none
    duration: float  # seconds over which throughput is measured
    ttft: Stats  # arrival → first token
    tpot: Stats  # mean time per output token after the first (requests with ≥ 2 output tokens)
    itl: Stats  # every gap between consecutive tokens, pooled over requests
    e2e: Stats  # arrival → last token
    throughput_tok_s: float  # output tokens / duration
    throughput_req_s: float  # finished requests / duration

    def to_dict(self) -> dict[str, float]:
        """Flat dict of floats: ttft_p50, tpot_p99, e2e_mean, throughput_tok_s, ..."""
        flat = {}
        for name, value in asdict(self).items():
            if isinstance(value, dict):
                flat.update({f"{name}_{stat}": v for stat, v in value.items()})
            else:
                flat[name] = float(value)
        return flat


def summarize(results: list[RequestResult], duration: float | None = None) -> ServingMetrics:
    """Serving metrics of a run; duration defaults to last completion − first arrival."""
    if not results:
        raise ValueError("no request results to summarize; did the run serve any request?")
    done = [r for r in results if r.token_times]
    if not done:
        raise ValueError(f"none of the {len(results)} requests produced a token; nothing to summarize")
    if duration is None:
        duration = max(r.completion for r in done) - min(r.arrival for r in done)
    tpot = [(r.completion - r.first_token) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    itl = [float(gap) for r in done for gap in np.diff(r.token_times)]
    tokens = sum(r.output_tokens for r in done)
    return ServingMetrics(
        requests=len(done),
        unfinished=len(results) - len(done),
        duration=duration,
        ttft=Stats.of([r.first_token - r.arrival for r in done]),
        tpot=Stats.of(tpot),
        itl=Stats.of(itl),
        e2e=Stats.of([r.completion - r.arrival for r in done]),
        throughput_tok_s=tokens / duration if duration > 0 else math.nan,
        throughput_req_s=len(done) / duration if duration > 0 else math.nan,
    )


def relative_error(emulated: float, recorded: float) -> float:
    """|emulated − recorded| / |recorded|: 0.05 is 5 % off the recorded figure."""
    if recorded == 0:
        return 0.0 if emulated == 0 else math.inf
    return abs(emulated - recorded) / abs(recorded)


# The figures whose error DESIGN.md reports for a run.
HEADLINE = ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "e2e_p50", "e2e_p99", "throughput_tok_s")


def metric_errors(emulated: ServingMetrics, recorded: ServingMetrics) -> dict[str, float]:
    """Relative error of each headline figure (p50 / p99 of TTFT, TPOT, E2E; throughput)."""
    e, r = emulated.to_dict(), recorded.to_dict()
    return {name: relative_error(e[name], r[name]) for name in HEADLINE}
