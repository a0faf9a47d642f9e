"""The performance history table (PHT): what live profiling measured for each candidate model.

Each candidate serves its profiling requests at full depth, so its exit histogram is uncensored: the
depth a token left at is where it became confident (or the last layer). From the histogram the
policy predicts, for any partial depth d, the share of tokens that would be forced at d (the breach
rate, when they are below threshold) and the mean number of layers a token runs.

Rows can also hold requests served at a partial depth (per-request mode's per-task rows): a breach
there is censored, the token would have exited somewhere deeper than the served depth, so it counts
as "not exited" at every depth (pessimistic) and as running every layer.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from ..telemetry import RequestSummary


@dataclass
class ProfileRow:
    model: str
    num_layers: int
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0  # sum over requests of (latency - time to first token): decode time
    nll: float = 0.0  # sum of -logprob over tokens (output perplexity)
    histogram: Counter = field(default_factory=Counter)  # exit depth -> tokens that were confident there
    censored: int = 0  # breaches at a partial depth: confident only somewhere deeper, if at all
    started_at_request: int = 0  # the policy's request count when this profile began

    def add(self, summary: RequestSummary, depth: int) -> None:
        """A finished request that was served with `depth` layers loaded."""
        self.requests += 1
        self.tokens += summary.output_tokens
        self.histogram.update(summary.exit_histogram)
        if summary.breaches:
            self.histogram[depth] -= summary.breaches
            self.censored += summary.breaches
        if summary.time_per_output_token_s is not None:
            self.seconds += summary.time_per_output_token_s * (summary.output_tokens - 1)
        if summary.perplexity is not None and summary.output_tokens:
            self.nll += math.log(summary.perplexity) * summary.output_tokens

    @property
    def time_per_token_s(self) -> float | None:
        """Measured decode time per output token per request (TPOT) at full depth."""
        decoded = self.tokens - self.requests
        return self.seconds / decoded if decoded > 0 and self.seconds > 0 else None

    @property
    def perplexity(self) -> float | None:
        return math.exp(self.nll / self.tokens) if self.tokens else None

    def share_within(self, depth: int) -> float:
        """Share of profiled tokens that exited at or before `depth`."""
        if not self.tokens:
            return 0.0
        return sum(n for d, n in self.histogram.items() if d <= depth) / self.tokens

    def mean_layers(self, depth: int) -> float:
        """Mean layers a token runs when only `depth` layers are loaded: E[min(exit depth, depth)]."""
        if not self.tokens:
            return float(depth)
        return (sum(min(d, depth) * n for d, n in self.histogram.items()) + self.censored * depth) / self.tokens

    def to_dict(self) -> dict:
        return {"model": self.model, "num_layers": self.num_layers, "requests": self.requests,
                "tokens": self.tokens, "time_per_token_s": self.time_per_token_s, "perplexity": self.perplexity,
                "exit_histogram": dict(sorted(self.histogram.items())), "censored": self.censored}


class PerformanceHistoryTable:
    def __init__(self):
        self.rows: dict[str, ProfileRow] = {}

    def start(self, model: str, num_layers: int, at_request: int) -> ProfileRow:
        """A fresh row: re-profiling replaces the old measurement (the workload may have moved)."""
        self.rows[model] = ProfileRow(model, num_layers, started_at_request=at_request)
        return self.rows[model]

    def get(self, model: str) -> ProfileRow | None:
        return self.rows.get(model)

    def to_dict(self) -> dict:
        return {name: row.to_dict() for name, row in self.rows.items()}
