"""What a client saw of each request, and the latency and throughput figures of a run."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Trace:
    """One request. Times are seconds from the start of the run."""

    id: str
    task: str | None
    arrival: float
    token_times: list[float] = field(default_factory=list)  # when each output token reached the client
    output_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    forced: int = 0
    breaches: int = 0
    finished: float | None = None
    served_by: Counter = field(default_factory=Counter)  # (model, loaded depth, exit points) -> tokens
    error: str | None = None

    def add_tokens(self, now: float, ids: list[int], exit_layers: list[int], config: tuple[str, int, tuple | None],
                   forced: int = 0, breaches: int = 0) -> None:
        self.token_times += [now] * len(ids)
        self.output_ids += ids
        self.exit_layers += exit_layers
        self.forced += forced
        self.breaches += breaches
        self.served_by[config] += len(ids)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        """Gaps between tokens; tokens that arrive together (one chunk) count as one gap."""
        times = sorted(set(self.token_times))
        return [b - a for a, b in zip(times, times[1:])]


@dataclass(frozen=True)
class SLO:
    """A request is "good" when it meets both (the goodput definition of vLLM's bench)."""

    ttft_s: float = 2.0
    tpot_s: float = 0.2


def served_configs(traces: list[Trace]) -> Counter:
    """(model, loaded depth, exit points or None for the registry's) -> tokens served, over `traces`."""
    served = Counter()
    for t in traces:
        served.update(t.served_by)
    return served


def config_label(config: tuple[str, int, tuple[int, ...] | None]) -> str:
    """model@depth, and the exit points where the policy thinned them: "code-6l@6 exits 4"."""
    model, depth, exits = config
    return f"{model}@{depth}" + ("" if exits is None else f" exits {','.join(map(str, exits)) or 'none'}")


def percentiles(values: list[float], name: str) -> dict[str, float | None]:
    if not values:
        return {f"{name}_p{q}_s": None for q in (50, 90, 99)}
    return {f"{name}_p{q}_s": float(np.percentile(values, q)) for q in (50, 90, 99)}


def summarize(traces: list[Trace], seconds: float, slo: SLO) -> dict:
    """Throughput over the run's wall time, latency percentiles, goodput and exits of its requests."""
    done = [t for t in traces if t.finished is not None and t.error is None]
    tokens = sum(len(t.output_ids) for t in done)
    good = [t for t in done if (t.ttft or 0) <= slo.ttft_s and (t.tpot or 0) <= slo.tpot_s]
    histogram = Counter(layer for t in done for layer in t.exit_layers)
    per_model = {}
    for t in done:
        if t.served_by:  # a request is served by one model (a switch drains before it starts the next)
            model = t.served_by.most_common(1)[0][0][0]
            per_model.setdefault(model, Counter()).update(t.exit_layers)
    return {
        "requests": len(traces), "completed": len(done), "errors": len(traces) - len(done),
        "seconds": seconds, "output_tokens": tokens,
        "output_tokens_per_s": tokens / seconds, "requests_per_s": len(done) / seconds,
        "goodput_requests_per_s": len(good) / seconds,
        **percentiles([t.ttft for t in done if t.ttft is not None], "ttft"),
        **percentiles([t.tpot for t in done if t.tpot is not None], "tpot"),
        **percentiles([g for t in done for g in t.itls], "itl"),
        **percentiles([t.finished - t.arrival for t in done], "e2e"),
        "exit_histogram": {str(k): v for k, v in sorted(histogram.items())},
        "mean_exit_layer": float(np.mean([x for t in done for x in t.exit_layers])) if tokens else None,
        "forced_share": sum(t.forced for t in done) / tokens if tokens else None,
        "breach_share": sum(t.breaches for t in done) / tokens if tokens else None,
        "served_by": {config_label(c): n for c, n in sorted(served_configs(done).items(), key=lambda i: str(i[0]))},
        "exit_histograms": {m: {str(k): v for k, v in sorted(h.items())} for m, h in sorted(per_model.items())},
        "request_ttft_s": [t.ttft for t in done if t.ttft is not None],
        "request_e2e_s": [t.finished - t.arrival for t in done],
    }
