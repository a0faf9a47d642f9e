"""The policy's arithmetic: SLO scores, the shortlist, the partial-loading rule and the cost model.

Everything here is a pure function of the registry, the PHT and a few live counters, so it is
deterministic and unit-testable on synthetic traces.

Estimates for a model m loaded to depth d (L = m's layers), from its full-depth profile:
  breach(d)   = share of profiled tokens that had not exited by d = 1 - CDF(d)  (forced there; we count
                all of them as breaches, which is exact for max-prob confidence: not exiting by d means
                confidence < threshold at every exit point up to d, the last one included)
  layers(d)   = E[min(exit depth, d)]                 (mean layers a token runs)
  checks(d)   = mean exit checks a token runs (one per exit point it passes, up to its exit)
  capacity(d) = the engine's memory plan: (budget - weights(d) - workspace) / KV bytes per block(d)
                blocks, in sequences of the observed mean length (prompt + output)
  n           = min(capacity(d), demand): the batch the objective assumes
  step(n, d)  = the model's measured step-time fit (pht.StepFit): per_layer_s * d
                + per_row_layer_s * n * (layers(d) + exited_share * (d - layers(d))) + per_check_row_s * n * checks(d),
                the time between a sequence's tokens with n sequences decoding; the batch's fixed cost per
                loaded layer is shared by its n rows, the blocks are not, and a row that exited still runs
                the attention half of every deeper loaded layer.
Exit points: a check (final norm + LM head + softmax) costs about as much as a block or more, so
checking at every layer costs more than the exits it finds save. Where the step fit prices a check,
the estimate keeps only the exit points whose exits pay for it (`thin_exits`: the subset minimising
the blocks' exit saving * layers + per_check_row_s * checks, assuming a token confident at depth l is still
confident at the next point kept), and the policy serves with those. Checking later never lets a
token leave earlier, so quality can only move toward full depth's; profiling keeps every point, so
the histogram says where each token first became confident.
Without step samples, step(n, d) falls back to a request-based TPOT scaled from full depth,
TPOT * layers(d) / layers(L), the same at any n (it was measured at whatever batch ran). Sources,
first found: live step fit, live TPOT (the PHT row), the registry's offline profile (its step fit,
then its TPOT), else a FLOPs proxy (2 x parameters run per token); without a histogram breach(d) is
assumed to be 1 - d/L.

SLO objectives (lower is better):
  throughput  seconds per token with n sequences in flight: step(n, d) / n + prefill(d), where
              prefill(d) = prompt tokens per output token (observed) * d * the fit's prefill seconds per
              token per layer: with long prompts prefill is most of the work, and models differ in it
              (on a CPU, int8 weights make the decode step cheap and prefill dear)
  latency     step(n, d)
  batch       -capacity(d)
  energy      joules per token = power x the throughput objective, when the device power is known;
              otherwise FLOPs per token (a proxy, stated in the results)
The partial-loading rule: the smallest exit point d whose predicted breach rate is at most
1 - coverage (default coverage 0.6, i.e. at most 40% of tokens forced, safely under the monitor's
trigger of 50 breaches in 100 tokens), among depths whose weights and one sequence fit the budget.
A profile is only N = 5 requests (~100-600 tokens), so the rule uses the upper end of a 90% one-sided
Wilson interval on the breach rate rather than the point estimate: a lucky profile does not load too
few layers and trip the monitor straight away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..kv_cache import MemoryBudgetError, MemoryPlan
from .pht import ProfileRow, StepFit
from .registry import ModelEntry

SLOS = ("throughput", "latency", "batch", "energy")


@dataclass(frozen=True)
class PolicyConfig:
    slo: str = "throughput"
    mode: str = "global"  # "global": one active model (the paper); "per-request": all shortlisted models live
    top_k: int = 3  # candidates shortlisted for the SLO
    profile_requests: int = 5  # N: live requests each candidate serves at full depth when profiled
    window: int = 100  # W: breach-monitor window, tokens
    breach_limit: int = 50  # B: more breaches than this in the window trigger adaptation
    reprofile_every: int = 150  # R: requests between profiling rounds
    coverage: float = 0.6  # partial depth covers this share of profiled exits
    switch_margin: float = 0.1  # a switch must beat loading more layers (or staying) by this fraction
    quality_tolerance: float | None = None  # quality guard: max output-perplexity rise over full depth
    quality_window: int = 20  # requests the quality guard averages over
    power_watts: float | None = None  # device power for the energy SLO; None: FLOPs proxy
    load_bandwidth: float = 1e9  # bytes/s for loading layers, until a real load has been measured

    def __post_init__(self):
        if self.slo not in SLOS:
            raise ValueError(f"slo must be one of {SLOS}, got {self.slo!r}")
        if self.mode not in ("global", "per-request"):
            raise ValueError(f"mode must be 'global' or 'per-request', got {self.mode!r}")
        if not 0 < self.coverage <= 1:
            raise ValueError(f"coverage must be in (0, 1], got {self.coverage}")
        if self.quality_tolerance is not None and self.quality_tolerance < 0:
            raise ValueError(f"quality_tolerance must be >= 0, got {self.quality_tolerance}")
        for name in ("top_k", "profile_requests", "window", "reprofile_every", "quality_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.breach_limit < self.window:
            raise ValueError(f"breach_limit must be in [0, window), got {self.breach_limit}")


@dataclass(frozen=True)
class Limits:
    """The serving memory settings the capacity arithmetic needs (one model's share in per-request mode)."""

    memory_budget: int
    max_model_len: int
    max_num_seqs: int = 256
    max_prefill_tokens: int = 256
    block_size: int = 64
    mean_seq_len: float | None = None  # observed prompt + output tokens per request; None = max_model_len
    prompt_per_output: float = 0.0  # observed prompt tokens per output token: the prefill each token carries

    def plan(self, entry: ModelEntry, depth: int) -> MemoryPlan:
        return entry.plan(depth, self.memory_budget, self.max_model_len, self.max_num_seqs,
                          self.max_prefill_tokens, self.block_size)

    def capacity(self, entry: ModelEntry, depth: int) -> int:
        """Sequences of the mean length the KV pool holds at `depth` (0: the depth does not fit)."""
        try:
            return self.plan(entry, depth).sequences(self.mean_seq_len or self.max_model_len)
        except MemoryBudgetError:
            return 0


@dataclass(frozen=True)
class Estimate:
    model: str
    depth: int
    breach_rate: float
    layers: float  # mean layers run per token
    tpot_s: float  # request-based decode s per token per sequence, registry exit points (FLOPs if unmeasured)
    capacity: int
    flops_per_token: float
    measured: bool  # time from a measurement (live or offline profile), not the FLOPs proxy
    step: StepFit | None = None  # the measured step-time model; when set it replaces tpot_s
    checks: float = 0.0  # mean exit checks run per token
    exits: tuple[int, ...] | None = None  # the exit points to serve with (None: the registry's)
    prompt_per_output: float = 0.0  # the workload's prompt tokens per output token (Limits)

    def batch(self, demand: int) -> int:
        """The decode batch the objective assumes: as many sequences as are wanted and fit."""
        return max(1, min(self.capacity, demand))

    def step_s(self, rows: int) -> float:
        """Seconds per decode step (between a sequence's tokens) with `rows` sequences decoding."""
        return self.step.seconds(self.depth, rows * self.layers, rows * self.checks, rows) if self.step else self.tpot_s

    @property
    def token_layer_s(self) -> float:
        """Seconds to give one context token K/V in one more layer: measured prefill, else one row's
        block in a decode step (an upper bound: prefill is batched over the prompt)."""
        if self.step:
            return self.step.prefill_token_layer_s or self.step.per_row_layer_s
        return self.tpot_s / max(self.layers, 1e-9)

    @property
    def prefill_s(self) -> float:
        """Prefill seconds per output token: its share of the prompts, through every loaded layer. With the
        step fit only: the request-based TPOT was measured with the prefills between its tokens."""
        return self.prompt_per_output * self.depth * self.token_layer_s if self.step else 0.0

    def objective(self, slo: str, demand: int, power_watts: float | None) -> float:
        rows = self.batch(demand)
        per_token = self.step_s(rows) / rows + self.prefill_s
        if slo == "throughput":
            return per_token
        if slo == "latency":
            return self.step_s(rows)
        if slo == "batch":
            return -float(self.capacity)
        return power_watts * per_token if power_watts and self.measured else self.flops_per_token


def exit_points(entry: ModelEntry) -> tuple[int, ...]:
    return entry.exit_config().exit_points(entry.num_layers)


def flops_per_token(entry: ModelEntry, layers: float, checks: float) -> float:
    """2 x parameters run: the blocks passed, plus one LM-head product per exit check and the last."""
    block = entry.layer_weight_bytes / entry.element_size
    head = entry.config.vocab_size * entry.config.hidden_size
    return 2.0 * (layers * block + (checks + 1) * head)


def _within(shares: dict[float, float], depths: tuple[int, ...]) -> dict[int, float]:
    """depth -> share of tokens that exited at or before it, for 0 and `depths`."""
    return {p: sum(v for d, v in shares.items() if d <= p) for p in (0,) + depths}


def exit_walk(kept: tuple[int, ...], depth: int, shares: dict[float, float]) -> tuple[float, float]:
    """(mean layers, mean exit checks) per token when only the exit points `kept` (< depth) are checked.
    `shares`: exit depth -> share of tokens, measured with every registry exit point checked; a
    token confident at l stays confident and leaves at the first kept point >= l, else at `depth`."""
    within = _within(shares, kept)
    layers = checks = 0.0
    previous = 0
    for point in kept:
        layers += point * (within[point] - within[previous])
        checks += 1.0 - within[previous]  # every token still running is checked here
        previous = point
    return layers + depth * (1.0 - within[previous]), checks


def thin_exits(points: tuple[int, ...], depth: int, shares: dict[float, float], block_s: float,
               check_s: float) -> tuple[int, ...]:
    """The subset of the exit points below `depth` that minimises a token's expected block and check
    time (block_s x layers + check_s x checks, `exit_walk`'s model): a point is worth its check
    only where enough tokens leave there to save the blocks above it. Dynamic programming over the
    last point kept, O(points^2)."""
    points = tuple(p for p in points if p < depth)
    within = _within(shares, points)
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}  # last kept point -> (cost so far, kept)
    for point in points + (depth,):
        options = []
        for last, (cost, kept) in best.items():
            if last >= point:
                continue
            exiting = (1.0 - within[last]) if point == depth else within[point] - within[last]
            check = check_s * (1.0 - within[last]) if point < depth else 0.0
            options.append((cost + block_s * point * exiting + check, kept + ((point,) if point < depth else ())))
        best[point] = min(options)
    return best[depth][1]


def estimate(entry: ModelEntry, row: ProfileRow | None, depth: int, limits: Limits, shift: float = 1.0,
             steps: StepFit | None = None) -> Estimate:
    """Predicted behaviour of `entry` at `depth`; `shift` scales the predicted breach rate by what the
    live window showed against the profile (a workload that moved since profiling); `steps`: the
    model's live step-time fit, if it has one. With an exit histogram and a step fit that prices a
    check, the exit points are thinned (`thin_exits`) and the estimate is for the points kept."""
    L = entry.num_layers
    capacity = limits.capacity(entry, depth)
    shares: dict[float, float] | None = None
    if row is not None and row.tokens:
        shares, layers_full, tpot_full = row.shares(), row.mean_layers(L), row.time_per_token_s
    elif entry.profile is not None:
        shares = dict(entry.profile.exit_shares)
        layers_full = sum(d * s for d, s in shares.items())
        tpot_full = entry.profile.time_per_output_token_s
        steps = steps or entry.profile.step_fit(entry.config.attention_share)
    else:  # no measurement: a prior of exits spread evenly over the L layers
        layers_full = tpot_full = None
    points, exits = tuple(p for p in exit_points(entry) if p < depth), None
    if shares is None:
        not_exited = 1.0 - depth / L
        layers = sum(range(1, depth + 1)) / L + depth * not_exited
        checks = float(len(points))
    else:
        not_exited = 1.0 - sum(v for d, v in shares.items() if d <= depth)
        layers, checks = exit_walk(points, depth, shares)
    measured = bool(tpot_full) and bool(layers_full)
    tpot = tpot_full * layers / layers_full if measured else flops_per_token(entry, layers, checks)
    if shares is not None and steps is not None and steps.per_check_row_s is not None:
        exits = thin_exits(points, depth, shares, steps.exit_saving_s, steps.per_check_row_s)
        layers, checks = exit_walk(exits, depth, shares)
    breach = 0.0 if depth == L else min(1.0, max(0.0, not_exited) * shift)
    flops = flops_per_token(entry, layers, checks)
    return Estimate(entry.name, depth, breach, layers, tpot, capacity, flops, measured or steps is not None, steps,
                    checks, exits, limits.prompt_per_output)


def partial_depth(entry: ModelEntry, row: ProfileRow | None, limits: Limits, coverage: float,
                  shift: float = 1.0, minimum: int = 1) -> int:
    """The smallest exit point >= minimum with predicted breach <= 1 - coverage that fits the budget."""
    samples = row.tokens if row is not None and row.tokens else entry.profile.tokens if entry.profile else 0
    for depth in exit_points(entry) + (entry.num_layers,):
        if depth < minimum:
            continue
        e = estimate(entry, row, depth, limits, shift)
        if e.capacity >= 1 and wilson_upper(e.breach_rate, samples) <= 1.0 - coverage + 1e-12:
            return depth
    return entry.num_layers


def wilson_upper(rate: float, n: int, z: float = 1.2816) -> float:
    """Upper end of the one-sided Wilson score interval (z = 1.28: 90%) for a rate seen over n tokens;
    the rate itself when there are no samples (a prior, not a measurement)."""
    if n <= 0 or rate >= 1.0:
        return rate
    centre = rate + z * z / (2 * n)
    spread = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))


def shortlist(entries: list[ModelEntry], limits: Limits, config: PolicyConfig, demand: int = 1) -> list[str]:
    """Top-K models for the SLO among those that fit the memory at full depth (profiling runs there),
    ranked by their offline profile at the depth the loading rule would pick."""
    scored = []
    for e in entries:
        if estimate(e, None, e.num_layers, limits).capacity < 1:
            continue
        d = partial_depth(e, None, limits, config.coverage)
        scored.append((estimate(e, None, d, limits).objective(config.slo, demand, config.power_watts), e.name))
    scored.sort()
    return [name for _, name in scored[: config.top_k]]


@dataclass(frozen=True)
class Adaptation:
    kind: str  # "load" (more layers of the current model) | "switch"
    model: str
    depth: int
    cost_s: float  # transition + serving the horizon, in the objective's units (seconds for time SLOs)
    transition_s: float
    estimate: Estimate


def transition_seconds(entry: ModelEntry, from_depth: int, to_depth: int, context_tokens: int,
                       token_layer_s: float, bandwidth: float) -> float:
    """Bytes of the layers to read / load bandwidth, plus K/V for the context in flight through the
    new layers (`token_layer_s` per token and layer: Estimate.token_layer_s)."""
    added = max(0, to_depth - from_depth)
    load = (entry.weight_bytes(to_depth) - (entry.weight_bytes(from_depth) if from_depth else 0)) / bandwidth
    return max(0.0, load) + context_tokens * added * token_layer_s


__all__ = ["Adaptation", "Estimate", "Limits", "PolicyConfig", "SLOS", "estimate", "exit_points", "exit_walk",
           "flops_per_token", "partial_depth", "shortlist", "thin_exits", "transition_seconds"]
