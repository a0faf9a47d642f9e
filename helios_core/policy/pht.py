"""The performance history table (PHT): what live profiling measured for each candidate model.

Each candidate serves its profiling requests at full depth, so its exit histogram is uncensored: the
depth a token left at is where it became confident (or the last layer). From the histogram the
policy predicts, for any partial depth d, the share of tokens that would be forced at d (the breach
rate, when they are below threshold) and the mean number of layers a token runs.

Rows can also hold requests served at a partial depth (per-request mode's per-task rows): a breach
there is censored, the token would have exited somewhere deeper than the served depth, so it counts
as "not exited" at every depth (pessimistic) and as running every layer.

The table also keeps each model's engine steps (`StepRecord`: decode wall time, loaded depth,
blocks and exit checks run), at every depth it has served at, and fits the step-time model the cost
model uses:

    step seconds = per_layer_s x loaded depth + per_row_layer_s x (layer-rows + exited_share x exited-rows)
                   + per_check_row_s x check-rows

per_layer_s is what every loaded layer costs once per step, whoever runs it (kernel launches, the
fixed part of the exit checks); per_row_layer_s is one row through one block; exited-rows counts the
layers a row passes after it exited (rows x depth - layer-rows), where it still runs the attention
half of the block (its K/V, and attention over the whole batch: runner.py), priced at the model's
`ModelConfig.attention_share` of a block (a prior from the weights: the steps of one workload hardly
separate the two halves); per_check_row_s one row's exit check (the final norm, the LM head and the confidence), which
the policy weighs against the blocks an exit saves when it thins the exit points (planner.py). The
check cost separates from the blocks only over steps that checked at different densities; until
then a check costs what the offline profile measured in blocks, and without one it stays inside
per_row_layer_s. On the demo
models a fit on full-depth steps predicts the partial-depth steps within ~15% on a quiet CPU; a
fit without the depth term is off by up to ~2x there, and a free intercept comes out near 0
(`bench/step_model.py`, `docs/policy.md`). A step is a measurement of the device, not of the
workload, so steps outlive profiling rounds (the newest STEP_SAMPLES per model and depth are kept).
Prefill is timed apart in the same records; its mean seconds per prompt token per layer costs the
K/V refill of newly loaded layers.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from ..telemetry import RequestSummary, StepRecord

STEP_SAMPLES = 128  # newest decode steps kept per (model, depth)
MIN_STEPS = 8  # fewer steps than this: no fit


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

    def shares(self) -> dict[float, float]:
        """Exit depth -> share of profiled tokens; the censored breaches at depth inf (confident only
        somewhere deeper than served, if at all: within no depth, and running every loaded layer)."""
        if not self.tokens:
            return {}
        return {**{d: n / self.tokens for d, n in self.histogram.items()}, math.inf: self.censored / self.tokens}

    def share_within(self, depth: int) -> float:
        """Share of profiled tokens that exited at or before `depth`."""
        return sum(v for d, v in self.shares().items() if d <= depth)

    def mean_layers(self, depth: int) -> float:
        """Mean layers a token runs when only `depth` layers are loaded: E[min(exit depth, depth)]."""
        if not self.tokens:
            return float(depth)
        return sum(min(d, depth) * v for d, v in self.shares().items())

    def to_dict(self) -> dict:
        return {"model": self.model, "num_layers": self.num_layers, "requests": self.requests,
                "tokens": self.tokens, "time_per_token_s": self.time_per_token_s, "perplexity": self.perplexity,
                "exit_histogram": dict(sorted(self.histogram.items())), "censored": self.censored}


@dataclass(frozen=True)
class StepFit:
    """The fitted step-time model of one model on this device (see the module docstring)."""

    per_layer_s: float  # per loaded layer per step
    per_row_layer_s: float  # per block run by one row (with its exit checks, when per_check_row_s is None)
    prefill_token_layer_s: float | None  # measured prefill seconds per prompt token per layer, if any
    samples: int
    per_check_row_s: float | None = None  # per exit check of one row (final norm, LM head, confidence)
    exited_share: float = 0.0  # what a layer costs a row that exited below it, as a share of per_row_layer_s

    def seconds(self, depth: float, layer_rows: float, check_rows: float = 0.0, rows: float | None = None) -> float:
        """Predicted decode step time with `depth` layers loaded, `layer_rows` blocks and `check_rows`
        exit checks run by `rows` sequences (None: no row exited early, rows x depth = layer_rows)."""
        exited = 0.0 if rows is None else max(0.0, rows * depth - layer_rows)
        return (self.per_layer_s * depth + self.per_row_layer_s * (layer_rows + self.exited_share * exited)
                + (self.per_check_row_s or 0.0) * check_rows)

    @property
    def exit_saving_s(self) -> float:
        """What a row saves per layer it skips by exiting: the block, less the attention half it still runs."""
        return self.per_row_layer_s * (1.0 - self.exited_share)

    def to_dict(self) -> dict:
        return {"per_layer_s": self.per_layer_s, "per_row_layer_s": self.per_row_layer_s,
                "per_check_row_s": self.per_check_row_s, "exited_share": self.exited_share,
                "prefill_token_layer_s": self.prefill_token_layer_s, "samples": self.samples}


Sample = tuple[float, int, int, int, int]  # (decode seconds, depth, layer-rows, check-rows, rows): compact
# Checks per block must vary this much across the steps to fit the check cost apart: SmolLM2's 5 exit
# points in 30 layers against none (`helios profile`'s second batch) is a spread of 0.17.
CHECK_SPREAD = 0.1


def sample(record: StepRecord) -> Sample:
    return record.seconds, record.depth, record.layer_rows, record.check_rows, record.rows


def fit_steps(samples: list[Sample], prefill_token_layer_s: float | None = None,
              check_ratio: float | None = None, exited_share: float = 0.0) -> StepFit | None:
    """Least squares of seconds on (depth, layer-rows, check-rows), then once more without the steps whose
    residual exceeds 3x the median: a shared CPU leaves stray slow steps (another process, a first call).

    The check cost is fitted only when the steps ran checks at different densities (checks per block),
    e.g. profiling at every exit point and serving at a few, with MIN_STEPS at each end; otherwise a
    check costs `check_ratio` blocks (the offline profile's ratio: a property of the model on the
    device, which outlasts the machine's speed drifting since), and without one the checks stay
    inside per_row_layer_s. A layer a row passes after exiting counts as `exited_share` of a block."""
    fit = _least_squares(samples, prefill_token_layer_s, check_ratio, exited_share)
    if fit is None:
        return None
    residuals = [abs(t - fit.seconds(d, r, k, n)) for t, d, r, k, n in samples]
    cut = max(3 * statistics.median(residuals), 1e-12)
    kept = [s for s, e in zip(samples, residuals) if e <= cut]
    return _least_squares(kept, prefill_token_layer_s, check_ratio, exited_share) or fit


def _least_squares(samples: list[Sample], prefill: float | None, check_ratio: float | None,
                   exited_share: float) -> StepFit | None:
    """Coefficients >= 0, through the origin (the data put the intercept near 0). None when the steps
    cannot separate depth from layer-rows: too few, or layer-rows per loaded layer (the batch) never varied."""
    if len(samples) < MIN_STEPS:
        return None
    t = np.array([s[0] for s in samples], dtype=float)
    x = np.array([s[1:4] for s in samples], dtype=float)  # depth, block-rows, check-rows
    rows = np.array([s[4] for s in samples], dtype=float)
    x[:, 1] += exited_share * np.maximum(rows * x[:, 0] - x[:, 1], 0.0)  # exited rows' attention halves
    sdd, sdr, srr = x[:, 0] @ x[:, 0], x[:, 0] @ x[:, 1], x[:, 1] @ x[:, 1]
    if srr <= 0 or sdd * srr - sdr * sdr <= 0.01 * sdd * srr:
        return None
    density = x[:, 2] / np.maximum(x[:, 1], 1)
    middle = (density.max() + density.min()) / 2
    sparse, dense = int((density < middle).sum()), int((density >= middle).sum())
    if density.max() - density.min() >= CHECK_SPREAD and min(sparse, dense) >= MIN_STEPS:
        a, b, c = _nonnegative(x, t)
        if b > 0 and c > 0:  # else the noise took one term's share: the prior is the better guess
            return StepFit(a, b, prefill, len(samples), c, exited_share)
    if check_ratio is not None:  # a check is check_ratio blocks: one regressor, blocks + ratio x checks
        a, b = _nonnegative(np.stack([x[:, 0], x[:, 1] + check_ratio * x[:, 2]], axis=1), t)
        return StepFit(a, b, prefill, len(samples), check_ratio * b, exited_share)
    a, b = _nonnegative(x[:, :2], t)
    return StepFit(a, b, prefill, len(samples), exited_share=exited_share)


def _nonnegative(x: np.ndarray, t: np.ndarray) -> list[float]:
    """Least squares with every coefficient >= 0: the best of the column subsets whose fit is nonnegative
    (at most 3 columns, so 7 subsets)."""
    best, coef = math.inf, [0.0] * x.shape[1]
    for k in range(1, x.shape[1] + 1):
        for cols in itertools.combinations(range(x.shape[1]), k):
            sol = np.linalg.lstsq(x[:, cols], t, rcond=None)[0]
            if (sol < 0).any():
                continue
            err = float(np.sum((x[:, cols] @ sol - t) ** 2))
            if err < best:
                best, coef = err, [0.0] * x.shape[1]
                for col, v in zip(cols, sol):
                    coef[col] = float(v)
    return coef


class PerformanceHistoryTable:
    def __init__(self, check_priors: dict[str, float] | None = None, exited_shares: dict[str, float] | None = None):
        self.check_priors = check_priors or {}  # model -> a check's cost in blocks (offline), until the steps fit one
        self.exited_shares = exited_shares or {}  # model -> ModelConfig.attention_share
        self.rows: dict[str, ProfileRow] = {}
        self.steps: dict[tuple[str, int], deque[Sample]] = {}  # (model, depth) -> newest decode steps
        self.prefill: dict[str, tuple[float, int]] = {}  # model -> (prefill seconds, prompt token-layers)
        self._fits: dict[str, StepFit | None] = {}  # cache, dropped when the model's steps change

    def add_steps(self, model: str, records: list[StepRecord]) -> None:
        for r in records:
            if r.rows:
                self.steps.setdefault((model, r.depth), deque(maxlen=STEP_SAMPLES)).append(sample(r))
            if r.prefill_tokens:
                seconds, token_layers = self.prefill.get(model, (0.0, 0))
                self.prefill[model] = (seconds + r.prefill_seconds, token_layers + r.prefill_tokens * r.depth)
        if records:
            self._fits.pop(model, None)

    def step_fit(self, model: str) -> StepFit | None:
        if model not in self._fits:
            samples = [s for (m, _), q in self.steps.items() if m == model for s in q]
            seconds, token_layers = self.prefill.get(model, (0.0, 0))
            self._fits[model] = fit_steps(samples, seconds / token_layers if token_layers else None,
                                          self.check_priors.get(model), self.exited_shares.get(model, 0.0))
        return self._fits[model]

    def start(self, model: str, num_layers: int, at_request: int) -> ProfileRow:
        """A fresh row: re-profiling replaces the old measurement (the workload may have moved)."""
        self.rows[model] = ProfileRow(model, num_layers, started_at_request=at_request)
        return self.rows[model]

    def get(self, model: str) -> ProfileRow | None:
        return self.rows.get(model)

    def to_dict(self) -> dict:
        rows = {name: row.to_dict() for name, row in self.rows.items()}
        for name, row in rows.items():
            fit = self.step_fit(name)
            row["step_fit"] = fit.to_dict() if fit else None
        return rows
