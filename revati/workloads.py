"""Workloads: requests with arrival times and token lengths."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    """One request of a workload: arrival is seconds from the run's start."""

    request_id: str
    arrival: float
    prompt_tokens: int
    output_tokens: int
