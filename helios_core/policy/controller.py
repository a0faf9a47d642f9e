"""The HELIOS control loop as a deterministic state machine over telemetry.

The policy never touches a model. The caller (the in-process `Orchestrator`, or the Ray router
actor) feeds it telemetry in batches and applies the targets it sets:

    observe_tokens(model, records)        token records of a step (exit depth, forced, breach)
    observe_steps(model, steps)           engine step records (decode time, batch, depth): model speed
    observe_request(model, depth, summary) a finished request, with the depth it was served at
    observe_load(running, waiting, context_tokens)   the queue, for demand and switch costs
    observe_layer_event(event)            a measured load, for the load bandwidth
    targets                               model -> (depth, profiling): what should be loaded
    choose(task) / assigned(model, task)  which model serves the next request (None: hold it)
    serving                               global mode: where the rest goes while a round profiles

Global mode (the paper): one target at a time.
  PROFILING  each shortlisted candidate in turn is the target at full depth and serves the next N
             live requests (their outputs go to the users); the PHT records them.
  SERVING    the best candidate for the SLO, loaded to the partial depth of the loading rule and
             checking only the exit points that pay for their check (planner.thin_exits).
             More than B breaches in W tokens -> adapt: load more layers of the current model or
             switch to another candidate, whichever the cost model says costs less.
  Every R finished requests the candidates are profiled again.
Per-request mode (beyond the paper): every shortlisted model is live with its share of the memory.
Each is profiled at full depth on its first N requests, then partially loaded by the same rule.
Each task tag (requests without one share the task "default") is tried on every model for N
requests, then routed to the model whose record for that task scores best; a breach trigger loads
more layers of the model it fired on (routing, not switching, moves work between models).

Hysteresis: the monitor is reset and quiet for a window after every change; after a profiling round
the current model is kept unless another scores better by `switch_margin`; a switch on a breach must
beat loading more layers by the same margin.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import asdict, dataclass, replace
from typing import Iterable

from ..telemetry import RequestSummary, StepRecord, TokenRecord
from .monitor import BreachMonitor
from .pht import PerformanceHistoryTable, ProfileRow
from .planner import (Adaptation, Estimate, Limits, PolicyConfig, estimate, partial_depth, shortlist,
                      transition_seconds)
from .registry import Registry

DEFAULT_TASK = "default"


@dataclass(frozen=True)
class Target:
    depth: int
    profiling: bool  # serving profiling requests at full depth
    exits: tuple[int, ...] | None = None  # exit points to check (None: the registry's, as when profiling)


@dataclass(frozen=True)
class PolicyEvent:
    kind: str  # profile | serve | load | switch
    model: str
    depth: int
    requests: int  # finished requests when it happened
    tokens: int  # tokens observed when it happened
    reason: str
    exits: tuple[int, ...] | None = None  # the exit points it serves with (None: the registry's)

    def to_dict(self) -> dict:
        return asdict(self)


class HeliosPolicy:
    def __init__(self, registry: Registry, limits: Limits, config: PolicyConfig | None = None):
        self.registry, self.config = registry, config or PolicyConfig()
        c = self.config
        self.candidates = shortlist(list(registry), limits, c)
        if not self.candidates:
            raise ValueError("no registry model fits the memory budget at full depth")
        # In per-request mode the models are live together: each plans with its share of the memory.
        share = len(self.candidates) if c.mode == "per-request" else 1
        self.limits = replace(limits, memory_budget=limits.memory_budget // share)
        self._lengths: deque[tuple[int, int]] = deque(maxlen=256)  # (prompt, output) tokens of recent requests
        self.pht = PerformanceHistoryTable({e.name: e.profile.check_ratio for e in registry
                                            if e.profile and e.profile.check_ratio is not None},
                                           {e.name: e.config.attention_share for e in registry})
        self.task_rows: dict[tuple[str, str], ProfileRow] = {}  # per-request mode: (model, task) -> profile
        self.monitors = {m: BreachMonitor(c.window, c.breach_limit) for m in self.candidates}
        self.events: list[PolicyEvent] = []
        self.targets: dict[str, Target] = {}
        self.requests = self.tokens = 0
        self.bandwidth = c.load_bandwidth
        self._demand: deque[int] = deque([1], maxlen=64)
        self._context_tokens = 0
        self._last_profile_at = 0
        self._to_profile: list[str] = []
        self._serving_before: str | None = None  # global mode: the model served before a profiling round
        self._quality = {m: deque(maxlen=c.quality_window) for m in self.candidates}  # (nll sum, tokens)
        self._assigned: Counter = Counter()  # (model, task or "*" for a global profiling round) -> requests
        self._begin_profiling("start")

    # --- telemetry in ---------------------------------------------------------------------------
    def observe_tokens(self, model: str, records: Iterable[TokenRecord]) -> None:
        records = list(records)
        self.tokens += len(records)
        target = self.targets.get(model)
        if target is None or target.profiling:
            return
        if self.monitors[model].add(r.breach for r in records):
            self._adapt(model, f"> {self.config.breach_limit} breaches in {self.config.window} tokens",
                        (self.config.breach_limit + 1) / self.config.window)

    def observe_request(self, model: str, depth: int, summary: RequestSummary, task: str | None = None) -> None:
        """A finished request of `model`, served with `depth` layers loaded."""
        c = self.config
        self.requests += 1
        # Capacity in sequences follows the length requests really have (the KV pool is paged), and the
        # throughput objective prices the prompts' prefill per output token.
        self._lengths.append((summary.prompt_tokens, summary.output_tokens))
        prompt, output = (sum(column) for column in zip(*self._lengths))
        self.limits = replace(self.limits, mean_seq_len=(prompt + output) / len(self._lengths),
                              prompt_per_output=prompt / max(output, 1))
        if c.mode == "per-request":
            row = self.task_rows.setdefault((model, task or DEFAULT_TASK), ProfileRow(model, depth))
            row.num_layers = depth
            row.add(summary, depth)
        target = self.targets.get(model)
        if target is not None and not target.profiling and depth == target.depth:
            self._guard_quality(model, summary)
        if target is not None and target.profiling and depth == self.registry[model].num_layers:
            row = self.pht.get(model)
            row.add(summary, depth)
            if row.requests >= c.profile_requests:
                if c.mode == "per-request":
                    self._set(model, _serving(self._estimate_at_rule(model)), "serve", "profiled")
                elif self._to_profile:
                    self._profile_next("next candidate")
                else:
                    self._choose()
        elif not self._profiling and self.requests - self._last_profile_at >= c.reprofile_every:
            self._begin_profiling(f"{c.reprofile_every} requests since the last profile")

    def observe_steps(self, model: str, steps: Iterable[StepRecord]) -> None:
        """Engine steps of `model`, at whatever depth it runs: they fit its step-time model."""
        self.pht.add_steps(model, list(steps))

    def observe_load(self, running: int, waiting: int, context_tokens: int) -> None:
        self._demand.append(running + waiting)
        self._context_tokens = context_tokens

    def observe_layer_event(self, bytes_read: int, seconds: float) -> None:
        if bytes_read > 0 and seconds > 0:
            self.bandwidth = bytes_read / seconds

    @property
    def demand(self) -> int:
        """Sequences wanting service recently (running + waiting, the max over the last 64 steps)."""
        return max(max(self._demand), 1)

    # --- decisions out --------------------------------------------------------------------------
    def choose(self, task: str | None = None) -> str | None:
        """The model for the next request, or None to hold it (a profiling candidate already has its N).
        The caller reports the request with `assigned` once it is really handed to that model."""
        c = self.config
        task = task or DEFAULT_TASK
        if c.mode == "global":
            [(model, target)] = self.targets.items()
            if target.profiling and self._assigned[(model, "*")] >= c.profile_requests:
                return None
            return model
        finished = {m: self.task_rows[(m, task)].requests if (m, task) in self.task_rows else 0
                    for m in self.candidates}
        unprofiled = [m for m in self.candidates if finished[m] < c.profile_requests]
        untried = [m for m in unprofiled if self._assigned[(m, task)] < c.profile_requests]
        if untried:  # try this task on every model first (the outputs still go to the user)
            return min(untried, key=lambda m: (self._assigned[(m, task)], self.candidates.index(m)))
        if unprofiled:  # the task's trials are still running: the best model overall meanwhile
            scores = {m: self._model_estimate(m).objective(c.slo, self.demand, c.power_watts) for m in self.candidates}
        else:
            scores = {m: self._task_estimate(m, task).objective(c.slo, self.demand, c.power_watts)
                      for m in self.candidates}
        return min(self.candidates, key=lambda m: (scores[m], self.candidates.index(m)))

    @property
    def serving(self) -> str | None:
        """Global mode: the model for traffic beyond a profiling round's N requests. The target,
        or during a profiling round the model served before it (None before the first choice).
        Only a caller whose models are all live can use it (the Serve app); in process, one
        model is loaded at a time, so `choose` holds that traffic instead."""
        if self.config.mode != "global":
            return None
        [(model, target)] = self.targets.items()
        return self._serving_before if target.profiling else model

    def assigned(self, model: str, task: str | None = None) -> None:
        key = "*" if self.config.mode == "global" else task or DEFAULT_TASK
        self._assigned[(model, key)] += 1

    def snapshot(self) -> dict:
        """JSON-ready state for stats endpoints and the dashboard."""
        return {
            "mode": self.config.mode, "slo": self.config.slo, "candidates": self.candidates,
            # what the energy SLO compares: measured time x device power, or FLOPs when the power is unknown
            "energy_measure": "joules" if self.config.power_watts else "flops",
            "targets": {m: asdict(t) for m, t in self.targets.items()},
            "requests": self.requests, "tokens": self.tokens, "demand": self.demand,
            "breaches_in_window": {m: mon.breaches for m, mon in self.monitors.items()},
            "pht": self.pht.to_dict(), "events": [e.to_dict() for e in self.events],
        }

    # --- global mode ----------------------------------------------------------------------------
    @property
    def _profiling(self) -> bool:
        return any(t.profiling for t in self.targets.values())

    def _begin_profiling(self, reason: str) -> None:
        self._last_profile_at = self.requests
        if self.config.mode == "per-request":
            self.task_rows.clear()
            self._assigned.clear()
            for model in self.candidates:
                self.pht.start(model, self.registry[model].num_layers, self.requests)
                self._set(model, Target(self.registry[model].num_layers, True), "profile", reason)
            return
        self._to_profile = list(self.candidates)
        self._serving_before = next(iter(self.targets), None)
        self._profile_next(reason)

    def _profile_next(self, reason: str) -> None:
        model = self._to_profile.pop(0)
        self._assigned[(model, "*")] = 0
        entry = self.registry[model]
        self.pht.start(model, entry.num_layers, self.requests)
        self._replace(model, Target(entry.num_layers, True), "profile", reason)

    def _choose(self) -> None:
        """After a profiling round: the best candidate at its partial depth (the current one unless
        another is better by the margin)."""
        c = self.config
        options = {m: self._estimate_at_rule(m) for m in self.candidates}
        score = {m: e.objective(c.slo, self.demand, c.power_watts) for m, e in options.items()}
        best = min(self.candidates, key=lambda m: (score[m], self.candidates.index(m)))
        reason = f"best {c.slo} after profiling"
        previous = self._serving_before
        if previous in score and previous != best and not _beats(score[best], score[previous], c.switch_margin):
            best, reason = previous, f"kept: {c.slo} of {best} within {c.switch_margin:.0%}"
        scores = ", ".join(f"{m}@{e.depth}: {score[m]:.3g}" for m, e in options.items())
        self._replace(best, _serving(options[best]), "serve", f"{reason} ({scores})")

    def _estimate_at_rule(self, model: str, shift: float = 1.0, minimum: int = 1) -> Estimate:
        entry, row = self.registry[model], self.pht.get(model)
        depth = partial_depth(entry, row, self.limits, self.config.coverage, shift, minimum)
        return estimate(entry, row, depth, self.limits, shift, self.pht.step_fit(model))

    def _adapt(self, model: str, why: str, live: float) -> None:
        """Load more layers or switch, whichever costs less. `live`: the breach rate seen."""
        c, target = self.config, self.targets[model]
        entry = self.registry[model]
        if target.depth >= entry.num_layers:
            return  # nothing is forced at full depth
        predicted = estimate(entry, self.pht.get(model), target.depth, self.limits).breach_rate
        shift = live / max(predicted, 1 / c.window)  # how much harder the workload got since profiling
        deeper = self._estimate_at_rule(model, shift, minimum=target.depth + 1)
        options = [self._costed("load", entry.name, target.depth, deeper)]
        if c.mode == "global":
            options += [self._costed("switch", other, 0, self._estimate_at_rule(other, shift))
                        for other in self.candidates if other != model and self.pht.get(other) is not None]
        feasible = [o for o in options if o.estimate.breach_rate <= 1 - c.coverage + 1e-12] or options
        load = options[0]
        best = min(feasible, key=lambda o: o.cost_s)
        if best.kind == "switch" and load in feasible and not _beats(best.cost_s, load.cost_s, c.switch_margin):
            best = load
        reason = (f"{why}; {best.kind} cost {best.cost_s:.3g} "
                  f"(" + ", ".join(f"{o.kind} {o.model}@{o.depth}: {o.cost_s:.3g}" for o in options) + ")")
        if c.mode == "global":
            self._replace(best.model, _serving(best.estimate), best.kind, reason)
        else:
            self._set(best.model, _serving(best.estimate), best.kind, reason)

    def _costed(self, kind: str, model: str, from_depth: int, est: Estimate) -> Adaptation:
        """Transition (load bytes, K/V refill or drain) + serving the rest of this profiling period."""
        c = self.config
        objective = est.objective(c.slo, self.demand, c.power_watts)
        if c.slo in ("batch", "energy") or not est.measured:
            return Adaptation(kind, model, est.depth, objective, 0.0, est)
        row = self.pht.get(model)
        tokens_per_request = row.tokens / row.requests if row and row.requests else 64
        if kind == "load":  # the running sequences' context needs K/V in the new layers
            transition = transition_seconds(self.registry[model], from_depth, est.depth, self._context_tokens,
                                            est.token_layer_s, self.bandwidth)
        else:  # a switch loads the other model and lets in-flight requests finish first (~one request)
            transition = (transition_seconds(self.registry[model], 0, est.depth, 0, est.token_layer_s, self.bandwidth)
                          + est.step_s(est.batch(self.demand)) * tokens_per_request)
        remaining = max(1, c.reprofile_every - (self.requests - self._last_profile_at))
        return Adaptation(kind, model, est.depth, transition + remaining * tokens_per_request * objective,
                          transition, est)

    def _guard_quality(self, model: str, summary: RequestSummary) -> None:
        """Quality guard (opt-in, `quality_tolerance`): when the output perplexity of the last
        `quality_window` requests served partially exceeds the model's full-depth profile by more than
        the tolerance, go deeper (or switch) as on a breach trigger."""
        c = self.config
        row = self.pht.get(model)
        if c.quality_tolerance is None or summary.perplexity is None or row is None or row.perplexity is None:
            return
        recent = self._quality[model]
        recent.append((math.log(summary.perplexity) * summary.output_tokens, summary.output_tokens))
        if len(recent) < recent.maxlen:
            return
        live = math.exp(sum(n for n, _ in recent) / max(sum(t for _, t in recent), 1))
        if live > (1 + c.quality_tolerance) * row.perplexity:
            recent.clear()
            self._adapt(model, f"quality guard: output perplexity {live:.3g} > {1 + c.quality_tolerance:.2f} x "
                               f"full-depth {row.perplexity:.3g}", self.monitors[model].breach_rate)

    # --- per-request mode -----------------------------------------------------------------------
    def _model_estimate(self, model: str) -> Estimate:
        """At its current depth, from its pooled profile (or the registry's offline one, or the prior)."""
        row = self.pht.get(model)
        return estimate(self.registry[model], row if row is not None and row.tokens else None,
                        self.targets[model].depth, self.limits, steps=self.pht.step_fit(model))

    def _task_estimate(self, model: str, task: str) -> Estimate:
        entry, row = self.registry[model], self.task_rows[(model, task)]
        return estimate(entry, row, min(row.num_layers, self.targets[model].depth), self.limits,
                        steps=self.pht.step_fit(model))

    # --- bookkeeping ----------------------------------------------------------------------------
    def _replace(self, model: str, target: Target, kind: str, reason: str) -> None:
        """Global mode: `model` becomes the only target."""
        self.targets = {}
        for monitor in self.monitors.values():
            monitor.reset()
        self._set(model, target, kind, reason)

    def _set(self, model: str, target: Target, kind: str, reason: str) -> None:
        self.targets[model] = target
        self.monitors[model].reset()
        self._quality[model].clear()
        self.events.append(PolicyEvent(kind, model, target.depth, self.requests, self.tokens, reason, target.exits))


def _serving(est: Estimate) -> Target:
    """Serve at the estimate's depth, checking only the exit points it kept."""
    return Target(est.depth, False, est.exits)


def _beats(new: float, old: float, margin: float) -> bool:
    """new is better (lower) than old by more than `margin` of |old|."""
    return new < old - margin * abs(old)


__all__ = ["DEFAULT_TASK", "HeliosPolicy", "PolicyEvent", "Target"]
