"""Serving metrics: TTFT, TPOT, ITL, E2E, throughput."""

from __future__ import annotations

from dataclasses import dataclass, field


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
