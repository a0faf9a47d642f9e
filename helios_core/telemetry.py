"""Exit telemetry: per-token records, per-request summaries, and per-model aggregates.

Data flow: the engine writes one `TokenRecord` per generated token into its request; when the
request finishes it becomes a `RequestSummary`; `ExitStats` aggregates every token of a model
(histogram by exit depth, forced exits, breaches). The policy and the router read `ExitStats`
snapshots, in batches (`drain`), never per token. Each decode step also leaves a `StepRecord` (its wall
time, batch rows, depth and exit checks), which the policy's step-time model is fitted on.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class TokenRecord:
    exit_layer: int  # 1-based depth the token left at
    confidence: float  # confidence at that depth
    forced: bool  # left at the last loaded layer of a partially loaded model
    breach: bool  # forced with confidence below the request's threshold
    logprob: float  # log-probability of the emitted token under the exit layer's distribution (temperature 1)


@dataclass(frozen=True)
class StepRecord:
    """One engine step: the decode's wall time and shape, and the prefill that ran before it."""

    seconds: float  # decode time (wall on CUDA, CPU time on a CPU): inputs, layers, checks, sampling; no prefill
    rows: int  # sequences in the decode batch (0: the step only prefilled)
    depth: int  # loaded layers
    layer_rows: int  # blocks run: sum over rows of the exit depth (rows that left skip deeper MLPs)
    prefill_tokens: int = 0  # prompt tokens prefilled in this step, before the decode
    prefill_seconds: float = 0.0
    check_rows: int = 0  # exit checks run: sum over rows of the exit points passed up to the exit depth


@dataclass
class RequestSummary:
    request_id: str
    model: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str
    exit_histogram: dict[int, int]  # depth -> tokens
    forced: int
    breaches: int
    mean_exit_layer: float
    perplexity: float | None  # of the output under the exits that produced it: exp(-mean logprob)
    time_to_first_token_s: float | None
    time_per_output_token_s: float | None  # mean over tokens after the first
    latency_s: float
    exit_layers: tuple[int, ...] | None = None  # the exit points checked at the end (None: the configured ones)

    @staticmethod
    def from_records(
        request_id: str,
        model: str,
        prompt_tokens: int,
        records: list[TokenRecord],
        finish_reason: str,
        arrival: float,
        first_token: float | None,
        finished: float,
        exit_layers: tuple[int, ...] | None = None,
    ) -> "RequestSummary":
        n = len(records)
        return RequestSummary(
            request_id=request_id,
            model=model,
            prompt_tokens=prompt_tokens,
            output_tokens=n,
            finish_reason=finish_reason,
            exit_histogram=dict(sorted(Counter(r.exit_layer for r in records).items())),
            forced=sum(r.forced for r in records),
            breaches=sum(r.breach for r in records),
            mean_exit_layer=sum(r.exit_layer for r in records) / n if n else 0.0,
            perplexity=math.exp(-sum(r.logprob for r in records) / n) if n else None,
            time_to_first_token_s=None if first_token is None else first_token - arrival,
            time_per_output_token_s=(finished - first_token) / (n - 1) if first_token is not None and n > 1 else None,
            latency_s=finished - arrival,
            exit_layers=exit_layers,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExitStats:
    """Running totals for one model; `drain()` hands the increments since the last drain to a consumer."""

    model: str
    num_layers: int
    histogram: Counter = field(default_factory=Counter)  # depth -> tokens
    tokens: int = 0
    forced: int = 0
    breaches: int = 0
    requests: int = 0

    def add_token(self, record: TokenRecord) -> None:
        self.histogram[record.exit_layer] += 1
        self.tokens += 1
        self.forced += record.forced
        self.breaches += record.breach

    def add_request(self) -> None:
        self.requests += 1

    def drain(self) -> "ExitStats":
        snapshot = ExitStats(self.model, self.num_layers, Counter(self.histogram), self.tokens, self.forced,
                             self.breaches, self.requests)
        self.histogram.clear()
        self.tokens = self.forced = self.breaches = self.requests = 0
        return snapshot

    def exit_share_within(self, depth: int) -> float:
        """Fraction of tokens that exited at or before `depth`."""
        if not self.tokens:
            return 0.0
        return sum(n for d, n in self.histogram.items() if d <= depth) / self.tokens
